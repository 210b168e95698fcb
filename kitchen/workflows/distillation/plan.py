"""On-policy distillation as a plan: the student samples, the teacher scores the same tokens, and every
sampled token's advantage is its negative reverse KL (tinker-cookbook ``distillation/train_on_policy.py``).

Per step: ``batch_size`` prompts, ``group_size`` completions each, sampled from the weights after the
previous step (``max_staleness`` 0) with the shared rollout machinery (``kitchen.training.rollouts``). The
teacher's ``compute_logprobs`` on prompt + completion gives ``log q(token)`` for exactly the sampled
token ids; the advantage of completion token t is ``-kl_coef * (log p_t - log q_t)`` (optionally the
discounted sum of that over the tokens from t on), prompt tokens get 0, and the loss is
``importance_sampling``. On-policy the importance ratio is 1, so the loss per completion token is
``kl_coef * teacher_kl`` without discounting.

Metrics, under the reference's names: ``teacher_kl`` (the masked mean reverse KL per completion token),
``optim/kl_sample_train_v1``/``_v2`` and ``optim/entropy`` (``sample_train_kl``), and the trajectory
counts ``env/all/ac_tokens_per_turn``, ``env/all/ob_tokens_per_turn``, ``env/all/total_ac_tokens``,
``env/all/total_episodes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tinker import types

from kitchen.contract import ResultFuture, SamplingClient, TrainingClient
from kitchen.training.batching import EpochBatches
from kitchen.training.plan import PlanBase, Policy, StepBatch
from kitchen.training.rollouts import Rollout, action_datum, sample_groups, sample_train_kl


def reverse_kl_advantages(
    student: Sequence[float], teacher: Sequence[float], *, kl_coef: float, discount: float = 0.0
) -> list[float]:
    """Per completion token: ``-kl_coef * (student - teacher)``, and with ``discount`` > 0 the discounted
    sum of those from the token on (``sum_k discount^k * a_{t+k}``, tinker-cookbook's
    ``discounted_future_sum_vectorized``, over the completion only)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student logprobs for {len(teacher)} teacher logprobs")
    per_token = [-kl_coef * (float(s) - float(t)) for s, t in zip(student, teacher, strict=True)]
    if discount <= 0:
        return per_token
    running = 0.0
    out = [0.0] * len(per_token)
    for i in range(len(per_token) - 1, -1, -1):
        running = per_token[i] + discount * running
        out[i] = running
    return out


def teacher_completion_logprobs(teacher: SamplingClient, rollouts: Sequence[Rollout]) -> list[list[float]]:
    """The teacher's ``log q`` of each rollout's sampled tokens given its prompt and the tokens before them.

    Every request is submitted before any is awaited (the local engine batches them; Tinker pipelines)."""
    futures = [teacher.compute_logprobs(types.ModelInput.from_ints([*r.prompt, *r.tokens])) for r in rollouts]
    scored = []
    for rollout, future in zip(rollouts, futures, strict=True):
        values = future.result()[len(rollout.prompt) :]
        if len(values) != rollout.length or any(v is None for v in values):
            raise ValueError("the teacher returned no logprob for a sampled token")
        scored.append([float(v) for v in values])  # type: ignore[arg-type]
    return scored


@dataclass(frozen=True)
class DistillBatch:
    rollouts: list[Rollout]
    reverse_kl: list[list[float]]
    """Per rollout, per completion token: ``log p_student - log q_teacher``."""
    empty: int = 0


@dataclass
class OnPolicyDistillationPlan(PlanBase):
    prompts: list[list[int]]
    batches: EpochBatches
    teacher: SamplingClient
    group_size: int
    max_tokens: int
    temperature: float
    kl_coef: float
    kl_discount: float
    seed: int
    prompts_hash: str
    teacher_hash: str

    @classmethod
    def build(
        cls,
        prompts: list[list[int]],
        teacher: SamplingClient,
        *,
        batch_size: int,
        epochs: int,
        max_steps: int | None,
        group_size: int,
        max_tokens: int,
        temperature: float,
        kl_coef: float,
        kl_discount: float,
        seed: int,
        prompts_hash: str,
        teacher_hash: str,
    ) -> OnPolicyDistillationPlan:
        batches = EpochBatches(len(prompts), batch_size, epochs, seed, max_steps)
        return cls(
            batches.total_steps,
            prompts=prompts,
            batches=batches,
            teacher=teacher,
            group_size=group_size,
            max_tokens=max_tokens,
            temperature=temperature,
            kl_coef=kl_coef,
            kl_discount=kl_discount,
            seed=seed,
            prompts_hash=prompts_hash,
            teacher_hash=teacher_hash,
            max_staleness=0,
            headline="teacher_kl",
        )

    def fingerprint(self) -> Mapping[str, Any]:
        b = self.batches
        return {
            "loss_fn": "importance_sampling",
            "mode": "on_policy",
            "prompts_hash": self.prompts_hash,
            "teacher_hash": self.teacher_hash,
            "batch_size": b.batch_size,
            "epochs": b.epochs,
            "max_steps": b.max_steps,
            "group_size": self.group_size,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "kl_coef": self.kl_coef,
            "kl_discount": self.kl_discount,
        }

    def prepare(self, step: int, policy: Policy | None) -> StepBatch:
        if policy is None:
            raise RuntimeError("on-policy distillation samples from the policy; the loop gave none")
        prompts = [self.prompts[i] for i in self.batches.indices(step)]
        params = types.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)
        groups = sample_groups(
            policy.client,
            prompts,
            group_size=self.group_size,
            params=params,
            seed=self.seed,
            step=step,
            policy_version=policy.version,
        )
        sampled = [r for group in groups for r in group]
        rollouts = [r for r in sampled if r.tokens]
        if not rollouts:
            raise ValueError(f"step {step}: every sampled completion was empty; nothing to train on")
        teacher = teacher_completion_logprobs(self.teacher, rollouts)
        reverse_kl = [
            [s - t for s, t in zip(r.logprobs, q, strict=True)]
            for r, q in zip(rollouts, teacher, strict=True)
        ]
        datums = [
            action_datum(
                r, reverse_kl_advantages(r.logprobs, q, kl_coef=self.kl_coef, discount=self.kl_discount)
            )
            for r, q in zip(rollouts, teacher, strict=True)
        ]
        return StepBatch(
            epoch=self.batches.epoch_of(step),
            datums=datums,
            extra=DistillBatch(rollouts, reverse_kl, empty=len(sampled) - len(rollouts)),
            policy_version=policy.version,
        )

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        return client.forward_backward(batch.datums, "importance_sampling")

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        extra = batch.extra
        assert isinstance(extra, DistillBatch)
        completion = sum(r.length for r in extra.rollouts)
        prompt = sum(len(r.prompt) for r in extra.rollouts)
        episodes = len(extra.rollouts) + extra.empty
        kl = np.fromiter((d for row in extra.reverse_kl for d in row), dtype=np.float64)
        return {
            "loss": float(output.metrics.get("loss:sum", float("nan"))) / completion,
            "teacher_kl": float(kl.mean()),
            **sample_train_kl(extra.rollouts, output),
            "env/all/ac_tokens_per_turn": completion / episodes,
            "env/all/ob_tokens_per_turn": prompt / len(extra.rollouts),
            "env/all/total_ac_tokens": float(completion),
            "env/all/total_episodes": float(episodes),
            "trained_tokens": float(completion),
        }
