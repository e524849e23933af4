"""Several nodes without a central launcher: the same ``zeroplan launch`` on every node.

Two ways to say where a node stands, both ending in one ``Rendezvous``:

* explicit flags, as with torchrun: ``--nnodes N --node-rank R --master-addr HOST
  [--master-port P]`` (:func:`from_flags`);
* SLURM: ``srun --nodes N --ntasks-per-node 1 zeroplan launch ...``; each task reads
  ``SLURM_JOB_NODELIST`` (expanded by :func:`expand_nodelist`, no scontrol), ``SLURM_NNODES``,
  ``SLURM_NODEID`` and ``SLURM_JOB_ID`` (:func:`from_slurm`). The step's own
  ``SLURM_STEP_NODELIST`` / ``SLURM_STEP_NUM_NODES`` win when srun set them (a step may use
  part of the allocation). The first host is the rendezvous; the port is derived from the
  job id (:func:`slurm_port`) so that every node computes the same one.

Each node then starts torchrun for its own GPUs with ``--nnodes --node-rank --master-addr
--master-port`` (static rendezvous, hosted by node rank 0).

Before any rank starts, the nodes meet in RUN_DIR, which must be on a filesystem they all
share (:func:`join`): node 0 writes ``RUN_DIR/.nodes/node0.json`` with a fresh token; every
other node waits a bounded time for it, answers with ``node{R}.json`` echoing the token, and
then waits for the rendezvous port to open; node 0 starts torchrun once every node has
answered. A waiting node says what it waits for every few seconds, and after --join-timeout
stops with one line naming the nodes that did not join.

No node may be left waiting for one that has ended: a node that refuses to start
(:func:`refuse`, its one-line error), gives up, or is stopped by Ctrl-C / SIGTERM
(:func:`stop_signals_interrupt`) writes that ending and why into its file, and the nodes
waiting for it stop at once, naming it; node 0's supervisor reads the same files while the
run goes (:func:`failed_nodes`). Every file carries the time it was written, so that an
ending left by an earlier attempt is told from this one's (``JOIN_CLOCK_SKEW_S``), and a
node starting again removes its own (:func:`arrive`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from zeroplan.errors import (
    BadNodeListError,
    BadRendezvousError,
    NodeCountError,
    NodeJoinError,
    RendezvousUnreachableError,
    ZeroplanError,
)
from zeroplan.outputs import read_json_object, write_atomic

if TYPE_CHECKING:
    from zeroplan.hardware import Cluster

ROLL_DIR = ".nodes"
DEFAULT_PORT = 29500  # torchrun's default
# SLURM: a port from the job id, below Linux's ephemeral range (32768-60999) so that no
# client socket of the OS holds it by chance
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
DEFAULT_JOIN_TIMEOUT_S = 300.0
MAX_HOSTS = 100_000

Say = Callable[[str], None]


# -- SLURM's node lists ------------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise ValueError("brackets inside brackets")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError("']' without '['")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_range(body: str) -> list[str]:
    """``07-08,11`` → ["07", "08", "11"]: a range keeps the width of its first bound."""
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"[{body}] holds {item!r}, which is not N or N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"the range {item} runs backwards")
        if int(hi) - int(lo) + len(out) >= MAX_HOSTS:
            raise ValueError(f"the range {item} is longer than {MAX_HOSTS} hosts")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_name(name: str) -> list[str]:
    """One comma-free name, each bracket group expanded in turn: ``r[1-2]n[1-2]`` →
    r1n1, r1n2, r2n1, r2n2 (SLURM's order)."""
    pieces = re.split(r"\[([^\]]*)\]", name)  # text, range, text, range, ..., text
    hosts = [""]
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            hosts = [h + piece for h in hosts]
        else:
            hosts = [h + n for h in hosts for n in _expand_range(piece)]
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"it names more than {MAX_HOSTS} hosts")
    return hosts


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list, expanded in order, as ``scontrol show hostnames`` does.

    ``gpu[07-08,11]`` → gpu07, gpu08, gpu11; ``node1,node[3-4]`` → node1, node3, node4;
    ``a[1-2]-ib`` → a1-ib, a2-ib. A range keeps the zero padding of its first bound
    (``[098-101]`` → 098, 099, 100, 101). Raises BadNodeListError when it does not parse.
    """
    try:
        text = text.strip()
        if not text:
            raise ValueError("it is empty")
        hosts: list[str] = []
        for part in _split_top(text):
            part = part.strip()
            if not part:
                raise ValueError("it has an empty name")
            if re.search(r"\s", part):
                raise ValueError(f"{part!r} holds a space")
            hosts += _expand_name(part)
            if len(hosts) > MAX_HOSTS:
                raise ValueError(f"it names more than {MAX_HOSTS} hosts")
        if any(not h for h in hosts):
            raise ValueError("it has an empty name")
    except ValueError as exc:
        raise BadNodeListError(
            f"cannot read the SLURM node list {text!r}: {exc}; expected names like "
            "gpu[07-08,11] or node1,node[3-4]"
        ) from None
    return hosts


# -- where this node stands --------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """This node's place in a run of ``nnodes`` nodes that meet at master_addr:master_port."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "flags" | "slurm"
    hosts: tuple[str, ...] = ()  # every node's host in node-rank order, when known (SLURM)
    job_id: str | None = None

    @property
    def host(self) -> str:
        """This node's name."""
        return self.hosts[self.node_rank] if self.hosts else socket.gethostname()

    def node_host(self, node_rank: int) -> str:
        if self.hosts:
            return self.hosts[node_rank]
        return self.host if node_rank == self.node_rank else f"node rank {node_rank}"

    @property
    def option(self) -> str:
        """Where the node count came from, as the user wrote it."""
        return "--nnodes" if self.source == "flags" else "SLURM's node list"

    def describe(self) -> str:
        where = f"SLURM job {self.job_id}" if self.source == "slurm" else "--nnodes"
        return (
            f"node rank {self.node_rank} of {self.nnodes} ({where}), rendezvous at "
            f"{self.master_addr}:{self.master_port}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "nnodes": self.nnodes,
            "node_rank": self.node_rank,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "source": self.source,
            "hosts": list(self.hosts),
            "job_id": self.job_id,
        }


