"""The rollout machinery RL and on-policy distillation share, on the tiny model and the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker import types

from kitchen.training.rollouts import Rollout, action_datum, sample_groups, sample_train_kl
from resources.local_engine import LocalServiceClient

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
PARAMS = types.SamplingParams(max_tokens=5, temperature=1.0, stop=[])


def test_action_datum_is_the_cookbook_layout() -> None:
    rollout = Rollout(prompt=[1, 2, 3], tokens=[4, 5], logprobs=[-0.5, -1.5], stop_reason="length")
    datum = action_datum(rollout, 0.25)
    assert datum.model_input.to_ints() == [1, 2, 3, 4]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert datum.loss_fn_inputs["logprobs"].tolist() == [0.0, 0.0, -0.5, -1.5]
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, 0.25, 0.25]
    per_token = action_datum(rollout, [1.0, -2.0]).loss_fn_inputs["advantages"].tolist()
    assert per_token == [0.0, 0.0, 1.0, -2.0]
    with pytest.raises(ValueError, match="3 advantages for a completion of 2 tokens"):
        action_datum(rollout, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no completion tokens"):
        action_datum(Rollout([1], [], [], "stop"), 1.0)


def test_groups_are_reproducible_per_seed_and_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    service = LocalServiceClient(root=tmp_path)
    policy = service.create_sampling_client(base_model=str(tiny_model_dir)).result()

    def draw(seed: int, step: int) -> list[list[list[int]]]:
        groups = sample_groups(policy, PROMPTS, group_size=3, params=PARAMS, seed=seed, step=step)
        assert [len(g) for g in groups] == [3, 3]
        assert all(len(r.tokens) == len(r.logprobs) == 5 and r.prompt in PROMPTS for g in groups for r in g)
        return [[r.tokens for r in g] for g in groups]

    first = draw(0, 0)
    assert first == draw(0, 0)
    assert first != draw(0, 1) and first != draw(1, 0)
    assert len({tuple(t) for t in first[0]}) > 1  # a group's samples differ
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        sample_groups(policy, PROMPTS, group_size=0, params=PARAMS, seed=0, step=0)


def test_an_on_policy_step_has_no_sampler_trainer_mismatch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``optim/kl_sample_train_v1`` at an on-policy step is ~0 on the local engine: the sampler's logprobs
    are the policy's own (the failure mode elsewhere is sampling logprobs that distort the ratios)."""
    service = LocalServiceClient(root=tmp_path)
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    client.forward_backward([_nll_datum()], "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=5e-2))  # move off the zero-init adapter first
    policy = client.save_weights_and_get_sampling_client().result()
    groups = sample_groups(policy, PROMPTS, group_size=2, params=PARAMS, seed=3, step=0, policy_version=1)
    rollouts = [r for g in groups for r in g]
    output = client.forward_backward([action_datum(r, 1.0) for r in rollouts], "importance_sampling").result()
    kl = sample_train_kl(rollouts, output)
    assert abs(kl["optim/kl_sample_train_v1"]) < 1e-5 and kl["optim/kl_sample_train_v2"] < 1e-9
    expected_entropy = -sum(lp for r in rollouts for lp in r.logprobs) / sum(r.length for r in rollouts)
    assert kl["optim/entropy"] == pytest.approx(expected_entropy)
    # On-policy, the importance ratio is 1: the loss is minus the summed advantages (one per token).
    assert output.metrics["loss:sum"] == pytest.approx(-sum(r.length for r in rollouts), rel=1e-4)


def _nll_datum() -> types.Datum:
    tokens = [3, 14, 15, 92, 65, 35]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5},
    )
