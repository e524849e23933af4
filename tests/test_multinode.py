"""Several nodes without a hostfile: SLURM's node lists, the rendezvous a node reads from
its flags or from SLURM's variables, the torchrun command of one node, the checks before
anything starts, and the nodes meeting in RUN_DIR. The real two-node runs (two launches on
this machine acting as two nodes) are in test_multinode_run.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from zeroplan.errors import (
    BadNodeListError,
    BadRendezvousError,
    NodeCountError,
    NodeJoinError,
    RendezvousUnreachableError,
)
from zeroplan.hardware import parse_cluster
from zeroplan.launch import multinode
from zeroplan.launch.multinode import (
    Rendezvous,
    check_node_count,
    expand_nodelist,
    from_flags,
    from_slurm,
    slurm_port,
)
from zeroplan.launch.preflight import preflight
from zeroplan.launch.runner import (
    Node,
    TrainOptions,
    build_launch,
    plan_model,
    read_plan,
    write_files,
)
from zeroplan.models import load_model
from zeroplan.trainsetup import TrainSetup

pytestmark = pytest.mark.usefixtures("isolated_hf")

QWEN = "Qwen/Qwen2.5-0.5B"


# -- SLURM's node lists ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("gpu07", ["gpu07"]),
        ("gpu[07-08,11]", ["gpu07", "gpu08", "gpu11"]),
        ("node1,node[3-4]", ["node1", "node3", "node4"]),
        ("a[098-101]", ["a098", "a099", "a100", "a101"]),  # width of the first bound
        ("n[8-10]", ["n8", "n9", "n10"]),  # no padding
        ("n[1]", ["n1"]),
        ("[1-2]x", ["1x", "2x"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("gpu[1-2]-ib,login", ["gpu1-ib", "gpu2-ib", "login"]),
        ("a[3,1-2],b", ["a3", "a1", "a2", "b"]),  # order kept, as scontrol keeps it
        (" node[1-2] ", ["node1", "node2"]),
        ("node-a.cluster.org,node-b.cluster.org", ["node-a.cluster.org", "node-b.cluster.org"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
        ("x[0-0]", ["x0"]),
        ("x[00-03]", ["x00", "x01", "x02", "x03"]),
    ],
)
def test_node_lists_expand_as_scontrol_does(text: str, hosts: list[str]) -> None:
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "it is empty"),
        ("gpu[07-08", "'[' without ']'"),
        ("gpu07]", "']' without '['"),
        ("gpu[[1]]", "brackets inside brackets"),
        ("gpu[5-3]", "the range 5-3 runs backwards"),
        ("gpu[a-b]", "which is not N or N-M"),
        ("gpu[]", "which is not N or N-M"),
        ("gpu[1-]", "which is not N or N-M"),
        ("a,,b", "an empty name"),
        ("a b", "holds a space"),
        ("n[0-999999]", "longer than 100000 hosts"),
    ],
)
def test_node_lists_that_do_not_parse_say_why(text: str, why: str) -> None:
    with pytest.raises(BadNodeListError) as err:
        expand_nodelist(text)
    assert why in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"cannot read the SLURM node list {text.strip()!r}")


# -- where this node stands -----------------------------------------------------------------


def slurm(**over: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "2",
    }
    return {**env, **over}


def test_slurm_variables_give_rank_hosts_and_a_port_from_the_job_id() -> None:
    rdv = from_slurm(slurm())
    assert rdv == Rendezvous(
        nnodes=2,
        node_rank=1,
        master_addr="gpu07",
        master_port=15000 + 4242,
        source="slurm",
        hosts=("gpu07", "gpu08"),
        job_id="4242",
    )
    assert rdv.host == "gpu08" and rdv.node_host(0) == "gpu07"
    assert slurm_port("4242") == slurm_port("4242") != slurm_port("4243")
    assert 15000 <= slurm_port("987654321") < 30000
    # --master-port wins; the step's own node list wins over the job's
    assert from_slurm(slurm(), master_port=23456).master_port == 23456  # type: ignore[union-attr]
    step = from_slurm(
        slurm(SLURM_JOB_NODELIST="gpu[07-10]", SLURM_STEP_NODELIST="gpu[09-10]", SLURM_NNODES="4")
        | {"SLURM_STEP_NUM_NODES": "2"}
    )
    assert step is not None and step.hosts == ("gpu09", "gpu10") and step.master_addr == "gpu09"
    # not under SLURM, or a single node: the usual launch
    assert from_slurm({}) is None
    assert from_slurm({"SLURM_JOB_ID": "1"}) is None
    assert from_slurm(slurm(SLURM_JOB_NODELIST="gpu07", SLURM_NNODES="1", SLURM_NODEID="0")) is None


@pytest.mark.parametrize(
    ("over", "error", "text"),
    [
        ({"SLURM_JOB_NODELIST": "gpu[07-08"}, BadNodeListError, "cannot read the SLURM node list"),
        ({"SLURM_NNODES": "3"}, BadNodeListError, "SLURM_NNODES=3 but the node list"),
        ({"SLURM_NODEID": "2"}, BadNodeListError, "SLURM_NODEID=2 is not a node of"),
        ({"SLURM_NTASKS": "16"}, BadRendezvousError, "srun --ntasks-per-node 1"),
    ],
)
def test_slurm_variables_that_do_not_fit_are_refused(
    over: dict[str, str], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        from_slurm(slurm(**over))


def test_flags_give_a_rendezvous_and_bad_ones_are_refused() -> None:
    rdv = from_flags(2, 1, "node0", None)
    assert rdv is not None and rdv.master_port == 29500 and rdv.source == "flags"
    assert (rdv.nnodes, rdv.node_rank, rdv.master_addr) == (2, 1, "node0")
    assert from_flags(None, None, None, None) is None
    assert from_flags(1, None, None, None) is None  # one node
    for args, text in [
        ((2, 2, "node0", None), "--node-rank 2 is out of range for --nnodes 2"),
        ((2, -1, "node0", None), "--node-rank -1 is out of range"),
        ((2, None, "node0", None), "--nnodes 2 needs --node-rank"),
        ((2, 0, None, None), "--nnodes 2 needs --master-addr"),
        ((0, 0, "a", None), "--nnodes must be at least 1"),
        ((None, 1, None, None), "--node-rank need --nnodes"),
    ]:
        with pytest.raises(BadRendezvousError, match=text):
            from_flags(*args)  # type: ignore[arg-type]
    # flags win over SLURM's variables
    assert multinode.resolve(2, 0, "n0", 1234, slurm()).source == "flags"  # type: ignore[union-attr]
    assert multinode.resolve(None, None, None, None, slurm()).source == "slurm"  # type: ignore[union-attr]


def test_node_count_must_be_the_plans() -> None:
    two = parse_cluster("2x8xH100")
    assert check_node_count(two, 16, 2, "--nnodes") == 8
    with pytest.raises(NodeCountError) as err:
        check_node_count(two, 16, 3, "--nnodes")
    assert str(err.value) == (
        "the plan is for 2 nodes (2×8×H100-SXM-80GB), --nnodes gives 3: plan again with "
        "zeroplan plan MODEL --gpus 3x8xH100-SXM-80GB -o DIR and launch that plan"
    )
    with pytest.raises(NodeCountError, match="the plan is for 1 node"):
        check_node_count(parse_cluster("8xH100"), 8, 2, "the hostfile")
    assert check_node_count(None, 16, 2, "--nnodes") == 8  # a GPU not in the catalog
    with pytest.raises(NodeCountError, match="cannot share"):
        check_node_count(None, 3, 2, "--nnodes")


# -- one node's command ---------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    return path


def two_node_plan(folder: Path, gpus: str = "2x4xH100") -> dict[str, object]:
    data = plan_model(QWEN, parse_cluster(gpus), {"seq_len": 256})
    data["best"]["setup"] = TrainSetup(method="lora", seq_len=256).to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(data, indent=2))
    return read_plan(folder / "plan.json")


def test_each_node_runs_its_own_torchrun_with_rank_and_rendezvous(
    tmp_path: Path, data_file: Path
) -> None:
    plan = two_node_plan(tmp_path / "plan")
    rdv = from_slurm(slurm())
    assert rdv is not None
    la = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=(Node("localhost", (0, 1, 2, 3), True),),
        launcher="torchrun",
        gpu=parse_cluster("H100").gpu,
        train=TrainOptions(),
        inherited={},
        rendezvous=rdv,
    )
    assert la.world_size == 8 and la.num_nodes == 2 and la.first_rank == 4
    assert la.host_of(5) == "gpu08" and la.host_of(3) == "gpu07"
    (cmd,) = la.commands
    argv = list(cmd.argv)
    i = argv.index("torch.distributed.run")
    assert argv[i + 1 : i + 11] == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--nproc-per-node",
        "4",
        "--master-addr",
        "gpu07",
        "--master-port",
        str(15000 + 4242),
    ]
    # node 1 writes only its own record: plan.json and launch.json are node 0's
    assert list(la.files) == ["launch.node1.json"]
    record = json.loads(la.files["launch.node1.json"])
    assert record["rendezvous"]["hosts"] == ["gpu07", "gpu08"] and record["world_size"] == 8
    # several nodes keep InfiniBand even though this launch holds one node
    assert "NCCL_IB_DISABLE" not in la.env
    zero = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=(Node("localhost", (0, 1, 2, 3), True),),
        launcher="torchrun",
        gpu=parse_cluster("H100").gpu,
        train=TrainOptions(),
        inherited={},
        rendezvous=from_slurm(slurm(SLURM_NODEID="0")),
    )
    assert set(zero.files) == {"plan.json", "launch.json"} and zero.first_rank == 0
    with pytest.raises(BadRendezvousError, match="use --hostfile with --launcher deepspeed"):
        build_launch(
            plan,
            run_dir=tmp_path / "run",
            data=str(data_file),
            nodes=(Node("localhost", (0, 1, 2, 3), True),),
            launcher="deepspeed",
            gpu=None,
            train=TrainOptions(),
            rendezvous=rdv,
        )


def test_every_node_refuses_a_run_folder_that_holds_an_earlier_run(
    tmp_path: Path, data_file: Path
) -> None:
    """The same command on every node, into a folder a finished run left: every node refuses
    it alike (node rank 1 used to skip the check and wait for node 0, which had refused)."""
    plan = two_node_plan(tmp_path / "plan")

    def node(rank: int, resume: bool = False) -> object:
        return build_launch(
            plan,
            run_dir=tmp_path / "run",
            data=str(data_file),
            nodes=(Node("localhost", (0, 1, 2, 3), True),),
            launcher="torchrun",
            gpu=parse_cluster("H100").gpu,
            train=TrainOptions(resume=resume),
            inherited={},
            rendezvous=from_flags(2, rank, "127.0.0.1", free_port()),
        )

    # nothing of a session is in RUN_DIR before every node has joined (node 0 writes its
    # files after the join, and each node checks before it joins): a fresh folder passes
    assert preflight(node(1), parse_cluster("4xH100")).ok  # type: ignore[arg-type]
    write_files(node(0))  # type: ignore[arg-type]
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")  # the earlier run: a step
    saved = tmp_path / "run" / "checkpoints" / "checkpoint-1"  # and its checkpoint
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    for rank in (0, 1):
        errors = preflight(node(rank), parse_cluster("4xH100")).errors  # type: ignore[arg-type]
        assert [type(e).__name__ for e in errors] == ["RunDirExistsError"], rank
        assert "--resume continues it, -o NEW_DIR starts another" in str(errors[0])
        assert preflight(node(rank, resume=True), parse_cluster("4xH100")).ok  # type: ignore[arg-type]


# -- the checks before anything starts ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rendezvous_checks_name_host_and_port() -> None:
    with pytest.raises(RendezvousUnreachableError) as err:
        multinode.check_rendezvous(Rendezvous(2, 1, "nonexistent-host.invalid", 29400, "flags"))
    assert str(err.value).startswith(
        "the rendezvous host nonexistent-host.invalid (port 29400) does not resolve"
    )
    multinode.check_rendezvous(Rendezvous(2, 0, "127.0.0.1", free_port(), "flags"))
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousUnreachableError, match=f"port {port} is in use"):
            multinode.check_rendezvous(Rendezvous(2, 0, "127.0.0.1", port, "flags"))
    # node rank 0 hosts the rendezvous: the address must be this machine's
    with pytest.raises(RendezvousUnreachableError, match="is not this machine"):
        multinode.check_rendezvous(Rendezvous(2, 0, "192.0.2.1", free_port(), "flags"))


# -- the nodes meet in RUN_DIR ------------------------------------------------------------


def test_two_nodes_meet_and_a_stale_marker_is_not_taken_for_a_new_session(tmp_path: Path) -> None:
    run = tmp_path / "run"
    port = free_port()
    (run / ".nodes").mkdir(parents=True)
    (run / ".nodes" / "node1.json").write_text(json.dumps({"token": "old"}))  # last session's
    zero, one = from_flags(2, 0, "127.0.0.1", port), from_flags(2, 1, "127.0.0.1", port)
    assert zero is not None and one is not None
    errors: list[BaseException] = []

    def node0() -> None:
        try:
            multinode.join(run, zero, timeout_s=10, poll_s=0.02)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=node0)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # the stale node1.json does not count
    with socket.socket() as server:  # what torchrun's store would open on node 0
        server.bind(("127.0.0.1", port))
        server.listen()
        multinode.join(run, one, timeout_s=10, poll_s=0.02)
    t.join(timeout=10)
    assert not errors
    assert json.loads((run / ".nodes" / "node0.json").read_text())["status"] == "started"
    multinode.leave(run, zero)
    assert not (run / ".nodes").exists()


def test_a_node_waiting_for_node_0_says_so_and_names_it_after_the_bounded_wait(
    tmp_path: Path,
) -> None:
    port = free_port()
    one = from_flags(2, 1, "127.0.0.1", port)
    assert one is not None
    said: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(NodeJoinError) as err:
        multinode.join(
            tmp_path / "run", one, timeout_s=0.5, poll_s=0.05, say=said.append, every_s=0.2
        )
    assert 0.5 <= time.monotonic() - t0 < 5
    assert said and said[0].startswith(
        f"waiting for node rank 0 at 127.0.0.1:{port} (no {tmp_path}/run/.nodes/node0.json yet): "
    )
    assert said[0].endswith(" s of --join-timeout 0 s")
    msg = str(err.value)
    assert msg.startswith(f"node rank 0 (127.0.0.1) did not join at 127.0.0.1:{port} within 0 s")
    # what the user can do: it was not started, it refused (its own output says why), or
    # the folder is not shared
    assert "start it with the same -o RUN_DIR" in msg and "'zeroplan: error:' line" in msg
    assert "RUN_DIR is not on a filesystem every node shares" in msg
    assert "\n" not in msg
    assert not (tmp_path / "run").exists()  # a node rank > 0 creates nothing
    # and node 0, waiting for node 1
    zero = from_flags(2, 0, "127.0.0.1", port)
    assert zero is not None
    said.clear()
    with pytest.raises(NodeJoinError, match=r"^node rank 1 did not show up in "):
        multinode.join(
            tmp_path / "run", zero, timeout_s=0.3, poll_s=0.05, say=said.append, every_s=0.1
        )
    assert said[0].startswith(
        f"waiting for 1 of 2 nodes at 127.0.0.1:{port} (node rank 1) to join in {tmp_path}/run: "
    )


def test_unreachable_rendezvous_names_host_and_port_and_node_0_hears_of_it(tmp_path: Path) -> None:
    run, port = tmp_path / "run", free_port()
    zero, one = from_flags(2, 0, "127.0.0.1", port), from_flags(2, 1, "127.0.0.1", port)
    assert zero is not None and one is not None
    t = threading.Thread(target=multinode.join, args=(run, zero), kwargs={"timeout_s": 10})
    t.start()
    with pytest.raises(RendezvousUnreachableError) as err:
        multinode.join(run, one, timeout_s=1.0, poll_s=0.05)  # nothing listens at the port
    t.join(timeout=10)
    assert str(err.value).startswith(f"cannot reach the rendezvous at 127.0.0.1:{port} from ")
    assert "within 1 s" in str(err.value)
    (rank, why), *_ = multinode.failed_nodes(run).items()
    assert rank == 1 and f"cannot reach the rendezvous at 127.0.0.1:{port}" in why


def test_node_0_names_the_node_that_never_came(tmp_path: Path) -> None:
    zero = from_slurm(slurm(SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu[07-09]", SLURM_NNODES="3"))
    assert zero is not None
    said: list[str] = []
    with pytest.raises(NodeJoinError) as err:
        multinode.join(
            tmp_path / "run", zero, timeout_s=0.3, poll_s=0.05, say=said.append, every_s=0.1
        )
    assert said and said[0].startswith(
        "waiting for 2 of 3 nodes at gpu07:19242 (node ranks 1 (gpu08), 2 (gpu09)) to join in "
        f"{tmp_path}/run: "
    )
    assert str(err.value).startswith(
        f"node ranks 1 (gpu08), 2 (gpu09) did not show up in {tmp_path}/run within 0 s"
    )
    assert "srun --ntasks-per-node 1" in str(err.value)
    # a node that comes later hears of it at once
    node0 = json.loads((tmp_path / "run" / ".nodes" / "node0.json").read_text())
    assert node0["status"] == "gave up" and node0["missing"] == [1, 2]


def in_thread(target: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a thread; the list gets what it raised."""
    raised: list[Any] = []

    def run() -> None:
        try:
            target(*args, **kwargs)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, raised


