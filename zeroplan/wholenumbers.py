"""Whole numbers as people type them into options: one rule for every option that takes a
count (``launch --gpus 4``, ``--seq-len 2048``, a cluster spec's ``2x8xH100``).

Light module (core): the estimator, the planner and the launcher all read counts with it.
"""

from __future__ import annotations

import re

# Signed, so that "-1" reads as a number and is told it is too small, rather than taken for
# a name ("auto", a percentile, a GPU) and told it is not one; spaces around it are allowed.
_WHOLE_NUMBER = re.compile(r"\s*[+-]?\d+\s*")


def whole_number(text: str) -> int | None:
    """``text`` as a whole number (``4``, ``-1``, ``" 8 "``); None where it is not one
    (``auto``, ``p95``, ``1.5``, ``4x4090``)."""
    return int(text) if _WHOLE_NUMBER.fullmatch(text) else None
