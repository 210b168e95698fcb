"""RL with verifiable rewards as a plan: tinker-cookbook's ``rl/train.py`` loop, one step at a time.

Step N takes ``groups_per_batch`` problems (a seeded per-epoch shuffle), samples ``group_size``
completions of each from the policy the loop hands it (the weights after N steps when on-policy), checks
each reply with the reward function, turns rewards into group-relative advantages (reward minus the group
mean; ``advantage_norm="group"`` also divides by the group's std, as GRPO does), and trains on every
completion token with that advantage through a policy-gradient loss (``importance_sampling`` by default,
the sampler's logprobs as its ``logprobs``). Metrics carry tinker-cookbook's names.

``prepare`` is a pure function of (step, seed, policy): problems from ``EpochBatches``, sampling seeds
from ``sampling_seed``, so a resumed run samples exactly what the uninterrupted one did and reaches the
same weights; the plan keeps no state beyond the rollouts it logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tinker import types

from kitchen.contract import ResultFuture, TrainingClient
from kitchen.training.batching import EpochBatches
from kitchen.training.plan import PlanBase, PlanOutput, Policy, StepBatch
from kitchen.training.rollouts import Rollout, RolloutLog, action_datum, sample_groups, sample_train_kl
from kitchen.workflows.rl.rewards import Check, RewardRunner

HEADLINE = "env/all/reward/total"
#: TRL's GRPO: (r - mean) / (std + 1e-4).
STD_EPSILON = 1e-4
#: tinker-cookbook's ``_compute_by_group_metrics``: a constant group counts as good at or above this.
GOOD_THRESHOLD = 0.5
SAMPLE_GROUPS_SHOWN = 4

ROLLOUT_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("group", pa.int32()),
        ("sample", pa.int32()),
        ("problem", pa.int32()),
        ("policy_version", pa.int32()),
        ("staleness", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("completion", pa.string()),
        ("extracted", pa.string()),
        ("stop_reason", pa.string()),
        ("correct", pa.float32()),
        ("format", pa.float32()),
        ("reward", pa.float32()),
        ("advantage", pa.float32()),
        ("trained", pa.bool_()),
        ("reward_error", pa.string()),
        ("prompt_tokens", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class Problem:
    prompt_tokens: list[int]
    answer: str
    question: str


@dataclass(frozen=True)
class Scored:
    """One completion: what was sampled, how it was checked, its reward and advantage."""

    rollout: Rollout
    text: str
    check: Check
    format_ok: float
    reward: float
    advantage: float = 0.0


@dataclass
class RLBatch:
    """One step's groups (every group sampled, and which were trained on)."""

    groups: list[list[Scored]]
    problems: list[int]
    trained: list[bool]

    def trained_rollouts(self) -> list[Rollout]:
        return [s.rollout for g, keep in zip(self.groups, self.trained, strict=True) if keep for s in g]


@dataclass(frozen=True)
class RLSettings:
    group_size: int
    max_tokens: int
    temperature: float
    stop: list[int]
    loss: str
    loss_fn_config: dict[str, float]
    format_coef: float
    advantage_norm: str
    remove_constant_reward_groups: bool
    seed: int


def group_advantages(rewards: Sequence[float], norm: str) -> list[float]:
    """Reward minus the group's mean (tinker-cookbook's ``compute_advantages``); with ``norm="group"``
    divided by the group's standard deviation (Bessel-corrected, as ``torch.std``) + 1e-4, as TRL's GRPO."""
    values = np.asarray(rewards, dtype=np.float64)
    centered = values - values.mean()
    if norm == "group":
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        centered = centered / (std + STD_EPSILON)
    return [float(a) for a in centered]


def total_reward(correct: float, format_ok: float, format_coef: float) -> float:
    """tinker-cookbook's ``ProblemEnv``: ``format_coef * (format - 1) + correct``."""
    return format_coef * (format_ok - 1.0) + correct


def by_group_fractions(groups: Sequence[Sequence[float]]) -> dict[str, float]:
    """tinker-cookbook's ``_compute_by_group_metrics`` over the groups' rewards."""
    n = len(groups)
    mixed = good = bad = 0
    for rewards in groups:
        if len(set(rewards)) > 1:
            mixed += 1
        elif rewards and rewards[0] >= GOOD_THRESHOLD:
            good += 1
        else:
            bad += 1
    return {
        "by_group/frac_mixed": mixed / n if n else 0.0,
        "by_group/frac_all_good": good / n if n else 0.0,
        "by_group/frac_all_bad": bad / n if n else 0.0,
    }


