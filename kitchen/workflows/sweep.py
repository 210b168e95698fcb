"""Sweeps: several configurations of one workflow, each named by a readable, stable key, ranked afterwards.

A configuration's key lists the settings it does not leave at their defaults, training's first
(``learning_rate=0.0003,lora_rank=8,max_steps=20``): the same configuration always gets the same
key, and the key alone gives the configuration back (``config_from_key``), so a partition added by hand in
the UI needs nothing else. The Dagster layer makes one dynamic partition per key over the workflow's
training, evaluation and registration; the assets before training (``SHARED``: base model, dataset and the
workflow's own, such as datums or reference logprobs) stay unpartitioned and are shared by every
configuration that agrees on their settings (``shared_settings``).
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from kitchen.workflows.config import RunConfig
from kitchen.workflows.registry import Workflow

#: Op kinds made once per configuration (the training step's outputs, evaluation, registration).
PER_CONFIGURATION = ("train", "eval_report", "registered_model")
#: Run tag holding a sweep's partition keys (JSON list) on the runs of a backfill ``kitchen sweep --backfill``
#: submits, so its ``sweep_report`` compares that sweep's configurations.
CONFIGURATIONS_TAG = "kitchen/sweep_configurations"
#: Fields that never name a configuration (they change the log, not the result).
NOT_IN_KEY = frozenset({"log_level"})
_PAIR, _ASSIGN, _ITEM, _NONE = ",", "=", "+", "none"


class SweepError(ValueError):
    """A sweep that cannot be run as asked (one line saying what to change)."""


def shared_kinds(workflow: Workflow) -> tuple[str, ...]:
    """The op kinds every configuration shares: everything before training."""
    return tuple(kind for kind in workflow.sections if kind not in PER_CONFIGURATION)


def _format(value: Any) -> str:
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float: 0.0003, 1e-05
    if isinstance(value, list | tuple):
        return _ITEM.join(_format(v) for v in value)
    return str(value)


def key_order(workflow: Workflow) -> list[str]:
    """The order settings appear in a key: training's, evaluation's and registration's first (what sweeps
    usually vary), then the shared assets' (model, dataset...)."""
    kinds = [*PER_CONFIGURATION, *shared_kinds(workflow)]
    names = [n for kind in kinds for n in workflow.sections[kind].model_fields]
    return list(dict.fromkeys([*names, *workflow.config.model_fields]))


def partition_key(workflow: Workflow, config: RunConfig) -> str:
    """The configuration's key: ``field=value`` for every setting off its default (``key_order``)."""
    defaults = workflow.config()
    pairs = []
    for name in key_order(workflow):
        value = getattr(config, name)
        if name in NOT_IN_KEY or value == getattr(defaults, name):
            continue
        text = _format(value)
        if any(s in text for s in (_PAIR, _ASSIGN)) or text.strip() != text or "..." in text:
            raise SweepError(
                f"--{name.replace('_', '-')} {value!r}: a swept configuration's value may not contain "
                f"{_PAIR!r}, {_ASSIGN!r}, '...' or surrounding spaces (it becomes the partition key)"
            )
        pairs.append(f"{name}{_ASSIGN}{text}")
    return _PAIR.join(pairs) or "defaults"


