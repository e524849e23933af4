"""The decoder's forward and backward as two CUDA graphs: one launch each, whatever the host.

Where the host sets the pace (a small micro-batch, a small model, a 4-bit base) the step is
the Python, autograd and kernel launches of some ten thousand operations, and a host's
speed is not its card's: the same 8B QLoRA job at 1 × 1,664 ran 4,108-9,009 tokens/s on
H100 machines of one kind. Captured once, the decoder's forward and its backward each
replay with one call, so the step is the GPU's (which the plan predicts within a few
percent) and the host queues only what is left: the embedding's input copy, the loss
(Liger's fused loss reads a count on the host, so it stays eager), the optimizer.

``GraphedDecoder.install(decoder, params)`` replaces the decoder module's ``forward`` (the
``LlamaModel`` under ``LlamaForCausalLM``: input ids → last hidden state). The first
training call warms the body up twice on a side stream (``torch.autograd.grad``: no
parameter's ``.grad`` is touched), then captures the forward and the backward into one
memory pool; every later call with the same shapes and the same non-tensor arguments copies
its tensors into the captured ones and replays. The backward's parameter gradients land in
buffers of the graph and are added to each ``.grad`` with one ``_foreach_add_``.

Any other call runs the eager forward: evaluation (no gradient), another shape, a cache,
``output_hidden_states``. A capture that fails (an operation that waits for the GPU inside
the decoder, reentrant checkpointing, out of memory) leaves every gradient untouched, says
so in one line, and the run goes on eager. Packed micro-batches keep one shape when their
segment boundaries are padded to a fixed count (``batching.PackedCollator(segments=N)``).

Not for DeepSpeed (its engine owns the gradients) nor several processes (DDP's hooks fire
in the backward): ``trainsetup.cuda_graphs_refusal`` says why not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zeroplan.errors import BadSetupError

# warm-up passes before the capture: lazy initialisation (cuBLAS workspaces of the side
# stream, Triton's first launches, bitsandbytes' direct dequantization check) must not
# happen inside it; PyTorch's own make_graphed_callables does three
WARMUP = 2


def decoder_module(model: Any) -> Any:
    """The module that runs a causal LM's decoder layers (before or after PEFT wraps it):
    the parent of its layer list (kernels.layer_list_name), called with input ids and
    returning the last hidden state."""
    from zeroplan.launch.kernels import layer_list_name

    name = layer_list_name(model)
    if name is None:
        raise BadSetupError(
            f"--cuda-graphs: no decoder layer list in '{model.config.model_type}' to capture: "
            "pass --no-cuda-graphs"
        )
    return model.get_submodule(name.rpartition(".")[0])


def _signature(kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What must stay the same for a replay: each tensor's name, shape, dtype and device,
    and every other argument's value. None where an argument cannot be compared (a cache,
    a mask object): that call runs eager."""
    import torch

    parts: list[Any] = []
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, torch.Tensor):
            parts.append((name, tuple(v.shape), v.dtype, v.device))
        elif v is None or isinstance(v, (bool, int, float, str)):
            parts.append((name, v))
        else:
            return None
    return tuple(parts)


def _refuses(kwargs: dict[str, Any]) -> bool:
    """Calls the graph does not hold: an attention mask, a cache, embeddings given, more
    outputs than the last hidden state."""
    return any(
        kwargs.get(k) is not None for k in ("attention_mask", "past_key_values", "inputs_embeds")
    ) or any(kwargs.get(k) for k in ("use_cache", "output_hidden_states", "output_attentions"))


