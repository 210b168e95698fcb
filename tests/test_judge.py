"""The pairwise judge (kitchen.eval.judge): a scripted stand-in judge checks the arithmetic, the order swap
and the counting of unparseable verdicts; one run of the supervised graph shows the judge end to end."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from kitchen.eval.judge import judge_pairs, parse_verdict
from kitchen.ports.llm import ChatMessage, LLMError, LLMResponse
from kitchen.workflows.config import EvalSection
from kitchen.workflows.supervised.config import SupervisedConfig, SupervisedEvalSection, smoke_run_config

Script = Callable[[str, str], str]


class ScriptedJudge:
    """Answers by a script on (reply A, reply B), read back out of the prompt it was sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[tuple[str, str]] = []

    @property
    def model_id(self) -> str:
        return "scripted"

    def chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> LLMResponse:
        text = messages[-1]["content"]
        found = re.search(r"\[Reply A\]\n(.*)\n\n\[Reply B\]\n(.*)\n\nWhich", text, re.DOTALL)
        assert found, text
        a, b = found.group(1), found.group(2)
        self.seen.append((a, b))
        return LLMResponse(self.script(a, b), "scripted", 10, 1, 0.0)


def prefers_good(a: str, b: str) -> str:
    if ("good" in a) == ("good" in b):
        return "T"
    return "A" if "good" in a else "B"


def sample(question: str, base: str, trained: str) -> dict[str, str]:
    return {"question": question, "reference": "", "base": base, "trained": trained}


SAMPLES = [
    sample("q1", base="bad 1", trained="good 1"),  # win
    sample("q2", base="good 2", trained="bad 2"),  # loss
    sample("q3", base="good 3a", trained="good 3b"),  # tie
    sample("q4", base="bad 4", trained="good 4"),  # win
]


def test_win_rate_ties_and_confidence_interval_from_a_consistent_judge() -> None:
    metrics = judge_pairs(ScriptedJudge(prefers_good), SAMPLES).metrics()
    # Prompt scores 1, 0, 0.5, 1: mean 0.625; sample sd sqrt(0.6875 / 3); half width 1.96 * sd / 2.
    half = 1.959963984540054 * math.sqrt(0.6875 / 3) / 2
    assert metrics["judge_win_rate"] == pytest.approx(0.625)
    assert metrics["judge_win_rate_ci_low"] == pytest.approx(0.625 - half)
    assert metrics["judge_win_rate_ci_high"] == 1.0  # 0.625 + 0.469, clipped
    assert (metrics["judge_wins"], metrics["judge_ties"], metrics["judge_losses"]) == (0.5, 0.25, 0.25)
    assert metrics["judge_consistency"] == 1.0
    assert (metrics["judge_examples"], metrics["judge_scored"], metrics["judge_unparseable"]) == (4, 4, 0)


def test_each_prompt_is_shown_in_both_orders() -> None:
    judge = ScriptedJudge(prefers_good)
    result = judge_pairs(judge, SAMPLES[:1])
    assert judge.seen == [("good 1", "bad 1"), ("bad 1", "good 1")]  # trained first, then base first
    first, second = result.prompts[0].verdicts
    assert (first["order"], first["verdict"], first["winner"]) == ("trained_first", "A", "trained")
    assert (second["order"], second["verdict"], second["winner"]) == ("base_first", "B", "trained")
    assert "[Reply A]\ngood 1" in first["messages"][-1]["content"]  # the prompts are kept for audit


def test_a_judge_that_always_picks_the_first_reply_cancels_out() -> None:
    metrics = judge_pairs(ScriptedJudge(lambda a, b: "A"), SAMPLES).metrics()
    assert metrics["judge_win_rate"] == 0.5 and metrics["judge_ties"] == 1.0
    assert metrics["judge_consistency"] == 0.0
    assert metrics["judge_win_rate_ci_low"] == metrics["judge_win_rate_ci_high"] == 0.5