def _parse(annotation: Any, text: str) -> Any:
    """A key's value back into what the field takes (pydantic validates and converts the rest)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = get_origin(annotation) in (Union, types.UnionType) and len(args) < len(get_args(annotation))
    if optional and text == _NONE:
        return None
    inner = args[0] if optional and len(args) == 1 else annotation
    if get_origin(inner) is list:
        return [t for t in text.split(_ITEM) if t]
    return text


def config_from_key(workflow: Workflow, key: str) -> RunConfig:
    """The configuration a key names (``SweepError`` saying what is wrong when it names none)."""
    fields = workflow.config.model_fields
    values: dict[str, Any] = {}
    if key != "defaults":
        for pair in key.split(_PAIR):
            name, sep, text = pair.partition(_ASSIGN)
            if not sep or name not in fields or name in NOT_IN_KEY:
                raise SweepError(
                    f"partition {key!r} of the {workflow.name} sweep: {pair!r} is not <setting>=<value> "
                    f"for a setting of {workflow.config.__name__}; keys are made by `kitchen sweep`"
                )
            values[name] = _parse(fields[name].annotation, text)
    try:
        config = workflow.config(**values)
    except ValueError as err:
        raise SweepError(f"partition {key!r} of the {workflow.name} sweep: {err}") from err
    if partition_key(workflow, config) != key:
        raise SweepError(
            f"partition {key!r} of the {workflow.name} sweep is not a configuration's own key "
            f"(it reads back as {partition_key(workflow, config)!r}); add partitions with `kitchen sweep`"
        )
    return config


def shared_settings(workflow: Workflow, config: RunConfig) -> dict[str, Any]:
    """The settings the shared assets read: configurations that agree on them share those assets."""
    names = [n for kind in shared_kinds(workflow) for n in workflow.sections[kind].model_fields]
    return {name: getattr(config, name) for name in dict.fromkeys(names)}


def shared_differences(
    workflow: Workflow, config: RunConfig, materialised: Mapping[str, Mapping[str, Any] | None]
) -> list[str]:
    """How the shared assets differ from what ``config`` needs, one line each (empty: it may share them).
    ``materialised``: shared kind -> the settings of the run that made its latest materialisation (its
    flat run config; None when never materialised)."""
    problems = []
    for kind in shared_kinds(workflow):
        section = workflow.sections[kind]
        given = materialised.get(kind)
        if given is None:
            problems.append(f"{workflow.name}/{kind} has not been materialised")
            continue
        try:
            had = section(**{k: v for k, v in given.items() if k in section.model_fields})
        except ValueError:
            problems.append(f"{workflow.name}/{kind} was made with settings that no longer validate")
            continue
        for name in section.model_fields:
            if getattr(had, name) != getattr(config, name):
                problems.append(
                    f"{workflow.name}/{kind} was made with {name}={getattr(had, name)!r}, "
                    f"this configuration needs {getattr(config, name)!r}"
                )
    return problems


def expand(
    workflow: Workflow, fixed: Mapping[str, Any], swept: Mapping[str, Sequence[Any]]
) -> list[RunConfig]:
    """Every combination of the ``swept`` values (first field varies slowest) over the ``fixed`` settings,
    validated; the same configuration twice is an error."""
    configs: list[RunConfig] = []
    seen: dict[str, Mapping[str, Any]] = {}
    names = list(swept)
    for combo in itertools.product(*(swept[n] for n in names)):
        chosen = dict(zip(names, combo, strict=True))
        config = workflow.config(**{**fixed, **chosen})
        key = partition_key(workflow, config)
        if key in seen:
            raise SweepError(f"{chosen} and {dict(seen[key])} are the same configuration ({key})")
        seen[key] = chosen
        configs.append(config)
    return configs


@dataclass(frozen=True)
class Outcome:
    """One configuration's result as the sweep report compares it (None: not materialised)."""

    key: str
    done: bool
    gate_passed: bool = False
    metric: str = ""
    value: float | None = None
    base_value: float | None = None
    lower_is_better: bool = False
    nll: float | None = None
    final_loss: float | None = None
    tokens_per_second: float | None = None
    version: str | None = None
    """The registered version (``models:/NAME/N``), when registration ran."""


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def rank(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Best first: materialised before missing, gate passed before failed, then the gate metric in its
    direction, then lower held-out NLL, then the key (a stable order for ties)."""

    def order(o: Outcome) -> tuple[Any, ...]:
        sign = 1.0 if o.lower_is_better else -1.0
        metric = sign * o.value if _finite(o.value) else math.inf  # type: ignore[operator]
        nll = o.nll if _finite(o.nll) else math.inf
        return (not o.done, not o.gate_passed, metric, nll, o.key)

    return sorted(outcomes, key=order)


def best(ranked: Sequence[Outcome]) -> Outcome | None:
    """The configuration a sweep may promote: the first that finished and passed its gate."""
    return next((o for o in ranked if o.done and o.gate_passed), None)


__all__ = [
    "CONFIGURATIONS_TAG",
    "NOT_IN_KEY",
    "PER_CONFIGURATION",
    "Outcome",
    "SweepError",
    "best",
    "config_from_key",
    "expand",
    "partition_key",
    "rank",
    "shared_differences",
    "shared_kinds",
    "shared_settings",
]