def test_a_node_that_refuses_stops_the_nodes_waiting_for_it_at_once(tmp_path: Path) -> None:
    run, port = tmp_path / "run", free_port()
    run.mkdir()  # an earlier attempt's, or made by a node that already waits
    zero, one = from_flags(2, 0, "127.0.0.1", port), from_flags(2, 1, "127.0.0.1", port)
    assert zero is not None and one is not None
    busy = f"the rendezvous port {port} is in use on this machine (127.0.0.1): pick another"

    # node 0 refuses while node 1 waits for it
    t, raised = in_thread(multinode.join, run, one, timeout_s=30, poll_s=0.02)
    time.sleep(0.2)
    t0 = time.monotonic()
    multinode.refuse(run, zero, busy)
    t.join(timeout=10)
    assert time.monotonic() - t0 < 5
    (err,) = raised
    assert isinstance(err, NodeJoinError)
    assert (
        str(err)
        == f"node rank 0 ({socket.gethostname()}) refused to start: {busy} (no rank was started)"
    )

    # node 1 refuses while node 0 waits for it; node 0 says why in its marker
    t, raised = in_thread(multinode.join, run, zero, timeout_s=30, poll_s=0.02)
    time.sleep(0.2)
    multinode.refuse(run, one, "data file x.jsonl does not exist")
    t.join(timeout=10)
    (err,) = raised
    assert str(err) == (
        f"node rank 1 ({socket.gethostname()}) refused to start: data file x.jsonl does not "
        "exist (no rank was started)"
    )
    node0 = json.loads((run / ".nodes" / "node0.json").read_text())
    assert node0["status"] == "stopped" and "because node rank 1" in node0["why"]
    # a refusal that came first is heard too (node 0 arriving after it)
    with pytest.raises(NodeJoinError, match=r"node rank 1 .* refused to start: data file"):
        multinode.join(run, zero, timeout_s=30, poll_s=0.02)


