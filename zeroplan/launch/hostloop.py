"""What the Trainer's loop does on the host every step that the step does not need.

Where the host sets the pace (a small micro-batch, a small model, a 4-bit base), every
millisecond of Python between two kernels is a millisecond of the step. transformers' Trainer
(5.17) spends some on each optimizer step that learn nothing:

- **two waits for the GPU** (``logging_nan_inf_filter``'s ``isnan(loss) or isinf(loss)``
  after every backward reads the loss on the host; ``.to(device)`` of each batch from pinned
  memory without ``non_blocking`` synchronises the stream): while the host waits, it queues
  nothing, and the GPU then idles while the host queues the next forward;
- **four walks over the whole module tree** (``model.train()`` in every training step, the
  FLOPs count's ``num_parameters()``, ``model.zero_grad()`` and gradient clipping over
  ``model.parameters()``): an 8B model with all-linear LoRA has 2,665 modules and 739
  parameters, of which 448 train.

``sync_free_kwargs`` turns the waits off (the loss logged for a step whose loss is NaN or
infinite is then that value, not the running mean), ``LeanWalks`` keeps the walks to what
changes. Neither changes a gradient, an update or the order of anything the GPU computes
(tests/test_hostloop.py: the same losses, seed for seed). ``freeze_heap`` keeps Python's
full garbage collections off what the rank built before training.
"""

from __future__ import annotations

import gc
from typing import Any


def freeze_heap() -> int:
    """Collect once, then move every object alive (the records, their token lists, the
    model's modules: 570k objects for 2,000 records on a CPU rank) out of the collector's
    sight (``gc.freeze``); returns how many. Python's full collection walks every tracked
    object, 300-400 ms for those on this machine's CPU, and one can fall in a training step
    whenever the step's own allocations trip it: a graphed Qwen3-1.7B step on an H100 lost
    315 ms once in 20 (graphs5.jsonl; that this was the cause is not measured). Frozen objects
    are still freed by reference counting; only a reference cycle among them outlives the
    run's heap."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def sync_free_kwargs(cuda: bool) -> dict[str, Any]:
    """TrainingArguments that keep the host from waiting on the GPU inside a step: batches
    copied from pinned memory without a stream sync (on a GPU), and no per-micro-batch read
    of the loss for the NaN/inf filter of the logs."""
    kw: dict[str, Any] = {"logging_nan_inf_filter": False, "dataloader_pin_memory": cuda}
    if cuda:
        kw["accelerator_config"] = {"non_blocking": True}
    return kw


def trainable(model: Any) -> list[Any]:
    """The parameters that get gradients, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


class LeanWalks:
    """``model.train()`` and ``model.zero_grad()`` without the walk when it changes nothing.

    ``install(model)`` shadows both on the instance: ``train(mode)`` walks the tree only
    when ``mode`` differs from the one the last top-level call set (evaluation's
    ``model.eval()`` goes through it too, so the next ``train()`` walks again);
    ``zero_grad()`` sets to None the gradients of the parameters that train (frozen ones
    never hold one), which is what ``nn.Module.zero_grad(set_to_none=True)`` does over
    all of them; with ``in_place`` (CUDA graphs, which add into them) it zeroes them in
    one call instead.
    """

    def __init__(self, params: list[Any]) -> None:
        self.params = params
        self.mode: bool | None = None
        self.walks = 0  # how often train() walked the tree (tests, result.json)
        # CUDA graphs (launch/graphs.py) add into the gradients: zeroed in place, one call
        self.in_place = False

    def install(self, model: Any) -> None:
        walk = model.train  # the class's, bound

        def train(mode: bool = True) -> Any:
            if self.mode is not mode or model.training is not mode:
                walk(mode)
                self.mode = mode
                self.walks += 1
            return model

        def zero_grad(set_to_none: bool = True) -> None:
            if self.in_place:
                import torch

                held = [p.grad for p in self.params if p.grad is not None]
                if held:
                    torch._foreach_zero_(held)
                return
            for p in self.params:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

        model.train = train
        model.zero_grad = zero_grad
