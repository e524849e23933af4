"""Human output: rich tables of what the core computed. Nothing here computes memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from zeroplan.hardware import GPU
    from zeroplan.memory import MemoryEstimate

GIB = 2**30

_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "logits": "logits / loss",
    "buffers": "comm buffers",
}


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def render_estimate(est: MemoryEstimate, console: Console, explain: bool = False) -> None:
    """The estimate as a table, largest term first, then the verdict."""
    from rich.table import Table

    setup = est.setup
    zero = "no DeepSpeed" if setup["zero"] is None else f"ZeRO-{setup['zero']}"
    if setup["offload"] != "none":
        zero += f" + offload {setup['offload']}"
    title = (
        f"{est.model['name']} · {setup['method']} · {est.cluster['world_size']}×{est.cluster['gpu']} · {zero}\n"
        f"micro-batch {setup['micro_batch']} × seq {setup['seq_len']} · "
        f"grad-ckpt {'on' if setup['grad_ckpt'] else 'off'} · {setup['optim']} · {setup['attn']}"
        + (" · fused loss" if setup["fused_loss"] else "")
    )
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("per GPU", style="bold")
    table.add_column("size GiB", justify="right")
    table.add_column("at peak GiB", justify="right")
    if explain:
        table.add_column("formula", overflow="fold")
    for name, term in sorted(est.terms.items(), key=lambda kv: -kv[1].bytes):
        row = [_LABELS.get(name, name), _gib(term.bytes), _gib(est.at_peak.get(name, 0))]
        if explain:
            row.append(term.formula)
        table.add_row(*row)
    table.add_section()
    table.add_row(
        "peak allocated",
        "",
        _gib(est.peak_allocated_bytes),
        *([f"at: {est.peak_phase}"] if explain else []),
    )
    table.add_row(
        "peak reserved",
        "",
        _gib(est.peak_reserved_bytes),
        *(["allocator slack"] if explain else []),
    )
    table.add_row(
        "nvidia-smi used",
        "",
        _gib(est.device_used_bytes),
        *(["reserved + CUDA context (+ NCCL, managed memory)"] if explain else []),
    )
    table.add_row(
        "must fit",
        "",
        _gib(est.required_bytes),
        *(
            ["allocated × 1.03 + context: under pressure the allocator gives its cache back"]
            if explain
            else []
        ),
    )
    console.print(table)

    top = max(est.at_peak.items(), key=lambda kv: kv[1])
    share = top[1] / max(1, est.peak_allocated_bytes)
    console.print(
        f"Largest at the peak ({est.peak_phase}): {_LABELS.get(top[0], top[0])}, {share:.0%}."
    )
    card = f"{_gib(est.gpu_memory_bytes)} GiB {est.cluster['gpu']}"
    if est.fits:
        console.print(f"[green]Fits[/green] a {card} with {_gib(est.headroom_bytes)} GiB to spare.")
    else:
        console.print(
            f"[red]Does not fit[/red] a {card}: over by {_gib(-est.headroom_bytes)} GiB. "
            "Try --grad-ckpt, a smaller --micro-batch, --method qlora, --fused-loss or a ZeRO stage."
        )
    if est.cpu_bytes_per_node:
        console.print(f"CPU RAM per node for offload: {_gib(est.cpu_bytes_per_node)} GiB.")
    for note in est.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def render_models(rows: list[tuple[str, str, int]], console: Console) -> None:
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("model (Hub id)")
    table.add_column("architecture")
    table.add_column("params", justify="right")
    for name, arch, params in rows:
        table.add_row(name, arch, f"{params / 1e9:,.2f} B")
    console.print(table)


def render_gpus(gpus: list[GPU], console: Console) -> None:
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("GPU", "memory GiB", "bf16 TFLOP/s", "bandwidth GB/s", "link", "P2P"):
        table.add_column(col, justify="left" if col == "GPU" else "right")
    for g in gpus:
        table.add_row(
            g.name,
            f"{g.memory_gib:.1f}",
            f"{g.bf16_tflops:g}",
            f"{g.memory_bandwidth_gbs:g}",
            f"{g.interconnect} {g.link_bandwidth_gbs:g} GB/s",
            "yes" if g.p2p else "no",
        )
    console.print(table)
