"""The job a plan is made for, as command-line options: declared once for every command
that plans (``zeroplan plan``, and ``zeroplan launch MODEL`` which plans before it runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from zeroplan.trainsetup import METHODS, parse_targets

F = TypeVar("F", bound=Callable[..., Any])

# the keyword arguments job_options adds to a command
JOB_OPTIONS = ("method", "seq_len", "global_batch", "lora_r", "lora_targets", "no_quantization")


def job_options(fn: F) -> F:
    """--method, --seq-len, --global-batch, --lora-r, --lora-targets, --no-quantization."""
    options = [
        click.option(
            "--method",
            type=click.Choice(METHODS),
            default="lora",
            show_default=True,
            help="lora may be planned as qlora (4-bit base) unless --no-quantization.",
        ),
        click.option(
            "--seq-len",
            type=click.IntRange(min=1),
            default=2048,
            show_default=True,
            help="Tokens per sequence.",
        ),
        click.option(
            "--global-batch",
            type=click.IntRange(min=1),
            default=None,
            help="Sequences per optimizer step over all GPUs, kept exactly (micro-batch × "
            "accumulation × GPUs).",
        ),
        click.option(
            "--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank."
        ),
        click.option(
            "--lora-targets",
            default="all-linear",
            show_default=True,
            help="Module names (q_proj,v_proj) or all-linear.",
        ),
        click.option(
            "--no-quantization", is_flag=True, help="Never switch lora to a 4-bit base (qlora)."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def job_request(
    method: str,
    seq_len: int,
    global_batch: int | None,
    lora_r: int,
    lora_targets: str,
    no_quantization: bool,
) -> dict[str, Any]:
    """The job options as ``PlanRequest`` fields."""
    return {
        "method": method,
        "seq_len": seq_len,
        "global_batch": global_batch,
        "lora_r": lora_r,
        "lora_targets": parse_targets(lora_targets),
        "allow_quantization": not no_quantization,
    }