def test_unparseable_verdicts_are_counted_not_scored() -> None:
    def off_format_when_base_first(a: str, b: str) -> str:
        return "I cannot decide." if a.startswith("bad") else prefers_good(a, b)

    metrics = judge_pairs(ScriptedJudge(off_format_when_base_first), SAMPLES).metrics()
    # Base-first prompts with a bad base reply (q1, q4) lose one verdict; q2's trained-first order does.
    assert metrics["judge_unparseable"] == 3
    assert metrics["judge_scored"] == 4  # every prompt still has one parsed order
    assert metrics["judge_win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert metrics["judge_consistency"] == 1.0  # only q3 has both orders parsed, and they agree


def test_no_parsed_verdict_gives_no_rate_rather_than_a_zero() -> None:
    metrics = judge_pairs(ScriptedJudge(lambda a, b: "Both replies are fine."), SAMPLES).metrics()
    assert "judge_win_rate" not in metrics and metrics["judge_unparseable"] == 8


def test_a_failing_judge_call_is_counted_and_a_judge_that_always_fails_raises() -> None:
    calls = {"n": 0}

    class Flaky(ScriptedJudge):
        def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> LLMResponse:
            calls["n"] += 1
            if calls["n"] == 1:
                raise LLMError("http://judge: no reply within 5 s after 3 attempt(s)")
            return super().chat(messages, **kwargs)

    result = judge_pairs(Flaky(prefers_good), SAMPLES[:1])
    assert result.metrics()["judge_unparseable"] == 1 and result.prompts[0].verdicts[0]["error"]

    class Down(ScriptedJudge):
        def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> LLMResponse:
            raise LLMError("http://judge: cannot connect")

    with pytest.raises(LLMError, match="failed on every call"):
        judge_pairs(Down(prefers_good), SAMPLES[:2])


@pytest.mark.parametrize(
    ("text", "verdict"),
    [("A", "A"), ("B.", "B"), ("Verdict: T", "T"), ("tie", "T"), ("  b", "B"), ("Answer", None), ("", None)],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_gating_on_the_judge_needs_the_judge() -> None:
    with pytest.raises(ValidationError, match="add --judge"):
        SupervisedEvalSection(gate_metric="judge_win_rate")
    assert SupervisedEvalSection(gate_metric="judge_win_rate", judge=True).judge
    with pytest.raises(ValidationError, match="unknown metric"):
        EvalSection(gate_metric="judge_win_rate")  # other workflows have no judge


# -- end to end: the supervised graph with --judge and --decontaminate -------------------------------


def test_supervised_graph_with_judge_and_decontamination(tiny_model_dir: Path) -> None:
    from kitchen.workflows import get_workflow, split_run_config
    from kitchen_assets.factory import op_configs
    from kitchen_assets.io import ManifestIOManager, read_manifest
    from kitchen_assets.workflows import workflow_assets
    from resources.embeddings import EmbeddingsResource
    from resources.llm import KitchenSamplingLLM
    from resources.mlflow_registry import MlflowRegistry
    from resources.training import LocalBackend
    from resources.vector_store import InMemoryVectorStore

    class Embeddings(EmbeddingsResource):
        @property
        def model_id(self) -> str:
            return "stand-in"

        def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
            # One direction per operator: every "+" question is a near copy of every other.
            rows = [[float("+" in t), float("-" in t), float("*" in t), 1e-3] for t in texts]
            array = np.asarray(rows, dtype=np.float32)
            return array / np.linalg.norm(array, axis=1, keepdims=True)

    workflow = get_workflow("supervised")
    flat = SupervisedConfig(
        **{
            **smoke_run_config(str(tiny_model_dir)),
            "max_steps": 2,
            "eval_examples": 3,
            "judge": True,
            "judge_examples": 2,
            "decontaminate": True,
            "decontaminate_threshold": 0.999,
            "decontaminate_keep": True,
        }
    )
    keys = ["base_model", "dataset", "datums", "checkpoints", "trained_weights", "eval_report"]
    ops = split_run_config(flat, op_configs(workflow))
    run_config = {"ops": {op: c for op, c in ops.items() if op != "supervised__registered_model"}}
    result = dg.materialize(
        workflow_assets(workflow),
        selection=[dg.AssetKey(["supervised", k]) for k in keys],
        run_config=run_config,
        resources={
            "training": LocalBackend(),
            "registry": MlflowRegistry(),
            "io_manager": ManifestIOManager(),
            "embeddings": Embeddings(),
            "vector_store": InMemoryVectorStore(),
            "llm": KitchenSamplingLLM(model=str(tiny_model_dir)),
        },
    )
    assert result.success
    metadata = {
        e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()
    }
    dataset = read_manifest(dg.AssetKey(["supervised", "dataset"]))
    near = dataset.decontamination
    assert near["model"] == "stand-in" and near["threshold"] == 0.999 and near["dropped"] == 0
    assert near["flagged"] > 0 and near["pairs"] and near["flagged"] <= dataset.test_rows
    assert metadata["dataset"]["dedup"].value["mode"] == "all"
    assert metadata["dataset"]["decontamination"].value["flagged"] == near["flagged"]

    report = read_manifest(dg.AssetKey(["supervised", "eval_report"]))
    assert report.judge_model and str(tiny_model_dir.name) in report.judge_model
    saved = json.loads(Path(report.report_path).read_text())
    judge = saved["judge"]
    assert judge["model"] == report.judge_model and "impartial judge" in judge["rubric"]
    counted = judge["metrics"]
    assert counted["judge_examples"] == 2
    verdicts = json.loads(Path(saved["outputs"]["judge"]).read_text())["prompts"]
    assert len(verdicts) == 2 and all(len(p["verdicts"]) == 2 for p in verdicts)
    unparseable = sum(v["winner"] is None for p in verdicts for v in p["verdicts"])
    assert counted["judge_unparseable"] == unparseable  # a random tiny model answers off-format: counted
    if "judge_win_rate" in counted:
        assert report.base["judge_win_rate"] == 0.5
        assert report.trained["judge_win_rate"] == counted["judge_win_rate"]
    assert "judge" in metadata["eval_report"]


def test_the_judge_model_is_in_the_registered_versions_lineage(tmp_path: Path) -> None:
    from dataclasses import replace

    from test_registry_support import fake_trained_model, provenance

    from kitchen.registry.lineage import lineage_tags

    model = fake_trained_model(tmp_path, seed=1, exact_match=0.5)
    assert "kitchen.eval.judge_model" not in lineage_tags(model, provenance("r1"), weights_id="w")
    judged = replace(
        model, eval_report=model.eval_report.model_copy(update={"judge_model": "gpt-x@http://j/v1"})
    )
    assert (
        lineage_tags(judged, provenance("r1"), weights_id="w")["kitchen.eval.judge_model"]
        == "gpt-x@http://j/v1"
    )