@dataclass
class GraphedDecoder:
    """The decoder's forward and backward captured once and replayed (module docstring)."""

    warn: Callable[[str], None]
    failed: str | None = None
    captured: bool = False
    capture_s: float | None = None  # warm-up and capture of the first training call
    replays: int = 0
    eager_calls: int = 0  # training calls that ran eager (another shape, a mask, a cache)
    pool_bytes: int | None = None  # memory the capture held once it ended (allocated)
    _eager: Any = field(default=None, repr=False)
    _params: list[Any] = field(default_factory=list, repr=False)
    _key: tuple[Any, ...] | None = field(default=None, repr=False)
    _static: dict[str, Any] = field(default_factory=dict, repr=False)
    _out: Any = field(default=None, repr=False)  # the forward graph's last hidden state
    _out_cls: Any = field(default=None, repr=False)
    _grad_out: Any = field(default=None, repr=False)  # the backward graph's input
    _grads: list[Any] = field(default_factory=list, repr=False)  # its parameter gradients
    _trained: list[Any] = field(default_factory=list, repr=False)  # params with a gradient
    _fwd: Any = field(default=None, repr=False)
    _bwd: Any = field(default=None, repr=False)
    _anchor: Any = field(default=None, repr=False)
    _module: Any = field(default=None, repr=False)
    # how the graphs are made: CudaRecorder (None: made at the capture); the CPU tests give
    # one that replays by running the recorded function again
    recorder: Any = field(default=None, repr=False)

    def install(self, decoder: Any, params: list[Any]) -> None:
        """Route ``decoder.forward`` through the graphs; ``params``: its trained ones."""
        self._eager = decoder.forward
        self._params = params
        self._module = decoder
        decoder.forward = self.forward

    def stats(self) -> dict[str, Any]:
        return {
            "captured": self.captured,
            "failed": self.failed,
            "capture_s": self.capture_s,
            "replays": self.replays,
            "eager_calls": self.eager_calls,
            "pool_bytes": self.pool_bytes,
        }

    # ------------------------------------------------------------------ the call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.failed is not None or not torch.is_grad_enabled() or not self._module.training:
            return self._eager(*args, **kwargs)
        if args or _refuses(kwargs):  # the causal LMs call their decoder by keyword
            self.eager_calls += 1
            return self._eager(*args, **kwargs)
        key = _signature(kwargs)
        if key is None:
            self.eager_calls += 1
            return self._eager(**kwargs)
        if not self.captured:
            try:
                self._capture(kwargs, key)
            except Exception as exc:
                self._give_up(exc)
                return self._eager(**kwargs)
        if key != self._key:
            self.eager_calls += 1
            return self._eager(**kwargs)
        for name, static in self._static.items():
            src = kwargs[name]
            if src.data_ptr() != static.data_ptr():
                static.copy_(src, non_blocking=True)
        self.replays += 1
        hidden = _Replay.apply(self._anchor, self)
        return self._out_cls(last_hidden_state=hidden)

    # ------------------------------------------------------------------ capture

    def _capture(self, kwargs: dict[str, Any], key: tuple[Any, ...]) -> None:
        import time

        import torch

        t = time.perf_counter()
        if self.recorder is None:
            self.recorder = CudaRecorder()
        rec = self.recorder
        static = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        call = {**kwargs, **static}
        params = self._params
        with rec.warm():
            for _ in range(WARMUP):
                hidden = _hidden(self._eager(**call))
                torch.autograd.grad(
                    hidden, params, grad_outputs=torch.zeros_like(hidden), allow_unused=True
                )
                del hidden
        # autocast keeps each weight's cast for the rest of the forward: a cast made in the
        # warm-up would be read, not recorded, by the capture, and replays would see the
        # weights of before the first optimizer step
        torch.clear_autocast_cache()
        before = rec.allocated()
        latest: dict[str, Any] = {}

        def forward() -> Any:
            latest["out"] = self._eager(**call)
            return _hidden(latest["out"])

        fwd, hidden = rec.record(forward)
        if getattr(latest["out"], "last_hidden_state", None) is None:
            raise RuntimeError("the decoder returns no last_hidden_state to replay into")
        grad_out = torch.empty_like(hidden)

        def backward() -> Any:
            out = _hidden(latest["out"])
            return torch.autograd.grad(out, params, grad_outputs=grad_out, allow_unused=True)

        bwd, grads = rec.record(backward)
        torch.clear_autocast_cache()
        self._trained = [p for p, g in zip(params, grads, strict=True) if g is not None]
        self._grads = [g for g in grads if g is not None]
        self._out = hidden.detach()
        self._out_cls = type(latest["out"])
        self._grad_out = grad_out
        self._static = static
        self._key = key
        self._fwd, self._bwd = fwd, bwd
        self._anchor = torch.empty(0, device=hidden.device, requires_grad=True)
        self.captured = True
        self.pool_bytes = rec.allocated() - before
        self.capture_s = time.perf_counter() - t

    def _give_up(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.failed = f"{type(exc).__name__}: {first}"[:300]
        self._fwd = self._bwd = None
        self._static, self._grads, self._out = {}, [], None
        if self.recorder is not None:
            self.recorder.release()
        self.warn(f"CUDA graphs off, the decoder runs eager: the capture failed ({self.failed})")

    # ------------------------------------------------------------------ replay

    def replay_forward(self) -> Any:
        self._fwd.replay()
        return self._out

    def replay_backward(self, grad: Any) -> None:
        import torch

        if grad.data_ptr() != self._grad_out.data_ptr():
            self._grad_out.copy_(grad)
        self._bwd.replay()
        held, adds = [], []
        for p, g in zip(self._trained, self._grads, strict=True):
            if p.grad is None:  # after zero_grad(set_to_none=True): this micro-batch's own
                p.grad = g.clone()
            else:
                held.append(p.grad)
                adds.append(g)
        if held:
            torch._foreach_add_(held, adds)


class CudaRecorder:
    """CUDA graphs as torch makes them: the warm-up on a side stream, then each capture on
    it into one memory pool (the backward frees what the forward's graph allocated, so they
    share it, as torch.cuda.make_graphed_callables does)."""

    def __init__(self) -> None:
        import torch

        self.side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def warm(self) -> Iterator[None]:
        import torch

        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)
        torch.cuda.synchronize()
        # what the warm-up freed back to the device: the capture's pool cannot use the
        # allocator's cached blocks, and a plan near the card's memory would not fit twice
        torch.cuda.empty_cache()

    def record(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(the graph, what ``fn`` returned while it was captured); ``graph.replay()``
        runs it again on the tensors it returned. ``thread_local``: the data loader's
        pinning thread may call CUDA while the main thread captures."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            graph, pool=self.pool, stream=self.side, capture_error_mode="thread_local"
        ):
            out = fn()
        return graph, out

    def allocated(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated())

    def release(self) -> None:
        """After a failed capture: what it allocated back to the device."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _hidden(out: Any) -> Any:
    """The last hidden state of a decoder's output (a ModelOutput or a tuple)."""
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden


def _replay_function() -> Any:
    import torch

    class Replay(torch.autograd.Function):
        """Forward: the forward graph; backward: the backward graph, its gradients added to
        the parameters' (the anchor only makes the output need a gradient)."""

        @staticmethod
        def forward(ctx: Any, anchor: Any, graphed: GraphedDecoder) -> Any:
            ctx.graphed = graphed
            return graphed.replay_forward().detach()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            ctx.graphed.replay_backward(grad)
            return None, None

    return Replay


class _LazyReplay:
    """``_Replay.apply`` without importing torch when this module is imported."""

    fn: Any = None

    def apply(self, anchor: Any, graphed: GraphedDecoder) -> Any:
        if self.fn is None:
            self.fn = _replay_function()
        return self.fn.apply(anchor, graphed)


_Replay = _LazyReplay()