@dataclass
class RLPlan(PlanBase):
    problems: list[Problem]
    batches: EpochBatches
    settings: RLSettings
    runner: RewardRunner
    tokenizer: Any = field(repr=False)
    dataset_hash: str = ""
    fingerprint_extra: dict[str, Any] = field(default_factory=dict)
    log: RolloutLog | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        problems: list[Problem],
        *,
        settings: RLSettings,
        runner: RewardRunner,
        tokenizer: Any,
        groups_per_batch: int,
        epochs: int,
        max_steps: int | None,
        max_staleness: int,
        dataset_hash: str,
        fingerprint_extra: Mapping[str, Any] | None = None,
    ) -> RLPlan:
        batches = EpochBatches(len(problems), groups_per_batch, epochs, settings.seed, max_steps)
        return cls(
            batches.total_steps,
            problems=problems,
            batches=batches,
            settings=settings,
            runner=runner,
            tokenizer=tokenizer,
            dataset_hash=dataset_hash,
            fingerprint_extra=dict(fingerprint_extra or {}),
            max_staleness=max_staleness,
            headline=HEADLINE,
        )

    def fingerprint(self) -> Mapping[str, Any]:
        s = self.settings
        return {
            "loss_fn": s.loss,
            **{f"loss_fn_config.{k}": v for k, v in sorted(s.loss_fn_config.items())},
            "dataset_hash": self.dataset_hash,
            "reward": self.runner.spec,
            "format_coef": s.format_coef,
            "group_size": s.group_size,
            "groups_per_batch": self.batches.batch_size,
            "epochs": self.batches.epochs,
            "max_steps": self.batches.max_steps or 0,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "advantage_norm": s.advantage_norm,
            "remove_constant_reward_groups": int(s.remove_constant_reward_groups),
            "max_steps_off_policy": self.max_staleness or 0,
            **self.fingerprint_extra,
        }

    def begin(self, run_dir: Path, step: int, state: Mapping[str, Any]) -> None:
        super().begin(run_dir, step, state)
        self.log = RolloutLog(run_dir / "rollouts", ROLLOUT_SCHEMA)
        self.log.discard_after(step)

    # -- a step ------------------------------------------------------------------------------------

    def prepare(self, step: int, policy: Policy | None) -> StepBatch:
        if policy is None:
            raise ValueError("the RL plan samples from the policy; the loop must hand it one")
        s = self.settings
        indices = self.batches.indices(step)
        params = types.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, stop=s.stop)
        sampled = sample_groups(
            policy.client,
            [self.problems[i].prompt_tokens for i in indices],
            group_size=s.group_size,
            params=params,
            seed=s.seed,
            step=step,
            policy_version=policy.version,
        )
        texts = [[self._decode(r.tokens) for r in group] for group in sampled]
        checks = iter(
            self.runner.check(
                [
                    (text, self.problems[i].answer)
                    for i, group in zip(indices, texts, strict=True)
                    for text in group
                ]
            )
        )
        groups: list[list[Scored]] = []
        for group, group_texts in zip(sampled, texts, strict=True):
            scored = []
            for rollout, text in zip(group, group_texts, strict=True):
                check = next(checks)
                format_ok = float(rollout.stop_reason == "stop") * check.format
                scored.append(
                    Scored(
                        rollout, text, check, format_ok, total_reward(check.correct, format_ok, s.format_coef)
                    )
                )
            advantages = group_advantages([x.reward for x in scored], s.advantage_norm)
            groups.append([_with_advantage(x, a) for x, a in zip(scored, advantages, strict=True)])
        trained = [True] * len(groups)
        if s.remove_constant_reward_groups:
            trained = [len({x.reward for x in g}) > 1 for g in groups]
            if not any(trained):
                trained[0] = True  # as tinker-cookbook: keep one group so the step has data
        datums = [
            action_datum(x.rollout, x.advantage)
            for g, keep in zip(groups, trained, strict=True)
            if keep
            for x in g
            if x.rollout.tokens
        ]
        return StepBatch(
            epoch=self.batches.epoch_of(step),
            datums=datums,
            extra=RLBatch(groups, indices, trained),
            policy_version=policy.version,
        )

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        s = self.settings
        return client.forward_backward(batch.datums, s.loss, loss_fn_config=s.loss_fn_config or None)

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        rl: RLBatch = batch.extra
        every = [x for g in rl.groups for x in g]
        trained = [r for r in rl.trained_rollouts() if r.tokens]
        action_tokens = sum(r.length for r in trained)
        loss_sum = float(output.metrics.get("loss:sum", float("nan")))
        n = len(every)
        values: dict[str, float] = {
            "loss": loss_sum / action_tokens if action_tokens else float("nan"),
            "trained_tokens": float(action_tokens),
            "env/all/reward/total": float(np.mean([x.reward for x in every])) if n else 0.0,
            "env/all/correct": float(np.mean([x.check.correct for x in every])) if n else 0.0,
            "env/all/format": float(np.mean([x.format_ok for x in every])) if n else 0.0,
            "env/all/ac_tokens_per_turn": float(np.mean([x.rollout.length for x in every])) if n else 0.0,
            "env/all/ob_tokens_per_turn": float(np.mean([len(x.rollout.prompt) for x in every]))
            if n
            else 0.0,
            "env/all/turns_per_episode": 1.0,
            "env/all/total_episodes": float(n),
            "env/all/total_turns": float(n),
            "env/all/total_ac_tokens": float(sum(x.rollout.length for x in every)),
            "env/all/total_ob_tokens": float(sum(len(x.rollout.prompt) for x in every)),
            "env/all/reward_errors": float(sum(1 for x in every if x.check.error)),
            **{
                f"env/all/{k}": v
                for k, v in by_group_fractions([[x.reward for x in g] for g in rl.groups]).items()
            },
        }
        if batch.policy_version is not None:
            version = float(batch.policy_version)
            values |= {
                "sampling_client/step_max": version,
                "sampling_client/step_min": version,
                "sampling_client/step_mean": version,
            }
        values.update(sample_train_kl(trained, output))
        return values

    def on_step_complete(
        self, step: int, batch: StepBatch, output: types.ForwardBackwardOutput, metrics: Mapping[str, float]
    ) -> None:
        if self.log is None:
            raise RuntimeError("begin() was not called")
        self.log.write(step + 1, self._rows(step, batch))

    def outputs(self) -> dict[str, PlanOutput]:
        if self.log is None:
            return {}
        self.runner.close()
        manifest = self.log.manifest()
        steps = self.log.steps()
        last = self.log.read(steps[-1:]).to_pylist() if steps else []
        shown = [r for r in last if r["group"] < SAMPLE_GROUPS_SHOWN]
        table = markdown_rows(
            [
                {
                    "group": r["group"],
                    "question": r["question"],
                    "answer": r["answer"],
                    "completion": r["completion"],
                    "reward": r["reward"],
                    "advantage": r["advantage"],
                    "stop": r["stop_reason"],
                }
                for r in shown
            ]
        )
        return {
            "rollouts": PlanOutput(
                manifest=manifest,
                metadata={
                    "steps": manifest.steps,
                    "rollouts": manifest.rows,
                    "path": manifest.path,
                    "content_hash": manifest.content_hash,
                    "reward_errors": self.runner.errors,
                    "reward_timeouts": self.runner.timeouts,
                },
                markdown={f"last_step_rollouts (step {steps[-1] if steps else 0})": table},
            )
        }

    # -- helpers -----------------------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def _rows(self, step: int, batch: StepBatch) -> list[dict[str, Any]]:
        rl: RLBatch = batch.extra
        rows = []
        for g, (group, problem, keep) in enumerate(zip(rl.groups, rl.problems, rl.trained, strict=True)):
            p = self.problems[problem]
            for k, x in enumerate(group):
                r = x.rollout
                rows.append(
                    {
                        "step": step + 1,
                        "group": g,
                        "sample": k,
                        "problem": problem,
                        "policy_version": r.policy_version,
                        "staleness": r.staleness(step),
                        "question": p.question,
                        "answer": p.answer,
                        "completion": x.text,
                        "extracted": x.check.extracted,
                        "stop_reason": r.stop_reason,
                        "correct": x.check.correct,
                        "format": x.format_ok,
                        "reward": x.reward,
                        "advantage": x.advantage,
                        "trained": keep,
                        "reward_error": x.check.error,
                        "prompt_tokens": r.prompt,
                        "tokens": r.tokens,
                        "logprobs": r.logprobs,
                    }
                )
        return rows


def _with_advantage(scored: Scored, advantage: float) -> Scored:
    return Scored(scored.rollout, scored.text, scored.check, scored.format_ok, scored.reward, advantage)


def markdown_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """A small GitHub-style table (the library cannot use the Dagster layer's helper)."""
    if not rows:
        return "_(no rollouts)_"
    cols = list(rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ⏎ ")[:160]

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
