"""zeroplan: will this fine-tuning job fit, with which settings, and how fast will it run?

The light core (this package) imports no torch, transformers or deepspeed.
"""

from zeroplan.api import estimate, make_setup, resolve_cluster
from zeroplan.errors import ZeroplanError
from zeroplan.hardware import Cluster, parse_cluster
from zeroplan.memory import MemoryEstimate
from zeroplan.models import ModelSpec, load_model
from zeroplan.trainsetup import TrainSetup

__all__ = [
    "Cluster",
    "MemoryEstimate",
    "ModelSpec",
    "TrainSetup",
    "ZeroplanError",
    "estimate",
    "load_model",
    "make_setup",
    "parse_cluster",
    "resolve_cluster",
]