def test_an_earlier_attempts_ending_is_a_note_and_a_new_attempt_clears_its_own(
    tmp_path: Path,
) -> None:
    run, port = tmp_path / "run", free_port()
    run.mkdir()
    zero, one = from_flags(2, 0, "127.0.0.1", port), from_flags(2, 1, "127.0.0.1", port)
    assert zero is not None and one is not None
    multinode.refuse(run, zero, "some refusal")
    said: list[str] = []
    with pytest.raises(NodeJoinError) as err:  # started a minute after that refusal
        multinode.join(
            run, one, timeout_s=0.3, poll_s=0.05, say=said.append, since=time.time() + 60
        )
    assert said[0].startswith("note: node rank 0's last attempt, 60 s before this node started, ")
    assert said[0].endswith("refused to start: some refusal; waiting for it to start again")
    assert "did not join" in str(err.value)
    assert "its last attempt refused to start: some refusal" in str(err.value)
    assert not (run / ".nodes" / "node1.json").exists()  # no meeting to tell of it
    # both start again: what their last attempts said (node 1 refused too, just now) no
    # longer speaks for them, so neither stops on the other's
    multinode.refuse(run, one, "another refusal")
    multinode.arrive(run, zero)
    multinode.arrive(run, one)
    assert not list((run / ".nodes").glob("node*.json"))
    t, raised = in_thread(multinode.join, run, zero, timeout_s=10, poll_s=0.02)
    with socket.socket() as server:  # what torchrun's store would open on node 0
        server.bind(("127.0.0.1", port))
        server.listen()
        multinode.join(run, one, timeout_s=10, poll_s=0.02)
    t.join(timeout=10)
    assert not raised