def from_flags(
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
) -> Rendezvous | None:
    """``--nnodes N --node-rank R --master-addr HOST [--master-port P]``; None without them."""
    if nnodes is None:
        given = [
            flag
            for flag, value in (("--node-rank", node_rank), ("--master-addr", master_addr))
            if value is not None
        ]
        if given:
            raise BadRendezvousError(
                f"{' and '.join(given)} need --nnodes: give --nnodes N --node-rank R "
                "--master-addr HOST on every node"
            )
        return None
    if nnodes < 1:
        raise BadRendezvousError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes == 1 and node_rank in (None, 0) and master_addr is None:
        return None  # one node: the usual launch
    if node_rank is None or master_addr is None:
        missing = " and ".join(
            f for f, v in (("--node-rank", node_rank), ("--master-addr", master_addr)) if v is None
        )
        raise BadRendezvousError(
            f"--nnodes {nnodes} needs {missing}: the same command on every node, with its "
            "own --node-rank (0 on the node at --master-addr)"
        )
    if not 0 <= node_rank < nnodes:
        raise BadRendezvousError(
            f"--node-rank {node_rank} is out of range for --nnodes {nnodes}: "
            f"ranks go from 0 to {nnodes - 1}"
        )
    if not master_addr.strip():
        raise BadRendezvousError("--master-addr is empty: give the host name of node rank 0")
    return Rendezvous(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr.strip(),
        master_port=DEFAULT_PORT if master_port is None else master_port,
        source="flags",
    )


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: the same on every node, different for jobs whose
    ids differ by less than SLURM_PORT_SPAN."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def from_slurm(environ: Mapping[str, str], master_port: int | None = None) -> Rendezvous | None:
    """This node's place in a SLURM job step, or None when not under SLURM (no SLURM_JOB_ID
    or SLURM_NODEID) or when the step has a single node."""
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    node_id = environ.get("SLURM_NODEID")
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    if not job_id or node_id is None or nodelist is None:
        return None
    hosts = expand_nodelist(nodelist)
    count = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")
    if count is not None and (not count.strip().isdigit() or int(count) != len(hosts)):
        raise BadNodeListError(
            f"SLURM_NNODES={count} but the node list {nodelist!r} names {len(hosts)} hosts"
        )
    if len(hosts) == 1:
        return None
    if not node_id.strip().isdigit() or int(node_id) >= len(hosts):
        raise BadNodeListError(
            f"SLURM_NODEID={node_id} is not a node of {nodelist!r} (0-{len(hosts) - 1})"
        )
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if tasks is not None and tasks.strip().isdigit() and int(tasks) > len(hosts):
        raise BadRendezvousError(
            f"this SLURM step runs {tasks} tasks on {len(hosts)} nodes: zeroplan starts every "
            "GPU's rank itself, so run one task per node (srun --ntasks-per-node 1 zeroplan "
            "launch ...)"
        )
    return Rendezvous(
        nnodes=len(hosts),
        node_rank=int(node_id),
        master_addr=hosts[0],
        master_port=slurm_port(job_id) if master_port is None else master_port,
        source="slurm",
        hosts=tuple(hosts),
        job_id=job_id,
    )


