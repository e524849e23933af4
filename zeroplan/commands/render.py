"""Human output: rich tables of what the core computed. Nothing here computes memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from zeroplan.hardware import DEFAULT_CPU_CORES_PER_GPU
from zeroplan.speed import HOST_BOUND_REPEAT_SPREAD, UNCALIBRATED

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

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


def _remedies(setup: dict[str, Any]) -> str:
    """The switches that would lower this setup's peak and are not already on: 'a, b or c'."""
    tries = []
    if not setup["grad_ckpt"]:
        tries.append("--grad-ckpt")
    if setup["micro_batch"] > 1:
        tries.append("a smaller --micro-batch")
    if setup["method"] == "lora":
        tries.append("--method qlora")
    if not setup["fused_loss"]:
        tries.append("--fused-loss")
    if setup["zero"] is None:
        tries.append("a ZeRO stage")
    elif setup["zero"] < 3:
        tries.append("a higher ZeRO stage")
    elif setup["offload"] != "optimizer+params":
        tries.append("--offload")
    if not tries:
        return "more or larger GPUs"
    return tries[0] if len(tries) == 1 else ", ".join(tries[:-1]) + " or " + tries[-1]


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
        + (" · Liger kernels" if setup.get("kernels") == "liger" else "")
        + (" · fused LoRA" if setup.get("fused_lora") else "")
        + (" · CUDA graphs" if setup.get("cuda_graphs") else "")
        + f"\n{setup['loop']} loop · autocast {'on' if setup['autocast'] else 'off'} · "
        + f"outputs {'kept' if setup['keep_outputs'] else 'dropped'} in backward"
    )
    # the heading goes above the table, not as its title: a title wraps to the table's width
    console.print(escape(title), highlight=False)
    table = Table(show_edge=False)
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
            f"Try {_remedies(setup)}, or let zeroplan plan {est.model['name']} --gpus "
            f"{est.cluster['spec']} pick."
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
            + f", the launched trainer {speed['launch_seconds']:.3f} s"
            + (
                f", new batch shapes {speed['new_shape_seconds']:.3f} s"
                if speed.get("padded_loop")
                else ""
            )
            + ")."
        )
        bound = "host-bound" if speed["host_bound"] else "GPU-bound"
        band = (
            UNCALIBRATED
            if speed["error_p90"] is None
            else f"On runs no fit saw, 9 in 10 predictions like this came within "
            f"{speed['error_p90']:.0%} of the measured speed ({bound} steps timed alone: "
            f"{speed['step_error_p90']:.0%}"
            + (
                f"; launched runs on real records: {speed['launched_error_p90']:.0%}"
                if speed["launch_seconds"] > 0 and not speed.get("padded_loop")
                else ""
            )
            + ")."
        )
        if speed.get("padded_loop") and speed["error_p90"] is not None:
            band = (
                f"Real tokens of micro-batches padded to their longest record: the trainers' "
                f"own runs came within {speed['error_p90']:.0%} of this, not counting the "
                "1-2 s stalls TRL and axolotl take at some early steps "
                "(benchmarks/results/recipes_gpu.md)."
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


@dataclass(frozen=True)
class Column:
    """One column of a table that is fitted to the terminal (:func:`fitted_table`).

    ``drop``: the order in which columns go when the terminal is too narrow (1 goes first;
    0 never goes). A column whose cells are all alike goes before any other and its value
    is said once, under the table, instead."""

    header: str
    cells: list[str]
    justify: Literal["left", "right"] = "right"
    drop: int = 0

    @property
    def same(self) -> str | None:
        """The one value every cell holds, when there are several rows and they agree."""
        return self.cells[0] if len(self.cells) > 1 and len(set(self.cells)) == 1 else None


def fitted_table(
    columns: list[Column], width: int, row_styles: list[str | None] | None = None
) -> tuple[Table, list[Column]]:
    """The widest table of ``columns`` that fits ``width`` without wrapping a cell, and the
    columns left out of it. Columns whose cells are all alike go first, then by ``drop``;
    a wider terminal shows more columns, never wider cells (no cell wraps: a table wider
    than ``width`` even at its fewest columns is cut with an ellipsis)."""
    from rich.console import Console
    from rich.measure import Measurement

    order = sorted(
        (c for c in columns if c.drop or c.same is not None),
        key=lambda c: (c.same is None, c.drop or len(columns)),
    )
    measure = Console(width=10_000)
    shown, left = list(columns), []

    def build() -> Table:
        from rich.table import Table

        table = Table(show_edge=False, header_style="bold", pad_edge=False)
        for c in shown:
            table.add_column(c.header, justify=c.justify, no_wrap=True, overflow="ellipsis")
        for i in range(len(columns[0].cells) if columns else 0):
            style = row_styles[i] if row_styles else None
            table.add_row(*(c.cells[i] for c in shown), style=style)
        return table

    table = build()
    while order and Measurement.get(measure, measure.options, table).maximum > width:
        gone = order.pop(0)
        shown.remove(gone)
        left.append(gone)
        table = build()
    return table, left


def render_models(rows: list[tuple[str, str, int]], console: Console) -> None:
    table, _ = fitted_table(
        [
            Column("model (Hub id)", [n for n, _, _ in rows], "left"),
            Column("architecture", [a for _, a, _ in rows], "left", drop=1),
            Column("params", [f"{p / 1e9:,.2f} B" for _, _, p in rows]),
        ],
        console.width,
    )
    console.print(table)


def render_gpus(gpus: list[GPU], console: Console) -> None:
    table, _ = fitted_table(
        [
            Column("GPU", [g.name for g in gpus], "left"),
            Column("memory\nGiB", [f"{g.memory_gib:.1f}" for g in gpus]),
            Column("bf16\nTFLOP/s", [f"{g.bf16_tflops:g}" if g.bf16 else "none" for g in gpus]),
            Column("fp16\nTFLOP/s", [f"{g.fp16_tflops:g}" for g in gpus], drop=1),
            Column("bandwidth\nGB/s", [f"{g.memory_bandwidth_gbs:g}" for g in gpus], drop=2),
            Column("link", [g.interconnect for g in gpus], "left"),
            Column("link\nGB/s", [f"{g.link_bandwidth_gbs:g}" for g in gpus]),
            Column("P2P", ["yes" if g.p2p else "no" for g in gpus], "left"),
        ],
        console.width,
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
        f"p90 {pct['p90']:,}, p99 {pct['p99']:,}, longest {d['longest_tokens']:,}; written as "
        f"{escape(d.get('rendered', 'the chat template'))}"
    )
    lost = (
        f"{d['dropped']:,} longer records dropped"
        if d["dropped"]
        else f"{d['truncated']:,} truncated"
        if d["truncated"]
        else "none longer"
    )
    why = d.get("seq_len_from", "given")
    if d.get("batching") == "padded":
        multiple = d["pad_to_multiple_of"]
        console.print(
            f"     seq {d['seq_len']:,} ({why if why != 'given' else '--seq-len'}; {lost}); "
            "each micro-batch padded to its longest record"
            + (f" (a multiple of {multiple})" if multiple > 1 else "")
            + f": {d['padded_length']:,.0f} tokens on average (at most "
            f"{d['padded_peak_length']:,}: the memory's shape), {d['fill']:.1%} of them real; "
            f"{d['distinct_shapes']:,.0f} shapes in the run's {d['micro_batches']:,} micro-batches "
            "per GPU"
        )
    else:
        console.print(
            f"     seq {d['seq_len']:,} ({why if why != 'given' else '--seq-len'}; {lost}); "
            "packed into micro-batches of micro-batch × "
            f"{d['seq_len']:,} tokens (fill below); in rows of {d['seq_len']:,}: {d['fill']:.1%}"
        )
    top = max((c for _, _, c in d["histogram"]), default=0)
    for low, high, count in d["histogram"]:
        bar = "█" * (round(width * count / top) if top else 0)
        console.print(f"     {low:>6,}–{high:<6,} {bar} {count:,}", highlight=False)


# TrainSetup.offload as a plan table's cell
_OFFLOAD = {"none": "-", "optimizer": "optim", "optimizer+params": "optim+params"}


def _zero(stage: int | None, many_gpus: bool) -> str:
    """A plan table's ZeRO cell: the stage, or how the run goes without DeepSpeed."""
    if stage is None:
        return "DDP" if many_gpus else "none"
    return str(stage)


def _label(c: dict[str, Any]) -> str:
    """A plan row's setup in a few words: family, micro-batch × accumulation, the extras."""
    s = c["setup"]
    label = f"{c['family']}: mb {s['micro_batch']} × ga {s['grad_accum']}"
    label += ", ckpt" if s["grad_ckpt"] else ""
    label += ", fused loss" if s["fused_loss"] else ""
    label += ", Liger kernels" if s.get("kernels") == "liger" else ""
    label += ", fused LoRA" if s.get("fused_lora") else ""
    label += ", CUDA graphs" if s.get("cuda_graphs") else ""
    label += f", {s['optim']}" if s["optim"] not in ("adamw", "adamw_torch_fused") else ""
    return label


def render_plan(data: dict[str, Any], console: Console) -> None:
    """The plan as a person reads it: the choice, the ranked alternatives, why others lost."""
    from rich.markup import escape

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
    setups = [c["setup"] for c in rows]
    many = int(data["world_size"]) > 1
    real = "real " if data.get("data") else ""
    columns = [
        Column("#", [str(n) for n in range(1, len(rows) + 1)]),
        Column("method", [s["method"] for s in setups], "left"),
        Column("ZeRO", [_zero(s["zero"], many) for s in setups], "left"),
        Column(
            "offload", [_OFFLOAD.get(s["offload"], s["offload"]) for s in setups], "left", drop=5
        ),
        Column("mb×ga", [f"{s['micro_batch']}×{s['grad_accum']}" for s in setups]),
        Column("ckpt", ["yes" if s["grad_ckpt"] else "no" for s in setups], "left"),
        Column("loss", ["fused" if s["fused_loss"] else "plain" for s in setups], "left", drop=6),
        Column("optimizer", [s["optim"] for s in setups], "left", drop=4),
        Column("need GiB", [f"{c['required_bytes'] / 2**30:.1f}" for c in rows]),
        Column(f"{real}tokens/s", [f"{c['tokens_per_s']:,.0f}" for c in rows]),
        Column("step s", [f"{c['step_seconds']:.2f}" for c in rows], drop=1),
    ]
    if "steps_per_epoch" in best:
        columns.append(Column("fill", [f"{c['fill']:.0%}" for c in rows], drop=2))
        columns.append(Column("steps/ep", [f"{c['steps_per_epoch']:,}" for c in rows], drop=3))
    if "hours" in best:
        columns.append(Column("time", [_duration(c["hours"]) for c in rows]))
    if "cost" in best:
        columns.append(Column("cost", [f"{c['cost']:,.2f}" for c in rows]))
    table, left = fitted_table(
        columns, console.width, ["green" if n == 0 else None for n in range(len(rows))]
    )
    console.print(table)
    left.sort(key=columns.index)
    same = [f"{c.header} {c.same}" for c in left if c.same is not None]
    if same:
        console.print(escape("every row: " + ", ".join(same)), highlight=False)
    narrow = [c.header for c in left if c.same is None]
    if narrow:
        console.print(escape(f"(left out at this width: {', '.join(narrow)})"), highlight=False)
    if "cost" in rows[0]:
        source = req.get("price_source") or "--price-per-gpu-hour"
        line = f"cost at ${req['price_per_gpu_hour']:,.2f} per GPU-hour ({source}"
        line += "; --price-per-gpu-hour to use yours)" if source != "--price-per-gpu-hour" else ")"
        console.print(escape(line))
    bound = f"its step is {'host' if best['host_bound'] else 'GPU'}-bound"
    console.print(
        f"[green]Chosen:[/green] {rows[0]['family']} (row 1): "
        + (
            f"{UNCALIBRATED[:-1]} ({bound})."
            if best["error_p90"] is None
            else f"9 in 10 predictions like it came within {best['error_p90']:.0%} of the "
            f"measured speed on runs no fit saw ({bound})."
        )
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
    head = (
        f"[bold]recipe[/bold] {escape(r['path'])}: {escape(r['trainer'])} ({r['format']}); "
        f"keys it leaves out take {escape(r['trainer'])}'s defaults"
    )
    if ds is not None:
        head += f"; DeepSpeed {escape(str(ds['given']))} read from {escape(ds['path'])}"
    console.print(head)
    from rich.table import Table

    # setting and value never wrap; the source (a key path, a trainer's default) folds in
    # its own column, so a long DeepSpeed key keeps the rows aligned at 80-100 columns
    table = Table(box=None, show_header=False, padding=(0, 1, 0, 2))
    table.add_column("setting", no_wrap=True)
    table.add_column("value", no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("from", style="dim")
    trainer_default = f"default of {r['trainer']}"
    deepspeed = []
    for m in r["mapping"]:
        if m["key"].startswith("zero_optimization."):
            # DeepSpeed's settings go on one wrapped line below: their names are long
            where = "" if m["source"] == "deepspeed file" else f" ({m['source']})"
            deepspeed.append(f"{m['setting']} {m['value']}{where}")
            continue
        if m["source"] == "recipe":
            source = m["key"]
        elif m["source"] == trainer_default:
            source = "default"  # the heading names the trainer and its version
        elif m["key"]:
            source = f"{m['key']}: {m['source']}"
        else:
            source = m["source"]
        table.add_row(escape(m["setting"]), escape(str(m["value"])), escape(source))
    console.print(table)
    if deepspeed:
        console.print("  DeepSpeed file: " + escape(", ".join(deepspeed)), highlight=False)
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
