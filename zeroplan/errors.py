"""The user mistakes zeroplan recognises.

Each is a distinct type so that callers (the CLI, notebooks, other tools) can tell them
apart; the message always says what is wrong *and* how to fix it, because the CLI prints
it as a single line and exits with status 2.
"""

from __future__ import annotations


class ZeroplanError(Exception):
    """A user mistake; the CLI prints its message as one line and exits 2."""


class ModelNotFoundError(ZeroplanError):
    """The model id is neither a local path, a cached or reachable Hub model, nor in the catalog."""


class BadModelConfigError(ZeroplanError):
    """A config.json that is not JSON, lacks a field we need, or contradicts itself."""


class UnsupportedModelError(ZeroplanError):
    """An architecture (or part of one) whose memory zeroplan does not model."""


class BadSetupError(ZeroplanError):
    """A training option that is out of range or contradicts another option."""


class UnknownGPUError(ZeroplanError):
    """A GPU name that is not in the catalog."""


class BadClusterSpecError(ZeroplanError):
    """A cluster spec such as '7x4090' or a hostfile that cannot be parsed."""
