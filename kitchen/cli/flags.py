"""Command-line flags generated from a pydantic run config: one source for names, defaults, ranges and help.

``--learning-rate`` is the field ``learning_rate``; a ``Literal`` becomes ``choices``; a bool becomes
``--x/--no-x``; a list takes a comma-separated value. For ``kitchen sweep`` (``sweep=True``) every
number, string and choice takes a comma-separated list of values (``sweep_values`` splits them). Every
flag defaults to "not given", so the config's own default applies, and values are validated by the config
itself (one error per bad flag).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

_SCALARS: dict[type, type] = {int: int, float: float, str: str}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _default_text(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    return f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"


def _sweepable(annotation: Any) -> bool:
    return get_origin(annotation) is Literal or annotation in _SCALARS


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config: type[BaseModel],
    skip: frozenset[str] = frozenset(),
    sweep: bool = False,
) -> set[str]:
    """One flag per field of ``config`` (except ``skip``); returns the fields added."""
    added: set[str] = set()
    for name, info in config.model_fields.items():
        if name in skip:
            continue
        added.add(name)
        annotation = _unwrap_optional(info.annotation)
        help_text = (info.description or "").replace("%", "%%") + _default_text(info).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if sweep and _sweepable(annotation):
            kwargs["metavar"] = "A[,B,...]"
            kwargs["help"] = help_text + "; several values sweep it"
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif get_origin(annotation) is list:
            kwargs["metavar"] = "A,B,..."
        elif annotation in _SCALARS:
            kwargs["type"] = _SCALARS[annotation]
        else:
            raise TypeError(f"{config.__name__}.{name}: no command-line form for {annotation!r}")
        parser.add_argument(flag_name(name), **kwargs)
    return added


def add_workflow_flags(
    parser: argparse.ArgumentParser,
    config: type[BaseModel],
    sections: Mapping[str, type[BaseModel]],
    sweep: bool = False,
) -> None:
    """The flat ``config``'s flags, grouped by the asset that reads them (a shared field once)."""
    done: set[str] = set()
    for kind, section in sections.items():
        group = parser.add_argument_group(f"{kind} settings")
        done |= add_config_flags(group, section, frozenset(done), sweep)
    add_config_flags(parser.add_argument_group("run settings"), config, frozenset(done), sweep)


def sweep_values(
    config: type[BaseModel], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(fixed settings, swept settings -> their values) from flags added with ``sweep=True``: a flag given
    several comma-separated values is swept, one value is fixed (the config converts and validates)."""
    fixed: dict[str, Any] = {}
    swept: dict[str, list[str]] = {}
    for name, info in config.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not _sweepable(_unwrap_optional(info.annotation)):
            fixed[name] = value
            continue
        values = [v.strip() for v in str(value).split(",")]
        if len(values) > 1:
            swept[name] = values
        else:
            fixed[name] = values[0]
    return fixed, swept


def config_from_flags(config: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """The validated config from the flags given (``ValidationError`` names each bad flag)."""
    values = {
        name: getattr(args, name) for name in config.model_fields if getattr(args, name, None) is not None
    }
    return config(**values)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"])
        flag = flag_name(where) if where else "config"
        lines.append(f"  {flag}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)
