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


class UnmeasuredMoEError(UnsupportedModelError):
    """A mixture-of-experts method, LoRA target set or parallelism that was never measured
    on a GPU (zeroplan.moe.MEASURED): refused rather than estimated."""


class ContextWindowError(ZeroplanError):
    """--seq-len longer than the model's context window (max_position_embeddings)."""


class BadSetupError(ZeroplanError):
    """A training option that is out of range or contradicts another option."""


class ExpertDropoutError(BadSetupError):
    """LoRA dropout above 0 on a mixture-of-experts router or expert bank, which PEFT wraps
    as a parameter and cannot put dropout on (the run would fail at start)."""


class BadLinkOptionError(ZeroplanError):
    """--p2p / --no-p2p for a single GPU, or an --inter-node-gbs that is not a positive number."""


class UnknownGPUError(ZeroplanError):
    """A GPU name that is not in the catalog."""


class BadClusterSpecError(ZeroplanError):
    """A cluster spec such as '7x4090' or a hostfile that cannot be parsed."""


class DataNotFoundError(ZeroplanError):
    """A training data file that does not exist, or a Hub data set that cannot be loaded."""


class BadDataError(ZeroplanError):
    """Training records that cannot be read or lack the fields their format needs."""


class ChatTemplateError(ZeroplanError):
    """A tokenizer without a chat template for chat records, or a template zeroplan cannot mask."""


class BadPlanError(ZeroplanError):
    """A plan.json that is not a plan zeroplan wrote, or one with no setup to run."""


class MissingDependencyError(ZeroplanError):
    """The plan needs a package or a device this machine does not have (bitsandbytes, Liger, CUDA)."""


class ResumeError(ZeroplanError):
    """--resume with no checkpoint in the run folder to resume from."""


# -- zeroplan launch: the preflight refuses before anything starts ---------------------------


class TokenizerNotFoundError(ZeroplanError):
    """A local model folder without tokenizer files."""


class NoGPUError(ZeroplanError):
    """No NVIDIA GPU on this machine (NVML sees none) for a run that needs them."""


class GPUCountError(ZeroplanError):
    """The run asks for more GPUs (or other GPU indices) than this machine has."""


class PredictedOOMError(ZeroplanError):
    """The estimate says the setup runs out of memory on the GPUs at hand."""


class HostUnreachableError(ZeroplanError):
    """A hostfile host that ssh cannot reach without a prompt."""


class OutputWriteError(ZeroplanError):
    """What a command writes cannot go where the user asked (-o, or stdout): an empty path,
    a folder where a file goes, a file type the command does not write, a folder that
    cannot be written, a full disk."""


class ConfigWriteError(OutputWriteError):
    """A config or plan could not be written where the user asked (missing folder, no
    permission), or there is no plan to write."""


class RunDirNotFoundError(ZeroplanError):
    """The run folder given to watch / report does not exist or is not a folder."""


class NothingRecordedError(ZeroplanError):
    """The run folder has neither GPU samples nor metrics to report on."""


class MissingExtraError(ZeroplanError):
    """An optional dependency that this command needs is not installed."""


class BadWatchOptionError(ZeroplanError):
    """An out-of-range --interval / --hang-after, or a --gpus list that is not indices."""


class RunDirExistsError(ZeroplanError):
    """The run folder already holds a run and --resume was not given."""


class NoWeightsError(ZeroplanError):
    """A run folder without the trained weights that merge / generate need."""


class TrackerLoginError(ZeroplanError):
    """--report-to wandb without a Weights & Biases login (WANDB_API_KEY, ~/.netrc) and
    without WANDB_MODE=offline."""


# -- zeroplan launch on several nodes (--nnodes, SLURM) ------------------------------------


class BadRendezvousError(ZeroplanError):
    """--nnodes / --node-rank / --master-addr that do not describe a node of a run (a rank
    out of range, a missing flag), or a SLURM step with several tasks per node."""


class BadNodeListError(ZeroplanError):
    """A SLURM node list (SLURM_JOB_NODELIST) that does not parse or contradicts SLURM_NNODES."""


class NodeCountError(ZeroplanError):
    """The run's node count differs from the plan's."""


class RendezvousUnreachableError(ZeroplanError):
    """The rendezvous host does not resolve, is not node 0's machine, or cannot be reached."""


class RunDirNotSharedError(ZeroplanError):
    """The run folder is not on a filesystem the nodes share (a node cannot see node 0's files)."""


class NodeJoinError(ZeroplanError):
    """A node of a multi-node run did not join in time, or gave up."""


# -- recipes of other trainers (--recipe, --emit) ------------------------------------------


class RecipeNotFoundError(ZeroplanError):
    """A recipe, or the DeepSpeed JSON it names, that is not where zeroplan looked."""


class BadRecipeError(ZeroplanError):
    """A recipe that does not parse, whose format cannot be told, or that holds a value
    zeroplan does not model (freeze tuning, an unknown optimizer, 8-bit LoRA...)."""


# -- the launched step's kernels (--kernels, --compile) -------------------------------------


class KernelsUnsupportedError(ZeroplanError):
    """--kernels liger where Liger's kernels cannot run: no CUDA GPU, or an architecture the
    installed liger-kernel does not patch."""


class CompilerUnavailableError(ZeroplanError):
    """--compile on a torch that cannot compile here (no Triton, no C++ compiler, an
    unsupported Python)."""
