"""Human output: rich tables of what the core computed. Nothing here computes memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zeroplan.hardware import DEFAULT_CPU_CORES_PER_GPU
from zeroplan.speed import HOST_BOUND_REPEAT_SPREAD

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
    "kept_output": "kept output",
    "optimizer_temporaries": "optimizer step temporaries",
}
# terms that only some loops have: no row when they are 0
_LOOP_TERMS = ("kept_output", "optimizer_temporaries")


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def render_estimate(est: MemoryEstimate, console: Console, explain: bool = False) -> None:
    """The estimate as a table, largest term first, then the verdict."""
    from rich.markup import escape
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
        + f"\n{setup['loop']} loop · autocast {'on' if setup['autocast'] else 'off'} · "
        + f"outputs {'kept' if setup['keep_outputs'] else 'dropped'} in backward"
    )
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("per GPU", style="bold")
    table.add_column("size GiB", justify="right")
    table.add_column("at peak GiB", justify="right")
    if explain:
        table.add_column("formula", overflow="fold")
    for name, term in sorted(est.terms.items(), key=lambda kv: -kv[1].bytes):
        if name in _LOOP_TERMS and term.bytes == 0:
            continue
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
            "Try --grad-ckpt, a smaller --micro-batch, --method qlora, --fused-loss or a ZeRO "
            f"stage, or let zeroplan plan {est.model['name']} --gpus {est.cluster['spec']} "
            "pick."
        )
    if est.cpu_bytes_per_node:
        console.print(f"CPU RAM per node for offload: {_gib(est.cpu_bytes_per_node)} GiB.")
    speed = est.speed_json()
    if speed is not None:
        world = est.cluster["world_size"]
        console.print(
            f"Predicted speed: {speed['tokens_per_s']:,.0f} tokens/s"
            + (
                f" on {world} GPUs, {speed['tokens_per_s_per_gpu']:,.0f} per GPU"
                if world > 1
                else ""
            )
            + f"; {speed['step_seconds']:.3f} s per optimizer step (compute "
            f"{speed['compute_seconds']:.3f} s, communication {speed['comm_seconds']:.3f} s "
            f"at {speed['link_gbs']:g} GB/s per GPU of which {speed['comm_exposed_seconds']:.3f} s "
            f"not hidden behind compute, offload {speed['offload_seconds']:.3f} s"
            + (
                f" with CPU Adam on {est.cluster['cpu_threads_per_rank']} threads per GPU"
                + (
                    ""
                    if est.cluster["cpu_cores_per_node"]
                    else f" ({DEFAULT_CPU_CORES_PER_GPU} cores per GPU assumed)"
                )
                if est.setup["offload"] != "none"
                else ""
            )
            + f", the launched trainer {speed['launch_seconds']:.3f} s)."
        )
        bound = "host-bound" if speed["host_bound"] else "GPU-bound"
        band = (
            f"On runs no fit saw, 9 in 10 predictions like this came within "
            f"{speed['error_p90']:.0%} of the measured speed ({bound} steps timed alone: "
            f"{speed['step_error_p90']:.0%}"
            + (
                f"; launched runs on real records: {speed['launched_error_p90']:.0%}"
                if speed["launch_seconds"] > 0
                else ""
            )
            + ")."
        )
        if speed["host_bound"]:
            console.print(
                "The host sets this step's pace: Python, autograd and kernel launches take "
                f"{speed['host_seconds_per_micro_batch']:.3f} s per micro-batch against the "
                f"GPU's {speed['gpu_seconds_per_micro_batch']:.3f} s, so a larger micro-batch "
                f"costs little more per step. {band} Such steps repeat least exactly: the "
                f"same shape has run up to {HOST_BOUND_REPEAT_SPREAD:.1f}x slower in one "
                "process than in another on the H200 hosts measured."
            )
        else:
            console.print(band)
    for note in est.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


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
    cols = ("GPU", "memory GiB", "bf16 TFLOP/s", "fp16 TFLOP/s", "bandwidth GB/s", "link", "P2P")
    for col in cols:
        table.add_column(col, justify="left" if col == "GPU" else "right", no_wrap=col == "GPU")
    for g in gpus:
        table.add_row(
            g.name,
            f"{g.memory_gib:.1f}",
            f"{g.bf16_tflops:g}" if g.bf16 else "no bf16",
            f"{g.fp16_tflops:g}",
            f"{g.memory_bandwidth_gbs:g}",
            f"{g.interconnect} {g.link_bandwidth_gbs:g} GB/s",
            "yes" if g.p2p else "no",
        )
    console.print(table)


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def render_data(d: dict[str, Any], console: Console, width: int = 30) -> None:
    """The data section of a plan: counts, percentiles, the cap, packing, a histogram."""
    from rich.markup import escape

    pct = d["percentiles"]
    console.print(
        f"[bold]data[/bold] {escape(d['source'])}: {d['records']:,} {d['format']} records, "
        f"{d['tokens_total']:,} tokens; mean {d['mean_tokens']:,.0f}, p50 {pct['p50']:,}, "
        f"p90 {pct['p90']:,}, p99 {pct['p99']:,}, longest {d['longest_tokens']:,}"
    )
    lost = (
        f"{d['dropped']:,} longer records dropped"
        if d["dropped"]
        else f"{d['truncated']:,} truncated"
        if d["truncated"]
        else "none longer"
    )
    why = d.get("seq_len_from", "given")
    console.print(
        f"     seq {d['seq_len']:,} ({why if why != 'given' else '--seq-len'}; {lost}); "
        "packed into micro-batches of micro-batch × "
        f"{d['seq_len']:,} tokens (fill below); in rows of {d['seq_len']:,}: {d['fill']:.1%}"
    )
    top = max((c for _, _, c in d["histogram"]), default=0)
    for low, high, count in d["histogram"]:
        bar = "█" * (round(width * count / top) if top else 0)
        console.print(f"     {low:>6,}–{high:<6,} {bar} {count:,}", highlight=False)


def _label(c: dict[str, Any]) -> str:
    """A plan row's setup in a few words: family, micro-batch × accumulation, the extras."""
    s = c["setup"]
    label = f"{c['family']}: mb {s['micro_batch']} × ga {s['grad_accum']}"
    label += ", ckpt" if s["grad_ckpt"] else ""
    label += ", fused loss" if s["fused_loss"] else ""
    label += f", {s['optim']}" if s["optim"] not in ("adamw", "adamw_torch_fused") else ""
    return label


