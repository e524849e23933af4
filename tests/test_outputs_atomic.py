"""outputs.write_atomic: the one writer behind the run's markers, exit files, RUN_DIR files
and DeepSpeed configs. Readers on other nodes may read these files at any moment, and
several nodes or ranks write into one shared folder, so: whole or nothing, no temporaries
left behind, and no two writers on one temporary name."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from zeroplan.outputs import atomic_temp_name, write_atomic


def test_the_file_is_written_whole_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "node0.json"
    text = '{"status": "done"}\n' + "x" * 100_000 + "\n"
    write_atomic(target, text)
    assert target.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["node0.json"]


def test_an_old_file_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "launch.json"
    target.write_text("old, and longer than the new text\n", encoding="utf-8")
    write_atomic(target, "new\n")
    assert target.read_text(encoding="utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["launch.json"]


def test_text_is_utf8_and_newlines_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_atomic(target, "größe → 1\nzwei\n")
    assert target.read_bytes() == "größe → 1\nzwei\n".encode()


def test_the_file_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("fsync, calls", [(False, 0), (True, 1)])
def test_fsync_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool, calls: int
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    write_atomic(tmp_path / "a.json", "{}\n", fsync=fsync)
    assert len(synced) == calls


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    target = tmp_path / "rank0.exit.json"
    target.write_text("old\n", encoding="utf-8")

    def fails(src: Any, dst: Any) -> None:
        raise error

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(type(error)):
        write_atomic(target, "new\n")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rank0.exit.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate fails half-way through
        write_atomic(target, "a" * 10_000 + "\ud800")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_missing_folder_is_an_oserror_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "a.json", "{}\n")
    assert list(tmp_path.iterdir()) == []


def test_temp_names_are_hidden_beside_the_target_and_apart_per_process_and_call() -> None:
    name = atomic_temp_name("node0.json", 4242, "ab12")
    assert name == ".node0.json.4242.ab12.tmp"
    # another process (pid), or another call of the same process (token), another name
    assert atomic_temp_name("node0.json", 4243, "ab12") != name
    assert atomic_temp_name("node0.json", 4242, "cd34") != name


def test_two_calls_in_one_process_use_two_temp_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[Path] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        renamed.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomic(tmp_path / "a.json", "1\n")
    write_atomic(tmp_path / "a.json", "2\n")
    assert len(set(renamed)) == 2
    for tmp in renamed:
        assert tmp.parent == tmp_path  # same folder: the rename stays on one file system
        assert tmp.name.startswith(f".a.json.{os.getpid()}.") and tmp.name.endswith(".tmp")


def test_concurrent_writers_in_one_folder_never_collide(tmp_path: Path) -> None:
    """Eight threads (one pid, so only the random part keeps them apart) write one target
    and a file each, many times: no writer fails on a name in use (O_EXCL would say so), the
    target always holds one writer's whole text, and no temporary is left."""
    target = tmp_path / "shared.json"
    texts = [f'{{"writer": {i}, "pad": "{"x" * 5000}"}}\n' for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(texts))

    def writer(i: int) -> None:
        try:
            start.wait()
            for _ in range(200):
                write_atomic(target, texts[i])
                write_atomic(tmp_path / f"own{i}.json", texts[i])
                assert target.read_text(encoding="utf-8") in texts
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text(encoding="utf-8") in texts
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["shared.json"] + [f"own{i}.json" for i in range(8)])


def test_bytes_are_written_as_they_are(tmp_path: Path) -> None:
    """The tokenizer download writes its files' bytes through the same writer."""
    target = tmp_path / "tokenizer.json"
    body = b'{"model": "\xc3\xa9"}\x00\xff'
    write_atomic(target, body)
    assert target.read_bytes() == body
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
