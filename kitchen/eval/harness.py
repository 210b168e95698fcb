"""Evaluation through lm-eval: Kitchen's own tasks, fed from files written per run, plus any lm-eval task.

Kitchen's task YAMLs live in ``kitchen/eval/tasks`` (the file name is the task name). Their data is
written here for each run: the held-out split of the training dataset feeds ``kitchen_heldout``
(generation) and ``kitchen_heldout_nll``; a built-in dataset's task (``kitchen_arithmetic``) is fed from
that dataset's test split and, when it is the dataset being trained, replaces ``kitchen_heldout``.

Chat templates: Kitchen's task prompts are rendered with the tokenizer's chat template when the data is
written, exactly as training renders them, so those tasks run with ``apply_chat_template=False``. Tasks
from lm-eval's catalogue run with lm-eval's ``apply_chat_template=True`` (and multi-turn few-shot) when
the tokenizer has a chat template, since Kitchen's models are chat models and are prompted that way.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitchen.data import builtin_dataset, get_builtin, render_weighted_tokens

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from kitchen.eval.lm import KitchenLM

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HELDOUT_TASK = "kitchen_heldout"
NLL_TASK = "kitchen_heldout_nll"
#: Built-in dataset -> the Kitchen task that scores it.
BUILTIN_TASKS: dict[str, str] = {"kitchen/arithmetic": "kitchen_arithmetic"}
#: lm-eval metric names of the held-out tasks -> the unqualified names reports use for them.
_GENERATION_METRICS = {
    "exact_match": "exact_match",
    "token_precision": "precision",
    "token_recall": "recall",
    "token_f1": "f1",
}
_NLL_METRICS = {"nll": "nll", "perplexity": "perplexity"}
HELDOUT_METRICS: tuple[str, ...] = (*_NLL_METRICS.values(), *_GENERATION_METRICS.values())


class EvalTaskError(ValueError):
    """A task name lm-eval does not know, or a task whose data could not be loaded."""


def kitchen_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@lru_cache(maxsize=2)
def task_manager(with_lm_eval_catalogue: bool) -> TaskManager:
    """Kitchen's tasks, plus lm-eval's own catalogue only when asked (indexing it takes ~15-25 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_lm_eval_catalogue)


def check_task_names(names: Sequence[str]) -> list[str]:
    """The names, stripped and deduplicated; unknown ones raise ``EvalTaskError`` with the closest matches.

    Kitchen's names are checked instantly; any other name needs lm-eval's task index.
    """
    cleaned = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    kitchen = set(kitchen_task_names())
    others = [n for n in cleaned if n not in kitchen]
    if not others:
        return cleaned
    known = task_manager(True).all_tasks
    problems = []
    for name in others:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"closest matches: {', '.join(close)}" if close else "no similar task names"
        problems.append(f"unknown lm-eval task {name!r} ({hint})")
    if problems:
        raise EvalTaskError("; ".join(problems))
    return cleaned


@dataclass(frozen=True)
class EvalPlan:
    """Which tasks one evaluation runs, and where each Kitchen task's data comes from."""

    generation_task: str
    """The held-out generation task: the built-in dataset's own task, else ``kitchen_heldout``."""
    kitchen_sources: dict[str, str]
    """Kitchen task -> ``"heldout"`` or the built-in dataset it reads (its test split)."""
    lm_eval_tasks: tuple[str, ...] = ()

    @property
    def kitchen_tasks(self) -> list[str]:
        return list(self.kitchen_sources)

    @property
    def tasks(self) -> list[str]:
        return [*self.kitchen_sources, *self.lm_eval_tasks]


