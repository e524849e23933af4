"""Option types shared by every command, declared once so that each option refuses alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and ±inf, optionally within FloatRange's bounds.

    Python's float() reads "nan", "inf" and "infinity", and click's FLOAT and FloatRange
    pass them on (nan fails no comparison, so no bound catches it); no zeroplan option
    means either, and downstream they became a nan cost column or an OverflowError.
    """

    name = "float"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        # finite first: "inf" is told what is wrong with it, not that it is out of range
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return float(super().convert(number, param, ctx))

    def _describe_range(self) -> str:
        # unbounded: nothing to add to --help (FloatRange would write "x<=None")
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()


# the plain float option: any finite number
FINITE = FiniteFloat()


class OutPath(click.Path):
    """An ``-o`` path (as a ``pathlib.Path``) that refuses the empty string.

    ``Path("")`` is ``Path(".")``: ``-o ''`` (an unset shell variable) would write into the
    current folder, or fail deep inside with a traceback (``with_name`` on an empty name).
    """

    def __init__(self, *, file_okay: bool = True, dir_okay: bool = True) -> None:
        super().__init__(file_okay=file_okay, dir_okay=dir_okay, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: give a path", param, ctx)
        return super().convert(value, param, ctx)
