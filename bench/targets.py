"""Where a bench runs, shared by ``vs_trl.py`` and ``sampling_vs_generate.py``: the ``--device``,
``--dtype`` and ``--base`` options, and the header line naming the hardware and the machine's load."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--base", default=None, help="a local checkpoint (default: the packaged model)")


def device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """``--device``, refused in one line where CUDA is asked for and absent."""
    resolved = torch.device(args.device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return resolved


def base_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint directory to bench and the name to print: ``--base`` (a bad one refused in one
    line), else the packaged model."""
    from kitchen.models.base import DEFAULT_MODEL, resolve_base_model
    from resources.local_engine.runtime import check_model_dir

    if args.base is None:
        return Path(resolve_base_model(DEFAULT_MODEL).backend_model), DEFAULT_MODEL
    try:
        return check_model_dir(args.base), args.base
    except (OSError, ValueError) as exc:
        parser.error(f"--base: {exc}")


def hardware(on: torch.device) -> str:
    """The CPU's threads, or the GPU's name."""
    if on.type == "cpu":
        return f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    return torch.cuda.get_device_name(on)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``nan`` where the platform has none)."""
    load = (float("nan"),) * 3
    with contextlib.suppress(OSError):
        load = os.getloadavg()
    return " ".join(f"{value:.2f}" for value in load)
