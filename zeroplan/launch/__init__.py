"""The run side of zeroplan: starting the ranks, the per-rank SFT program, using the result.

Importing this package imports nothing heavy. ``zeroplan.launch.data`` needs no torch;
``zeroplan.launch.sft`` and ``zeroplan.launch.infer`` import torch, transformers, PEFT and
TRL inside their functions (the ``[train]`` extra), ``callbacks`` at import.

Training side:

- ``data.py``      records (alpaca, chat ``messages``, ShareGPT ``conversations``, ``text``)
  → token ids and labels rendered with the tokenizer's chat template, loss on the assistant
- ``sft.py``       ``python -m zeroplan.launch.sft --plan RUN/plan.json --data DATA --out RUN``:
  what torchrun / the deepspeed launcher start on every rank
- ``callbacks.py`` the metrics lines (RUN/metrics.jsonl) and the stop on SIGTERM / SIGINT
- ``infer.py``     ``merge_adapter`` and ``generate`` with the template the run trained on
"""

from __future__ import annotations