def render_plan(data: dict[str, Any], console: Console) -> None:
    """The plan as a person reads it: the choice, the ranked alternatives, why others lost."""
    from rich.markup import escape
    from rich.table import Table

    req = data["request"]
    console.print(
        f"[bold]{data['model']}[/bold] · {req['method']} · {data['cluster']} · seq {req['seq_len']}"
        + (f" · global batch {req['global_batch']}" if req["global_batch"] else "")
        + f" · margin {req['margin']:.0%} · {data['searched']} setups searched"
    )
    if data.get("data"):
        render_data(data["data"], console)
    best = data["best"]
    if best is None:
        console.print("[red]Nothing fits.[/red] " + escape(data["suggestion"] or ""))
        return
    rows = [best, *data["alternatives"]]
    tokens = req.get("tokens_to_train", req["dataset_tokens"])
    table = Table(show_edge=False, header_style="bold")
    speed = "real tokens/s" if data.get("data") else "tokens/s"
    for col in ("#", "setup", "must fit GiB", speed, "step s"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    if "steps_per_epoch" in best:
        table.add_column("fill", justify="right")
        table.add_column("steps/epoch", justify="right")
    if tokens:
        table.add_column("time", justify="right")
    if req["price_per_gpu_hour"] is not None and tokens:
        table.add_column("cost", justify="right")
    for n, c in enumerate(rows, 1):
        cells = [
            str(n),
            _label(c),
            f"{c['required_bytes'] / 2**30:.1f}",
            f"{c['tokens_per_s']:,.0f}",
            f"{c['step_seconds']:.2f}",
        ]
        if "steps_per_epoch" in c:
            cells.append(f"{c['fill']:.0%}")
            cells.append(f"{c['steps_per_epoch']:,}")
        if "hours" in c:
            cells.append(_duration(c["hours"]))
        if "cost" in c:
            cells.append(f"{c['cost']:,.2f}")
        table.add_row(*cells, style="green" if n == 1 else None)
    console.print(table)
    if "cost" in rows[0]:
        source = req.get("price_source") or "--price-per-gpu-hour"
        line = f"cost at ${req['price_per_gpu_hour']:,.2f} per GPU-hour ({source}"
        line += "; --price-per-gpu-hour to use yours)" if source != "--price-per-gpu-hour" else ")"
        console.print(escape(line))
    console.print(
        f"[green]Chosen:[/green] {rows[0]['family']} (row 1): 9 in 10 predictions like it "
        f"came within {best['error_p90']:.0%} of the measured speed on runs no fit saw (its "
        f"step is {'host' if best['host_bound'] else 'GPU'}-bound)."
    )
    alt = data.get("quantized_alternative")
    if alt:
        console.print(
            f"[bold]4-bit base, not chosen:[/bold] {escape(_label(alt))}: "
            f"{alt['required_bytes'] / 2**30:.1f} GiB, {alt['tokens_per_s']:,.0f} tokens/s "
            f"predicted ({alt['speedup']:+.0%}). It changes: {escape(alt['changes'])}."
        )
    if data["rejected"]:
        console.print("[bold]Other families:[/bold]")
        for fam, why in data["rejected"].items():
            console.print(f"  {escape(fam)}: {escape(why)}")
    for note in data["assumptions"]:
        console.print(f"[yellow]assumption:[/yellow] {escape(note)}")


def render_recipe(r: dict[str, Any], console: Console) -> None:
    """A recipe's mapping: each setting, its value, and the key or default it came from;
    then the keys read but not modelled, and notes."""
    from rich.markup import escape

    ds = r["deepspeed"]
    head = f"[bold]recipe[/bold] {escape(r['path'])}: {escape(r['trainer'])} ({r['format']})"
    if ds is not None:
        head += f"; DeepSpeed {escape(str(ds['given']))} read from {escape(ds['path'])}"
    console.print(head)
    width = max((len(f"{m['setting']} = {m['value']}") for m in r["mapping"]), default=0)
    for m in r["mapping"]:
        value = "all-linear" if m["value"] == "all-linear" else m["value"]
        left = f"{m['setting']} = {value}"
        if m["source"] == "recipe":
            source = m["key"]
        elif m["key"]:
            source = f"{m['key']}: {m['source']}"
        else:
            source = m["source"]
        console.print(f"  {escape(left):<{width}}  <- {escape(source)}", highlight=False)
    for item in r["ignored"]:
        console.print(f"  ignored: {escape(item['key'])}: {escape(item['why'])}", highlight=False)
    for note in r["notes"]:
        console.print(f"  note: {escape(note)}", highlight=False)


def render_as_written(w: dict[str, Any], console: Console) -> None:
    """The recipe as written on the cluster: fits or not, and its predicted speed."""
    from rich.markup import escape

    if "error" in w:
        console.print(f"[bold]as written[/bold]: refused: {escape(w['error'])}")
        return
    verdict = "fits" if w["fits"] else "[red]does not fit[/red]"
    speed = f", {w['tokens_per_s']:,.0f} tokens/s predicted" if w["tokens_per_s"] else ""
    console.print(
        f"[bold]as written[/bold] ({escape(w['family'])}, {escape(w['describe'])}): {verdict}: "
        f"{w['required_bytes'] / 2**30:.2f} GiB needed of {w['gpu_memory_bytes'] / 2**30:.2f} "
        f"GiB{speed}"
    )