def plan_evaluation(dataset: str | None, extra_tasks: Sequence[str] = ()) -> EvalPlan:
    """The held-out tasks for ``dataset`` (a built-in name or None) plus the user's ``extra_tasks``."""
    canonical = get_builtin(dataset).name if dataset and get_builtin(dataset) else None  # type: ignore[union-attr]
    generation = BUILTIN_TASKS.get(canonical or "", HELDOUT_TASK)
    sources = {NLL_TASK: "heldout", generation: "heldout"}
    by_task = {task: name for name, task in BUILTIN_TASKS.items()}
    external = []
    for name in check_task_names(extra_tasks):
        if name in sources:
            continue
        if name == HELDOUT_TASK:
            sources[name] = "heldout"
        elif name in by_task:
            sources[name] = by_task[name]
        elif name in kitchen_task_names():
            raise EvalTaskError(f"Kitchen task {name!r} has no data source; add it to BUILTIN_TASKS")
        else:
            external.append(name)
    return EvalPlan(generation_task=generation, kitchen_sources=sources, lm_eval_tasks=tuple(external))


# -- data ------------------------------------------------------------------------------------------


def conversation_doc(row: Mapping[str, Any], lm: KitchenLM) -> dict[str, Any]:
    """One JSONL row for Kitchen's tasks, from a normalised chat row.

    ``prompt`` is the conversation before the last assistant turn rendered with the generation prompt
    (what the model sees when sampling), ``continuation`` the trained tokens of that turn (its text and
    end-of-turn token), ``answer`` the row's checkable answer if it has one, else the turn's text.
    """
    messages = [dict(m) for m in row["messages"]]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("held-out row has no assistant message to evaluate against")
    tokenizer = lm.tokenizer
    tokens, mask = render_weighted_tokens(messages[: last + 1], tokenizer, "last_assistant")
    trained = [i for i, w in enumerate(mask) if w > 0]
    if not trained:
        raise ValueError("held-out row's last assistant turn has no tokens to score")
    prompt = lm.apply_chat_template(messages[:last], add_generation_prompt=True)
    continuation = tokenizer.decode(tokens[trained[0] : trained[-1] + 1], skip_special_tokens=False)
    user = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return {
        "prompt": prompt,
        "continuation": continuation,
        "answer": str(row.get("answer") or messages[last]["content"]),
        "question": user,
        "num_tokens": lm.continuation_length(prompt, continuation),
    }


def write_task_data(
    plan: EvalPlan, heldout_rows: Sequence[Mapping[str, Any]], lm: KitchenLM, out_dir: Path, limit: int
) -> dict[str, Path]:
    """Write each Kitchen task's JSONL (at most ``limit`` rows) and return task -> file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    written: dict[str, Path] = {}
    for task, source in plan.kitchen_sources.items():
        if source not in written:
            rows = heldout_rows if source == "heldout" else builtin_dataset(source)["test"]
            docs = [conversation_doc(row, lm) for row in list(rows)[:limit]]
            if not docs:
                raise ValueError(f"no rows to evaluate {task} on ({source} split is empty)")
            path = out_dir / f"{source.replace('/', '__')}.jsonl"
            path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
            written[source] = path
        files[task] = written[source]
    return files


def kitchen_task_config(
    task: str, data_file: Path, *, cache_dir: Path, max_gen_tokens: int
) -> dict[str, Any]:
    """A Kitchen task's YAML, loaded by lm-eval's loader, pointed at ``data_file``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=True)
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)}
    if config.get("output_type") == "generate_until":
        config["generation_kwargs"] = {**config.get("generation_kwargs", {}), "max_gen_toks": max_gen_tokens}
    return config


