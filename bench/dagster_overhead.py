"""Dagster's share: ``kitchen run supervised`` against the same work done by the library alone.

    python bench/dagster_overhead.py [--max-steps 20] [--eval-examples 20] [--repeats 1] [--model-cache DIR]

Subprocesses train the same small supervised config (the built-in ``kitchen/arithmetic`` dataset,
``--max-steps`` steps, ``--eval-examples`` held-out examples, seed 0, every other setting the workflow's
default), each in a fresh ``KITCHEN_HOME`` (a temporary directory, so a fresh Dagster instance, MLflow
store, dataset and datum caches):

- ``kitchen run, fresh home``: the real command line, ``python -m kitchen.cli run supervised ...``:
  argument checks, the Dagster code location, the persistent instance, preflight, the job executed in
  process through the IO manager (manifests), telemetry (JSONL, MLflow, the Dagster event log), the
  quality-gate check and MLflow registration. A user's first run in a home: it creates the Dagster
  instance's and the MLflow store's SQLite databases.
- ``kitchen run, stores ready``: the same, in a fresh home whose Dagster instance and MLflow store were
  created beforehand (untimed), as every later run in a home finds them.
- ``bare``: this script again (``--bare``), calling in order the library functions the assets call, with no
  Dagster and no MLflow imported (checked): ``resolve_base_model``, the workflow's ``load_dataset`` and
  ``save_dataset``, ``build_datums`` and ``save_datums``, the workflow's ``build_plan`` (a
  ``SupervisedPlan``) and ``run_training`` on a ``LocalServiceClient``, then the workflow's ``evaluate``.

Phases: ``kitchen``'s come from its telemetry JSONL (``kitchen.stage.stop`` durations, Dagster's own step
timestamps; "process start" is from spawning the process to ``kitchen.workflow.start``, so it holds the
imports, the CLI's checks and the run's creation; "between steps" is the run's time outside any step);
``bare``'s are wall-clock stamps taken between its calls. Exit is the last stamp to the process's end.
Overhead = (kitchen - bare) / bare on whole-process wall times, and on CPU time (user + system, from
``getrusage``), which a shared machine's load distorts less. Both must train the same numbers: every
step's loss and every held-out metric are compared, and a mismatch is printed (not the same work).

Model dequantization (about 40 s the first time a home sees the packaged GGUF) is excluded: before timing,
a subprocess resolves the base model once into ``--model-cache`` (a Kitchen home; default
``$KITCHEN_HOME``, else ``~/.kitchen``, so ``make bench`` reuses what ``make run`` made) and reads its
files once (page cache); each fresh home then gets that model directory as a symlink under ``models/``,
so both paths resolve the packaged model exactly as a user's second run does. With ``--repeats N`` the
runs rotate their order each round and the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = (
    ("start", "process start, imports (kitchen: + CLI checks, run creation)"),
    ("base_model", "base model (resolve)"),
    ("dataset", "dataset (load, save)"),
    ("datums", "datums (render, save)"),
    ("training", "training (plan, run_training)"),
    ("evaluation", "evaluation (base + trained; kitchen: + gate check)"),
    ("registration", "registration (MLflow)"),
    ("between", "Dagster between steps"),
    ("exit", "exit (kitchen: summary)"),
)
#: The Dagster step (op) of each kitchen phase.
STEP_PHASES = {
    "base_model": "base_model",
    "dataset": "dataset",
    "datums": "datums",
    "train": "training",
    "eval_report": "evaluation",
    "eval_report_quality_gate": "evaluation",
    "registered_model": "registration",
}
#: Outside services kept out of both runs; the bench's config is all in flags.
CLEARED_ENV = (
    "DAGSTER_HOME",
    "MLFLOW_TRACKING_URI",
    "KITCHEN_BACKEND",
    "KITCHEN_CODE_LOCATION",
    "KITCHEN_TELEMETRY_SINKS",
    "KITCHEN_FEEDBACK",
)
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TINKER_TELEMETRY": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(QUIET_ENV)
    env["KITCHEN_HOME"] = str(home)
    return env


# --- the bare path (runs in its own process: ``--bare``) -------------------------------------------


def run_bare(config_values: dict[str, Any], result_path: Path) -> None:
    """The supervised workflow's library calls in the assets' order; writes phases and numbers as JSON."""
    stamps: dict[str, float] = {}
    from kitchen.data import (
        build_datums,
        load_saved_dataset,
        save_dataset,
        save_datums,
        tokenizer_fingerprint,
    )
    from kitchen.models.base import resolve_base_model
    from kitchen.training.loop import TrainingSpec, run_training
    from kitchen.workflows import EvalContext, PlanContext
    from kitchen.workflows.config import section_of
    from kitchen.workflows.supervised import SUPERVISED
    from resources.local_engine import LocalServiceClient

    workflow = SUPERVISED
    config = workflow.config(**config_values)
    sections: dict[str, Any] = {kind: section_of(config, cls) for kind, cls in workflow.sections.items()}
    stamps["start"] = time.time()

    base_model = resolve_base_model(sections["base_model"].model)
    stamps["base_model"] = time.time()

    loaded = workflow.load_dataset(sections["dataset"])
    dataset = loaded.manifest(save_dataset(loaded))
    stamps["dataset"] = time.time()

    datums_section = sections["datums"]
    from transformers import AutoTokenizer  # as the datums asset loads it

    tokenizer = AutoTokenizer.from_pretrained(base_model.tokenizer_path)
    built = build_datums(
        load_saved_dataset(dataset.path),
        tokenizer,
        train_on=datums_section.train_on,
        max_length=datums_section.max_length,
    )
    datums = save_datums(built, tokenizer_fingerprint(tokenizer))
    stamps["datums"] = time.time()

    train = sections["train"]
    service = LocalServiceClient()
    plan = workflow.build_plan(
        PlanContext(
            config=train, base_model=base_model, inputs={"datums": datums}, service=service, log=print
        )
    )
    learning_rate = train.learning_rate or workflow.default_learning_rate(base_model)
    spec = TrainingSpec.from_section(train, base_model, learning_rate)
    run_dir = Path(os.environ["KITCHEN_HOME"]) / "runs" / workflow.name / "bare"
    try:
        result = run_training(service, spec, plan, run_dir, key="bare", resume=False)
    finally:
        service.close()
    checkpoints, weights = result.manifests(spec, backend="local", run_name=run_dir.name, epochs=train.epochs)
    stamps["training"] = time.time()

    out_dir = Path(os.environ["KITCHEN_HOME"]) / "reports" / "bare"
    out_dir.mkdir(parents=True, exist_ok=True)
    service = LocalServiceClient()
    try:
        evaluation = workflow.evaluate(
            EvalContext(
                config=sections["eval_report"],
                base_model=base_model,
                dataset=dataset,
                checkpoints=checkpoints,
                weights=weights,
                inputs={},
                service=service,
                out_dir=out_dir,
                log=print,
            )
        )
    finally:
        service.close()
    stamps["evaluation"] = time.time()

    result_path.write_text(
        json.dumps(
            {
                "stamps": stamps,
                "losses": [m.loss for m in result.metrics],
                "base": evaluation.base,
                "trained": evaluation.trained,
                "imported": sorted(m for m in ("dagster", "mlflow") if m in sys.modules),
            }
        )
    )


# --- the parent: warm the model cache, run both, compare ---------------------------------------------


def warm_model_cache(cache: Path) -> Path:
    """Resolve the packaged model into ``cache`` (a Kitchen home) in a subprocess, read its files once, and
    return its directory."""
    code = (
        "from pathlib import Path\n"
        "from kitchen.models.base import DEFAULT_MODEL, resolve_base_model\n"
        "path = Path(resolve_base_model(DEFAULT_MODEL).backend_model)\n"
        "for f in sorted(path.iterdir()):\n"
        "    with f.open('rb') as h:\n"
        "        while h.read(1 << 24): pass\n"
        "print(path)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(cache), check=True, capture_output=True, text=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def timed(command: list[str], home: Path) -> tuple[subprocess.CompletedProcess[str], float, float, float]:
    """Run ``command``; (result, spawn time, end time, its CPU seconds: user + system, children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spawned = time.time()
    done = subprocess.run(command, env=child_env(home), capture_output=True, text=True)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, spawned, ended, cpu


def fresh_home(model_dir: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="kitchen-overhead-"))
    (home / "models").mkdir()
    (home / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    return home


def prepare_stores(home: Path) -> None:
    """Create ``home``'s Dagster instance and MLflow store as a first run leaves them (untimed)."""
    code = (
        "from kitchen.cli.instance import prepare_dagster_home\n"
        "from kitchen.registry.store import ModelRegistry, default_tracking_uri\n"
        "prepare_dagster_home()\n"
        "ModelRegistry(default_tracking_uri()).client\n"
    )
    subprocess.run([sys.executable, "-c", code], env=child_env(home), check=True, capture_output=True)


def flags(config: dict[str, Any]) -> list[str]:
    return [part for name, value in config.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def run_kitchen(config: dict[str, Any], home: Path) -> dict[str, Any]:
    from kitchen.training.loop import read_metrics

    command = [sys.executable, "-m", "kitchen.cli", "run", "supervised", *flags(config)]
    done, spawned, ended, cpu = timed(command, home)
    reports = list((home / "reports" / "supervised").glob("*/report.json"))
    gate_failed = bool(reports) and not json.loads(reports[0].read_text())["gate"]["passed"]
    if done.returncode != 0 and not (done.returncode == 1 and gate_failed):
        raise SystemExit(
            f"kitchen run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    if gate_failed:
        print("# kitchen run: the quality gate failed, so nothing was registered (registration 0 s)")
    (telemetry_file,) = (home / "telemetry").glob("*.jsonl")
    events = [json.loads(line) for line in telemetry_file.read_text().splitlines() if line.strip()]
    phases = dict.fromkeys((name for name, _ in PHASES), 0.0)
    run_start = next(e["timestamp"] for e in events if e["name"] == "kitchen.workflow.start")
    run_stop = next(e for e in events if e["name"] == "kitchen.workflow.stop")
    for event in events:
        if event["name"] == "kitchen.stage.stop":
            step = event["metadata"]["stage"].removeprefix("supervised__")
            phases[STEP_PHASES[step]] += event["measurements"]["duration_seconds"]
    in_steps = sum(phases[p] for p in set(STEP_PHASES.values()))
    phases["start"] = run_start - spawned
    phases["between"] = run_stop["measurements"]["duration_seconds"] - in_steps
    phases["exit"] = ended - run_stop["timestamp"]
    (metrics_file,) = (home / "runs" / "supervised").glob("*/metrics.jsonl")
    report = json.loads(reports[0].read_text())
    return {
        "total": ended - spawned,
        "cpu": cpu,
        "phases": phases,
        "losses": [m.loss for m in read_metrics(metrics_file)],
        "base": report["base"],
        "trained": report["trained"],
    }


def run_bare_process(config: dict[str, Any], home: Path) -> dict[str, Any]:
    result_path = home / "bare-result.json"
    command = [sys.executable, __file__, "--bare", json.dumps(config), "--result", str(result_path)]
    done, spawned, ended, cpu = timed(command, home)
    if done.returncode != 0:
        raise SystemExit(f"bare run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    if result["imported"]:
        raise SystemExit(f"the bare path imported {', '.join(result['imported'])}: not a bare path")
    stamps, phases, last = result["stamps"], dict.fromkeys((name for name, _ in PHASES), 0.0), spawned
    for name, stamp in stamps.items():
        phases[name], last = stamp - last, stamp
    phases["exit"] = ended - last
    kept = {k: v for k, v in result.items() if k != "stamps"}
    return {"total": ended - spawned, "cpu": cpu, **kept, "phases": phases}


def same_numbers(kitchen: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    """What differs between the two runs' results (empty: the same work)."""
    problems = []
    if kitchen["losses"] != bare["losses"]:
        problems.append(f"per-step losses differ: kitchen {kitchen['losses']} vs bare {bare['losses']}")
    for label in ("base", "trained"):
        if kitchen[label] != bare[label]:
            problems.append(f"{label} metrics differ: kitchen {kitchen[label]} vs bare {bare[label]}")
    return problems


VARIANTS = {
    "kitchen": "kitchen run, fresh home",
    "kitchen-ready": "kitchen run, stores ready",
    "bare": "bare library",
}


def run_variant(variant: str, config: dict[str, Any], model_dir: Path, keep: bool) -> dict[str, Any]:
    home = fresh_home(model_dir)
    try:
        if variant == "bare":
            return run_bare_process(config, home)
        if variant == "kitchen-ready":
            prepare_stores(home)
        return run_kitchen(config, home)
    finally:
        if keep:
            print(f"# {variant} home: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def print_table(runs: dict[str, list[dict[str, Any]]]) -> None:
    def median(name: str, phase: str) -> float:
        values = [r[phase] if phase in ("total", "cpu") else r["phases"][phase] for r in runs[name]]
        return statistics.median(values)

    print("| phase (seconds) | " + " | ".join(VARIANTS.values()) + " |")
    print("|---|" + "---:|" * len(VARIANTS))
    for phase, label in PHASES:
        print(f"| {label} | " + " | ".join(f"{median(v, phase):.1f}" for v in VARIANTS) + " |")
    totals = {v: median(v, "total") for v in VARIANTS}
    cpus = {v: median(v, "cpu") for v in VARIANTS}
    print("| **total (wall)** | " + " | ".join(f"**{t:.1f}**" for t in totals.values()) + " |")
    print("| CPU time (user + system) | " + " | ".join(f"{t:.1f}" for t in cpus.values()) + " |")
    print()
    for variant in ("kitchen", "kitchen-ready"):
        wall, bare = totals[variant], totals["bare"]
        cpu, bare_cpu = cpus[variant], cpus["bare"]
        print(
            f"overhead, {VARIANTS[variant]}: (kitchen - bare) / bare = "
            f"({wall:.1f} - {bare:.1f}) / {bare:.1f} = {(wall - bare) / bare:+.1%} wall, "
            f"{(cpu - bare_cpu) / bare_cpu:+.1%} CPU time"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--eval-examples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs; medians")
    parser.add_argument(
        "--model-cache",
        default=None,
        help="Kitchen home holding the dequantized model (default: $KITCHEN_HOME)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes (paths printed)")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare is not None:
        run_bare(json.loads(args.bare), Path(args.result))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from kitchen.home import kitchen_home

    config = {"max_steps": args.max_steps, "eval_examples": args.eval_examples, "seed": args.seed}
    cache = Path(args.model_cache).expanduser().resolve() if args.model_cache else kitchen_home()
    model_dir = warm_model_cache(cache)
    load = os.getloadavg()
    print(
        f"# kitchen run supervised {' '.join(flags(config))} vs the bare library path; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; "
        f"model {model_dir}"
    )
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(args.repeats):
        for variant in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
            runs[variant].append(run_variant(variant, config, model_dir, args.keep))
            print(f"# repeat {repeat + 1} {variant}: {runs[variant][-1]['total']:.1f} s", flush=True)

    load = os.getloadavg()
    print(f"\n# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; medians of {args.repeats}")
    print_table(runs)
    problems = [
        f"{variant}: {problem}"
        for variant in ("kitchen", "kitchen-ready")
        for k, b in zip(runs[variant], runs["bare"], strict=True)
        for problem in same_numbers(k, b)
    ]
    first = runs["bare"][0]
    if problems:
        print("NOT the same work:\n  " + "\n  ".join(problems))
    else:
        print(
            f"same work: every run's {len(first['losses'])} step losses are equal (final "
            f"{first['losses'][-1]:.4f}), and its held-out metrics (trained nll "
            f"{first['trained'].get('nll', float('nan')):.4f}, exact_match "
            f"{first['trained'].get('exact_match', float('nan')):.4f})"
        )


if __name__ == "__main__":
    main()