def test_a_refusal_creates_no_folder_and_leaves_a_finished_run_alone(tmp_path: Path) -> None:
    zero = from_flags(2, 0, "127.0.0.1", free_port())
    assert zero is not None
    multinode.refuse(tmp_path / "typo", zero, "why")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "done").mkdir()
    multinode.refuse(tmp_path / "done", zero, "holds a run", finished_run=True)
    assert not (tmp_path / "done" / ".nodes").exists()  # every node refuses it alike
    (tmp_path / "done" / ".nodes").mkdir()  # ... but another node waits in it
    multinode.refuse(tmp_path / "done", zero, "holds a run", finished_run=True)
    assert json.loads((tmp_path / "done" / ".nodes" / "node0.json").read_text())["status"] == (
        "refused"
    )
    # a second copy of node 1's command, while the run it belongs to goes on, does not
    # stop that run (node 0's supervisor reads node 1's file)
    run = tmp_path / "running"
    (run / ".nodes").mkdir(parents=True)
    (run / ".nodes" / "node0.json").write_text(json.dumps({"token": "t", "status": "started"}))
    (run / ".nodes" / "node1.json").write_text(json.dumps({"token": "t"}))
    one = from_flags(2, 1, "127.0.0.1", free_port())
    assert one is not None
    multinode.refuse(run, one, "holds a run", finished_run=True)
    assert json.loads((run / ".nodes" / "node1.json").read_text()) == {"token": "t"}
    assert not multinode.failed_nodes(run)


