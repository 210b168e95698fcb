"""The DPO workflow's own code (reference scoring, the plan, the custom loss) on every contract backend: the
local engine always, Tinker when ``TINKER_API_KEY`` is set and the service answers (``tests.test_contract``'s
``backend`` fixture). Raw token ids, so no tokenizer is loaded."""

from __future__ import annotations

import math

import pytest
from tinker import types

from kitchen.workflows.dpo.plan import DPOPlan
from kitchen.workflows.dpo.reference import target_logprobs
from tests.test_contract import Backend, _new_client, _tokens
from tests.test_contract import backend as backend  # the fixture, parametrised over backends

BETA = 0.1
REPLY = 5


def _pair_datum(prompt: list[int], reply: list[int]) -> types.Datum:
    tokens = prompt + reply
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(tokens) - 1]),
        },
    )


def _pairs(n: int) -> list[types.Datum]:
    datums = []
    for i in range(n):
        prompt = _tokens(8 + i, 100 + i)
        datums += [_pair_datum(prompt, _tokens(REPLY, 200 + i)), _pair_datum(prompt, _tokens(REPLY, 300 + i))]
    return datums


def test_the_dpo_plan_runs_through_forward_backward_custom(backend: Backend) -> None:
    datums = _pairs(4)
    sampler = backend.service.create_sampling_client(base_model=backend.base_model).result()
    reference = target_logprobs(sampler, datums)
    assert [len(r) for r in reference] == [d.model_input.length for d in datums]
    plan = DPOPlan.build(
        datums,
        reference,
        beta=BETA,
        loss_type="sigmoid",
        batch_size=4,
        epochs=1,
        seed=0,
        max_steps=None,
        identity={},
    )
    client = _new_client(backend)
    batch = plan.prepare(0, None)
    first = plan.metrics(batch, plan.submit(client, batch).result())
    # Policy = reference up to the training and sampling paths' numerical difference.
    slack = BETA * backend.sampler_atol * 2 * REPLY
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=slack + 1e-4)
    assert abs(first["margin"]) <= 2 * slack + 1e-6
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    second = plan.metrics(batch, plan.submit(client, batch).result())
    assert second["dpo_loss"] < first["dpo_loss"] and second["margin"] > first["margin"]