def resolve(
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    environ: Mapping[str, str] | None = None,
) -> Rendezvous | None:
    """Explicit flags first, else SLURM's variables, else None (one node)."""
    rdv = from_flags(nnodes, node_rank, master_addr, master_port)
    if rdv is not None or nnodes is not None:
        return rdv
    return from_slurm(os.environ if environ is None else environ, master_port)


# -- cheap checks (also in a dry run) ----------------------------------------------------------


def check_node_count(planned: Cluster | None, world_size: int, nnodes: int, what: str) -> int:
    """The GPUs per node of a plan run on ``nnodes`` nodes; NodeCountError when the plan was
    made for another node count (its speed, memory and batch assume its own)."""
    if planned is not None:
        if planned.num_nodes != nnodes:
            from zeroplan.hardware import Cluster

            other = Cluster(planned.gpu, planned.gpus_per_node, nnodes)
            raise NodeCountError(
                f"the plan is for {planned.num_nodes} node{'s' if planned.num_nodes > 1 else ''} "
                f"({planned.describe()}), {what} gives {nnodes}: plan again with zeroplan plan "
                f"MODEL --gpus {other.describe(times='x')} -o DIR and launch that plan"
            )
        return planned.gpus_per_node
    if world_size % nnodes:
        raise NodeCountError(
            f"the plan is for {world_size} GPUs, which {what}'s {nnodes} nodes cannot share "
            "evenly: plan again for the nodes you have"
        )
    return world_size // nnodes


def _addresses(host: str, port: int) -> list[tuple[int, str]]:
    """(address family, address) of every address ``host`` resolves to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(int(info[0]), str(info[4][0])) for info in infos]


def check_rendezvous(rdv: Rendezvous) -> None:
    """The rendezvous host resolves; on node rank 0 it is this machine and the port is free."""
    addr, port = rdv.master_addr, rdv.master_port
    try:
        addresses = _addresses(addr, port)
    except (OSError, UnicodeError) as exc:
        raise RendezvousUnreachableError(
            f"the rendezvous host {addr} (port {port}) does not resolve "
            f"({getattr(exc, 'strerror', None) or exc}): give --master-addr the name or "
            "address of node rank 0"
        ) from None
    if rdv.node_rank != 0:
        return
    family, address = addresses[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            raise RendezvousUnreachableError(
                f"node rank 0 hosts the rendezvous, but {addr} is not this machine "
                f"({socket.gethostname()}): run node rank 0 on {addr}, or give it as --master-addr"
            ) from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as torchrun's store binds: connections of the run before, in TIME_WAIT, do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            raise RendezvousUnreachableError(
                f"the rendezvous port {port} is in use on this machine ({addr}): pick another "
                "with --master-port (the same on every node)"
            ) from None


def port_open(host: str, port: int, timeout_s: float = 1.0) -> str | None:
    """None when something listens at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


# -- the nodes meet in RUN_DIR -----------------------------------------------------------------