def check_task_data(names: Sequence[str]) -> None:
    """Load each lm-eval catalogue task once, so a dataset that cannot be fetched fails naming its task."""
    manager = task_manager(True)
    for name in names:
        try:
            manager.load([name])
        except Exception as err:
            if _unreachable(err):
                raise EvalTaskError(
                    f"lm-eval task {name!r}: its data could not be reached ({type(err).__name__}: {err}). "
                    "Tasks from lm-eval's catalogue download their datasets from the Hugging Face Hub; "
                    "run where the Hub is reachable (and HF_DATASETS_OFFLINE is unset) or drop the task."
                ) from err
            raise EvalTaskError(
                f"lm-eval task {name!r} could not be loaded: {type(err).__name__}: {err}"
            ) from err


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a network failure or offline mode."""
    import httpx
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds = (
        ConnectionError,
        TimeoutError,
        requests.ConnectionError,
        requests.Timeout,
        httpx.TransportError,
        OfflineModeIsEnabled,
        LocalEntryNotFoundError,
    )
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# -- evaluation ------------------------------------------------------------------------------------


@dataclass
class ModelResults:
    """One model's scores: flat metrics (held-out ones unqualified, others ``task/metric``)."""

    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    generations: list[dict[str, str]] = field(default_factory=list)
    lm_eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_model(
    lm: KitchenLM,
    plan: EvalPlan,
    data_files: Mapping[str, Path],
    *,
    limit: int,
    max_gen_tokens: int,
    cache_dir: Path,
) -> ModelResults:
    """Run ``plan`` on one model with ``lm_eval.simple_evaluate``: Kitchen's tasks in one call, lm-eval's
    catalogue tasks in another (they differ in chat templating). ``limit`` caps documents per task."""
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    common: dict[str, Any] = {
        "bootstrap_iters": 0,
        "log_samples": True,
        # Generation is greedy; leave the process's global RNGs alone (training shares the process).
        "random_seed": None,
        "numpy_random_seed": None,
        "torch_random_seed": None,
    }
    configs = [
        kitchen_task_config(task, data_files[task], cache_dir=cache_dir, max_gen_tokens=max_gen_tokens)
        for task in plan.kitchen_tasks
    ]
    outputs = {
        "kitchen": simple_evaluate(model=lm, tasks=configs, task_manager=task_manager(False), **common)
    }
    if plan.lm_eval_tasks:
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
        outputs["lm_eval"] = simple_evaluate(
            model=lm,
            tasks=list(plan.lm_eval_tasks),
            task_manager=task_manager(True),
            limit=limit,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            **common,
        )
    metrics: dict[str, float] = {}
    higher: dict[str, bool] = {}
    for output in outputs.values():
        if output is None:
            raise RuntimeError("lm-eval returned no results (non-zero rank?)")
        flat, directions = flatten_results(output, plan)
        metrics.update(flat)
        higher.update(directions)
    samples = outputs["kitchen"]["samples"][plan.generation_task]
    generations = [
        {"question": s["doc"]["question"], "reference": str(s["target"]), "output": _response(s)}
        for s in samples
    ]
    return ModelResults(
        metrics=metrics,
        higher_is_better=higher,
        generations=generations,
        lm_eval={name: json_safe(output) for name, output in outputs.items()},
        seconds=time.perf_counter() - started,
    )


def flatten_results(output: Mapping[str, Any], plan: EvalPlan) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval's ``{"results": {task: {"metric,filter": value}}}`` as flat names, with their direction."""
    metrics: dict[str, float] = {}
    higher: dict[str, bool] = {}
    directions = output.get("higher_is_better", {})
    for section in ("results", "groups"):
        for task, values in output.get(section, {}).items():
            for key, value in values.items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                metric, filter_name = key.split(",", 1)
                if metric.endswith("_stderr"):
                    continue
                name = report_metric_name(task, metric, filter_name, plan)
                metrics[name] = float(value)
                if metric in directions.get(task, {}):
                    higher[name] = bool(directions[task][metric])
    return metrics, higher


def report_metric_name(task: str, metric: str, filter_name: str, plan: EvalPlan) -> str:
    if filter_name == "none":
        if task == plan.generation_task and metric in _GENERATION_METRICS:
            return _GENERATION_METRICS[metric]
        if task == NLL_TASK and metric in _NLL_METRICS:
            return _NLL_METRICS[metric]
        return f"{task}/{metric}"
    return f"{task}/{metric},{filter_name}"


def _response(sample: Mapping[str, Any]) -> str:
    response = sample["filtered_resps"]
    while isinstance(response, list) and response:
        response = response[0]
    return str(response)


def json_safe(value: Any) -> Any:
    """lm-eval's outputs hold functions and numpy values; keep what JSON can say (as lm-eval does)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))