# -- the command line -----------------------------------------------------------------------


def cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zeroplan", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def env(subprocess_env: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in subprocess_env.items() if not k.startswith("SLURM")}
    return {**clean, "CUDA_VISIBLE_DEVICES": ""}


def test_dry_run_under_slurm_prints_this_nodes_torchrun(
    tmp_path: Path, data_file: Path, env: dict[str, str]
) -> None:
    two_node_plan(tmp_path / "plan", gpus="2x1xH100")
    slurm_env = {**env, **slurm(SLURM_JOB_NODELIST="localhost,gpu08")}
    proc = cli(
        ["launch", str(tmp_path / "plan"), "--data", str(data_file), "--dry-run", "--force"],
        slurm_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    run = tmp_path / "runs" / "qwen2.5-0.5b-slurm4242"  # the same default on every node
    assert f"run dir    {run}" in out
    assert (
        "this node  gpu08: node rank 1 of 2 (SLURM job 4242), rendezvous at localhost:19242; "
        "global rank 1" in out
    )
    (line,) = [ln for ln in out.splitlines() if "torch.distributed.run" in ln]
    argv = shlex.split(line.split("] ", 1)[1])
    i = argv.index("torch.distributed.run")
    assert argv[i + 1 : i + 11] == [
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1",
        "--master-addr", "localhost", "--master-port", "19242",
    ]  # fmt: skip
    assert f"{run}/launch.node1.json" in out and f"{run}/plan.json\n" not in out
    assert not run.exists()
    # a rendezvous host that does not resolve: everything printed, then one line, status 2
    far = {**env, **slurm(SLURM_JOB_NODELIST="nonexistent-host[1-2].invalid")}
    proc = cli(
        ["launch", str(tmp_path / "plan"), "--data", str(data_file), "--dry-run", "--force"],
        far,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--node-rank 1" in proc.stdout
    assert proc.stderr.startswith(
        "zeroplan: error: the rendezvous host nonexistent-host1.invalid (port 19242) does not resolve"
    )


@pytest.mark.parametrize(
    ("extra", "slurm_env", "text"),
    [
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], {}, "--node-rank 2 is out of range for --nnodes 2"),
        (["--nnodes", "3", "--node-rank", "1", "--master-addr", "127.0.0.1"], {}, "the plan is for 2 nodes (2×1×H100-SXM-80GB), --nnodes gives 3"),
        (["--nnodes", "2", "--node-rank", "1"], {}, "--nnodes 2 needs --master-addr"),
        (["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "NO-OUT"], {}, "--nnodes needs -o RUN_DIR, the same folder on every node"),
        ([], {"SLURM_JOB_NODELIST": "gpu[07-08"}, "cannot read the SLURM node list 'gpu[07-08'"),
        ([], {"SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NNODES": "3", "SLURM_NTASKS": "3"}, "the plan is for 2 nodes (2×1×H100-SXM-80GB), SLURM's node list gives 3"),
        (["--nnodes", "2", "--node-rank", "1", "--master-addr", "nonexistent-host.invalid", "--master-port", "29400"], {}, "the rendezvous host nonexistent-host.invalid (port 29400) does not resolve"),
    ],
)  # fmt: skip
def test_bad_multi_node_input_is_one_line_exit_2_nothing_started(
    tmp_path: Path,
    data_file: Path,
    env: dict[str, str],
    extra: list[str],
    slurm_env: dict[str, str],
    text: str,
) -> None:
    two_node_plan(tmp_path / "plan", gpus="2x1xH100")
    extra = extra[:-1] if extra[-1:] == ["NO-OUT"] else [*extra, "-o", str(tmp_path / "run")]
    e = {**env, **(slurm(**slurm_env) if slurm_env else {})}
    proc = cli(
        ["launch", str(tmp_path / "plan"), "--data", str(data_file), "--force", *extra],
        e,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("zeroplan: error: ") and text in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def start_node(
    tmp_path: Path,
    data_file: Path,
    env: dict[str, str],
    rank: int,
    port: int,
    *extra: str,
    run: str = "run",
    nnodes: int = 2,
) -> subprocess.Popen[str]:
    """One node's ``zeroplan launch`` of tmp_path/plan (one GPU a node) into tmp_path/RUN."""
    args = [sys.executable, "-m", "zeroplan", "launch", str(tmp_path / "plan")]
    args += ["--data", str(data_file), "-o", str(tmp_path / run), "--force", "--no-dashboard"]
    args += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
    args += ["--master-port", str(port), "--join-timeout", "120", *extra]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )


def ended(*procs: subprocess.Popen[str], timeout: float = 60) -> list[tuple[int, str]]:
    """(exit status, stderr) of each; any still running after ``timeout`` is killed."""
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def test_every_node_refuses_an_earlier_run_at_once_instead_of_waiting_for_the_others(
    tmp_path: Path, data_file: Path, env: dict[str, str]
) -> None:
    """The two-node benchmark run twice into the same folders: node 0 refused the finished
    run (exit 2) while node 1 went on to wait for it for the whole --join-timeout."""
    two_node_plan(tmp_path / "plan", gpus="2x1xH100")
    run, port = tmp_path / "run", free_port()
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # what a finished run leaves
    (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (run / "logs").mkdir()
    (run / "metrics.jsonl").write_text('{"event": "end"}\n')
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    t0 = time.monotonic()
    one = start_node(tmp_path, data_file, env, 1, port)
    zero = start_node(tmp_path, data_file, env, 0, port)
    (code0, err0), (code1, err1) = ended(zero, one, timeout=45)  # not the --join-timeout
    assert time.monotonic() - t0 < 45
    line = (
        f"zeroplan: error: {run} already holds a run (checkpoints/checkpoint-3): --resume "
        "continues it"
    )
    for code, err in ((code0, err0), (code1, err1)):
        assert code == 2, err
        assert err.splitlines()[-1].startswith(line), err
        assert "meeting the other nodes" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def marker(run: Path, rank: int) -> dict[str, object]:
    path = run / ".nodes" / f"node{rank}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def wait_for(what: Any, procs: tuple[subprocess.Popen[str], ...], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_node_that_refuses_to_start_stops_the_node_waiting_for_it(
    tmp_path: Path, data_file: Path, env: dict[str, str]
) -> None:
    """Each node has its own reasons to refuse (a port taken on node 0, a data file missing
    on node 1): the other one stops at once, naming it, instead of after --join-timeout."""
    two_node_plan(tmp_path / "plan", gpus="2x1xH100")
    host = socket.gethostname()
    (tmp_path / "run").mkdir()  # an earlier attempt's
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one = start_node(tmp_path, data_file, env, 1, port)  # waits for node 0
        time.sleep(0.5)
        zero = start_node(tmp_path, data_file, env, 0, port)  # its port is taken
        (code0, err0), (code1, err1) = ended(zero, one, timeout=45)
    why = f"the rendezvous port {port} is in use on this machine (127.0.0.1)"
    assert code0 == 2 and err0.splitlines()[-1].startswith(f"zeroplan: error: {why}"), err0
    assert code1 == 2, err1
    last = err1.splitlines()[-1]
    assert last.startswith(f"zeroplan: error: node rank 0 ({host}) refused to start: {why}")
    assert last.endswith("(no rank was started)")

    port = free_port()
    zero = start_node(tmp_path, data_file, env, 0, port)
    wait_for(lambda: marker(tmp_path / "run", 0).get("status") == "waiting", (zero,))
    one = start_node(tmp_path, data_file, env, 1, port, "--data", str(tmp_path / "gone.jsonl"))
    (code0, err0), (code1, err1) = ended(zero, one, timeout=45)
    assert code1 == 2 and "data file" in err1.splitlines()[-1], err1
    assert code0 == 2, err0
    assert err0.splitlines()[-1].startswith(
        f"zeroplan: error: node rank 1 ({host}) refused to start: data file "
        f"{tmp_path}/gone.jsonl does not exist"
    )
    assert not (tmp_path / "run" / "logs").exists()  # no rank was started


@pytest.mark.parametrize(("stopped", "sig", "code"), [(1, "SIGINT", 130), (0, "SIGTERM", 143)])
def test_a_stop_signal_ends_the_wait_here_and_on_the_nodes_waiting_with_it(
    tmp_path: Path, data_file: Path, env: dict[str, str], stopped: int, sig: str, code: int
) -> None:
    """Node ranks 0 and 1 of three wait for node rank 2; Ctrl-C (or SIGTERM) to one of them
    ends its wait cleanly, and the other hears of it through RUN_DIR."""
    two_node_plan(tmp_path / "plan", gpus="3x1xH100")
    run, port, host = tmp_path / "run", free_port(), socket.gethostname()
    nodes = tuple(start_node(tmp_path, data_file, env, r, port, nnodes=3) for r in (0, 1))

    def both_waiting() -> bool:
        token = marker(run, 0).get("token")
        return token is not None and marker(run, 1).get("token") == token

    wait_for(both_waiting, nodes)
    nodes[stopped].send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    results = ended(*nodes, timeout=45)
    assert time.monotonic() - t0 < 30
    (code_here, err_here), (code_other, err_other) = results[stopped], results[1 - stopped]
    assert code_here == code, err_here
    assert err_here.splitlines()[-1] == (
        f"zeroplan: stopped by {sig} while waiting for the other nodes: no rank was started"
    )
    assert code_other == 2, err_other
    assert err_other.splitlines()[-1] == (
        f"zeroplan: error: node rank {stopped} ({host}) was stopped by {sig} while waiting "
        "for the other nodes (no rank was started)"
    )


def test_the_two_node_benchmark_refuses_a_work_folder_an_earlier_run_left(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Run again with the same --work, the benchmark measured the earlier run's metrics
    (and its nodes were refused): it now stops before building anything."""
    root = Path(__file__).resolve().parent.parent
    old = tmp_path / "speed-ddp-2x1xH100"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"event": "end"}\n')
    args = [sys.executable, str(root / "benchmarks" / "launch_two_node_check.py")]
    args += ["--work", str(tmp_path), "--out", str(tmp_path / "out.jsonl"), "--tiny"]
    proc = subprocess.run(
        [*args, "--speed", "ddp"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (
        f"launch_two_node_check: {old} already exists (an earlier run, whose metrics would "
        "be read as this one's): give another --work, or --clean to delete them first\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed-ddp-2x1xH100"]


def test_plan_for_several_nodes_writes_a_slurm_batch_script(tmp_path: Path) -> None:
    from zeroplan.planfiles import write_plan
    from zeroplan.planner import PlanRequest, plan

    out = tmp_path / "plan"
    req = PlanRequest(spec=load_model("llama-3.1-8b-instruct"), cluster=parse_cluster("2x8xH100"))
    names = {p.name for p in write_plan(plan(req), out)}
    assert names >= {"plan.json", "launch.sh", "hostfile", "launch.sbatch"}
    text = (out / "launch.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"):
        assert line in lines
    assert lines[-1] == (
        f'srun --nodes=2 --ntasks-per-node=1 zeroplan launch {out.resolve()}/plan.json --data "$DATA" "$@"'
    )
    assert "must be on a filesystem every node shares" in text
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(out / "launch.sbatch")]).returncode == 0
    one = {
        p.name
        for p in write_plan(
            plan(PlanRequest(spec=req.spec, cluster=parse_cluster("8xH100"))), tmp_path / "one"
        )
    }
    assert "launch.sbatch" not in one and "hostfile" not in one


def test_a_node_stops_waiting_for_torchrun_once_every_rank_of_every_node_finished(
    tmp_path: Path, data_file: Path
) -> None:
    """torchrun's exit barrier waits minutes for the other nodes' agents when one was stopped
    after its ranks had finished (seen with two launches as two nodes): every rank's exit
    file saying 0 is enough."""
    from zeroplan.launch.supervise import Supervisor

    plan = two_node_plan(tmp_path / "plan", gpus="2x1xH100")
    la = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=(Node("localhost", (0,), True),),
        launcher="torchrun",
        gpu=None,
        train=TrainOptions(),
        inherited={},
        rendezvous=from_flags(2, 0, "127.0.0.1", 29400),
    )
    write_files(la)
    sup = Supervisor(la, say=lambda s: None)
    old = time.time() - 60
    (la.log_dir / "rank0.exit.json").write_text(json.dumps({"rank": 0, "returncode": 0, "t": old}))
    assert not sup._all_ranks_done([None])  # rank 1 has not ended
    (la.log_dir / "rank1.exit.json").write_text(json.dumps({"rank": 1, "returncode": 0, "t": old}))
    assert sup._all_ranks_done([None]) and not sup._all_ranks_done([0])
    (la.log_dir / "rank1.exit.json").write_text(
        json.dumps({"rank": 1, "returncode": 0, "t": time.time()})
    )
    assert not sup._all_ranks_done([None])  # the launcher gets a few seconds first