JOIN_PROGRESS_S = 10.0  # seconds between "waiting for ..." lines
# A marker saying that its node ended (refused, gave up, was stopped) speaks for this
# session when it was written at most this long before this node started: node ranks
# started together (srun, two terminals, a script) reach ``zeroplan launch`` within a few
# seconds of each other, and NTP keeps a cluster's clocks far closer than that. An older
# one is an earlier attempt's: a note, and the wait goes on.
JOIN_CLOCK_SKEW_S = 5.0
# how each ending reads after "node rank R (host) "
ENDINGS = {"refused": "refused to start: ", "gave up": "gave up: ", "stopped": "was stopped "}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) while this node waits for the others."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(exc: KeyboardInterrupt) -> signal.Signals:
    return signal.Signals(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While it lasts, SIGINT, SIGTERM and SIGHUP raise Interrupted (main thread only):
    Python's default SIGTERM would end the process before it could tell the other nodes."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def roll_dir(run_dir: Path) -> Path:
    return run_dir / ROLL_DIR


def _marker(run_dir: Path, node_rank: int) -> Path:
    return roll_dir(run_dir) / f"node{node_rank}.json"


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` and the time it was written (``t``), atomically."""
    write_atomic(path, json.dumps({**data, "t": time.time()}) + "\n")


def _end_of(marker: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(ending, why) when a node's marker says that it ended before the run: one of
    ENDINGS' keys, and the reason."""
    if marker and marker.get("status") in ENDINGS:
        return str(marker["status"]), str(marker.get("why") or "")
    return None


def _ending(marker: Mapping[str, Any]) -> str:
    """A marker's ending as words: 'refused to start: ...', 'was stopped by SIGINT ...'."""
    ending, why = _end_of(marker) or ("gave up", "")
    return f"{ENDINGS[ending]}{why}"


def _ended(node_rank: int, marker: Mapping[str, Any], rdv: Rendezvous | None) -> str:
    """That node's ending, named: 'node rank 1 (gpu08) refused to start: ...'."""
    host = marker.get("host") or (rdv.node_host(node_rank) if rdv is not None else "?")
    return f"node rank {node_rank} ({host}) {_ending(marker)}"


def _this_session(marker: Mapping[str, Any], since: float) -> bool:
    """Written after this node started, give or take JOIN_CLOCK_SKEW_S."""
    t = marker.get("t")
    return isinstance(t, (int, float)) and t >= since - JOIN_CLOCK_SKEW_S


def _record_end(
    run_dir: Path, rdv: Rendezvous, ending: str, why: str, token: str | None = None, **extra: Any
) -> None:
    """This node's marker says that it ended and why (best effort; RUN_DIR is not created)."""
    with contextlib.suppress(OSError):
        roll_dir(run_dir).mkdir(exist_ok=True)
        mine = {"token": token, "status": ending, "why": why, "host": rdv.host, "pid": os.getpid()}
        _write(_marker(run_dir, rdv.node_rank), {**mine, **extra})


def _stopped_by(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return f"by {signal_of(exc).name} while waiting for the other nodes"
    return f"by an error while waiting for the other nodes ({type(exc).__name__}: {exc})"


def _node0(run_dir: Path, rdv: Rendezvous, token: str, status: str, **extra: Any) -> None:
    _write(
        _marker(run_dir, 0),
        {
            "token": token,
            "status": status,
            "host": rdv.host,
            "nnodes": rdv.nnodes,
            "rendezvous": f"{rdv.master_addr}:{rdv.master_port}",
            "pid": os.getpid(),
            **extra,
        },
    )


def arrive(run_dir: Path, rdv: Rendezvous) -> None:
    """This node starts (again): an ending its marker holds from an earlier attempt no
    longer speaks for it, so that a node waiting for this one does not stop on it."""
    path = _marker(run_dir, rdv.node_rank)
    if _end_of(read_json_object(path)) is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def refuse(run_dir: Path, rdv: Rendezvous, why: str, *, finished_run: bool = False) -> None:
    """This node refused to start (``why``: the one-line error): tell the nodes waiting for
    it, which then stop at once rather than at the end of their --join-timeout.

    Only into a RUN_DIR that exists (nothing is created for a refusal; the others then give
    up after their bounded wait). ``finished_run``: refused because RUN_DIR holds an earlier
    run, which every node given the same command refuses alike: that folder is left as it
    is unless a meeting is under way in it (another node waits there). Nor does a node
    rank > 0 write once node 0 has started: its run goes on without this node (a second
    copy of a node's command, refused) and must not be stopped for it."""
    if not run_dir.is_dir() or (finished_run and not roll_dir(run_dir).is_dir()):
        return
    if (
        rdv.node_rank > 0
        and (read_json_object(_marker(run_dir, 0)) or {}).get("status") == "started"
    ):
        return
    _record_end(run_dir, rdv, "refused", why)


def join(
    run_dir: Path,
    rdv: Rendezvous,
    *,
    timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
    poll_s: float = 0.2,
    say: Say | None = None,
    since: float | None = None,
    every_s: float = JOIN_PROGRESS_S,
) -> None:
    """Meet the other nodes in RUN_DIR before any rank starts; returns when this node may
    start torchrun. ``since``: when this node started (``time.time()``; default now), to
    tell this session's markers from an earlier attempt's. ``say`` gets a "waiting for ..."
    line every ``every_s`` seconds.

    Raises (one line each) NodeJoinError when a node does not join within ``timeout_s``
    or another node refused, gave up or was stopped, naming it; RendezvousUnreachableError
    when node 0 started but its port cannot be reached. Whatever ends the wait (those, or
    Ctrl-C: KeyboardInterrupt / Interrupted) is written into this node's marker first, so
    that the nodes still waiting stop too."""
    since = time.time() if since is None else since
    if rdv.node_rank == 0:
        _host(run_dir, rdv, timeout_s, poll_s, say, since, every_s)
    else:
        _follow(run_dir, rdv, timeout_s, poll_s, say, since, every_s)


def _ranks(ranks: list[int], rdv: Rendezvous) -> str:
    """'node ranks 1 (gpu08), 2 (gpu09)'; without a host list (--nnodes), 'node rank 1'."""
    named = [f"{r} ({rdv.node_host(r)})" if rdv.hosts else str(r) for r in ranks]
    return f"node rank{'s' if len(ranks) > 1 else ''} {', '.join(named)}"


def _host(
    run_dir: Path,
    rdv: Rendezvous,
    timeout_s: float,
    poll_s: float,
    say: Say | None,
    since: float,
    every_s: float,
) -> None:
    """Node 0: wait until every other node echoed this session's token."""
    roll = roll_dir(run_dir)
    began = time.monotonic()
    token = secrets.token_hex(8)
    roll.mkdir(parents=True, exist_ok=True)
    for old in roll.glob("node*.json"):
        marker = read_json_object(old)
        if _end_of(marker) is None or not _this_session(marker or {}, since):
            old.unlink(missing_ok=True)  # an earlier session's
    _node0(run_dir, rdv, token, "waiting")
    others = range(1, rdv.nnodes)
    next_say = every_s / 2
    try:
        while True:
            seen = {r: read_json_object(_marker(run_dir, r)) or {} for r in others}
            for r, marker in seen.items():
                if _end_of(marker) and (
                    marker.get("token") == token or _this_session(marker, since)
                ):
                    why = _ended(r, marker, rdv)
                    _node0(run_dir, rdv, token, "stopped", why=f"because {why}")
                    raise NodeJoinError(f"{why} (no rank was started)")
            missing = [r for r in others if seen[r].get("token") != token]
            if not missing:
                _node0(run_dir, rdv, token, "started")
                return
            waited = time.monotonic() - began
            if waited > timeout_s:
                names = _ranks(missing, rdv)
                _node0(
                    run_dir,
                    rdv,
                    token,
                    "gave up",
                    why=f"{names} did not join within {timeout_s:.0f} s",
                    missing=missing,
                )
                raise NodeJoinError(
                    f"{names} did not show up in {run_dir} within {timeout_s:.0f} s: start "
                    "the same zeroplan launch on every node (under SLURM: srun "
                    "--ntasks-per-node 1 zeroplan launch ...), with RUN_DIR on a filesystem "
                    "they all share; a node that refused to start says why in its own output"
                )
            if say is not None and waited >= next_say:
                say(
                    f"waiting for {len(missing)} of {rdv.nnodes} nodes at {rdv.master_addr}:"
                    f"{rdv.master_port} ({_ranks(missing, rdv)}) to join in {run_dir}: "
                    f"{waited:.0f} s of --join-timeout {timeout_s:.0f} s"
                )
                next_say = waited + every_s
            time.sleep(poll_s)
    except ZeroplanError:
        raise  # its ending is written
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _node0(run_dir, rdv, token, "stopped", why=_stopped_by(exc))
        raise


def _follow(
    run_dir: Path,
    rdv: Rendezvous,
    timeout_s: float,
    poll_s: float,
    say: Say | None,
    since: float,
    every_s: float,
) -> None:
    """A node rank > 0: echo node 0's token, then wait for its rendezvous port to open."""
    mine = _marker(run_dir, rdv.node_rank)
    began = time.monotonic()
    next_say = every_s / 2
    echoed: str | None = None
    seen: dict[str, Any] | None = None  # node 0's marker of this session, last read
    earlier: dict[str, Any] | None = None  # an earlier attempt's ending of node 0
    missing: list[int] = [0]
    why = "nothing tried yet"
    try:
        while True:
            head = read_json_object(_marker(run_dir, 0))
            if head is not None and _end_of(head) is not None:
                if (echoed is not None and head.get("token") == echoed) or _this_session(
                    head, since
                ):
                    raise NodeJoinError(f"{_ended(0, head, rdv)} (no rank was started)")
                if earlier is None and say is not None:
                    ago = since - float(head.get("t") or since)
                    say(
                        f"note: node rank 0's last attempt, {ago:.0f} s before this node "
                        f"started, {_ending(head)}; waiting for it to start again"
                    )
                earlier, head = head, None
            if head is not None:
                seen = head
                if head.get("token") != echoed:
                    echoed = str(head.get("token"))
                    _write(mine, {"token": echoed, "host": rdv.host, "pid": os.getpid()})
                missing = [
                    r
                    for r in range(1, rdv.nnodes)
                    if r != rdv.node_rank
                    and (read_json_object(_marker(run_dir, r)) or {}).get("token") != echoed
                ]
                if head.get("status") == "started":
                    why = port_open(rdv.master_addr, rdv.master_port) or ""
                    if not why:
                        return
            waited = time.monotonic() - began
            if waited > timeout_s:
                break
            if say is not None and waited >= next_say:
                what = _following(run_dir, rdv, seen, missing, why)
                say(f"{what}: {waited:.0f} s of --join-timeout {timeout_s:.0f} s")
                next_say = waited + every_s
            time.sleep(poll_s)
    except ZeroplanError:
        raise
    except BaseException as exc:
        _record_end(run_dir, rdv, "stopped", _stopped_by(exc), token=echoed)
        raise
    where = f"{rdv.master_addr}:{rdv.master_port}"
    head_host = rdv.hosts[0] if rdv.hosts else rdv.master_addr
    if seen is None:
        last = ""
        if earlier is not None:
            last = f"; its last attempt {_ending(earlier)}"
        raise NodeJoinError(
            f"node rank 0 ({head_host}) did not join at {where} within {timeout_s:.0f} s "
            f"({_marker(run_dir, 0)} never appeared{last}): start it with the same -o "
            "RUN_DIR; if it was started, it stopped before joining (its output ends in a "
            "'zeroplan: error:' line), or RUN_DIR is not on a filesystem every node shares "
            f"(this is {rdv.host})"
        )
    if seen.get("status") != "started":
        waiting = f"for {_ranks(missing, rdv)}" if missing else "for the other nodes"
        never = f"node rank 0 never started (after {timeout_s:.0f} s)"
        _record_end(run_dir, rdv, "gave up", never, token=echoed)
        raise NodeJoinError(
            f"node rank 0 ({seen.get('host')}) did not start within {timeout_s:.0f} s: it "
            f"was still waiting {waiting} to join in {run_dir}"
        )
    reason = f"cannot reach the rendezvous at {where} from {rdv.host}"
    _record_end(run_dir, rdv, "gave up", reason, token=echoed)
    raise RendezvousUnreachableError(
        f"{reason} within {timeout_s:.0f} s ({why}): check that {rdv.master_addr} is node "
        "rank 0 and that the port is open between the nodes, or pick another with --master-port"
    )


def _following(
    run_dir: Path,
    rdv: Rendezvous,
    head: Mapping[str, Any] | None,
    missing: list[int],
    why: str,
) -> str:
    """What a node rank > 0 waits for, as the start of a progress line."""
    where = f"{rdv.master_addr}:{rdv.master_port}"
    if head is None:
        return f"waiting for node rank 0 at {where} (no {_marker(run_dir, 0)} yet)"
    if head.get("status") == "started":
        return f"waiting for the rendezvous at {where} to open ({why})"
    return (
        f"waiting for {len(missing) + 1} of {rdv.nnodes} nodes at {where} "
        f"(node rank 0, which waits for {_ranks(missing, rdv)})"
        if missing
        else f"waiting for node rank 0 at {where} to start"
    )


def failed_nodes(run_dir: Path) -> dict[int, str]:
    """node rank -> what ended it ("node rank 1 (gpu08) gave up: ..."), for every node
    rank > 0 that gave up joining or was stopped after node 0 started (node 0's supervisor
    reads this while the run goes)."""
    out = {}
    for path in roll_dir(run_dir).glob("node*.json"):
        rank = path.stem[4:]
        marker = read_json_object(path)
        if rank.isdigit() and int(rank) > 0 and marker and _end_of(marker) is not None:
            out[int(rank)] = _ended(int(rank), marker, None)
    return out


def leave(run_dir: Path, rdv: Rendezvous) -> None:
    """Node 0, at the end of a run: remove the meeting place."""
    if rdv.node_rank != 0:
        return
    roll = roll_dir(run_dir)
    for path in roll.glob("*"):
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        roll.rmdir()
