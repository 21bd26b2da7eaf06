"""pica.io under faults (issue 16, items 9-11, 13, 16): other filesystems, read-only parents, failed
flushes, killed writers, permissions. Faults are injected (no real mounts needed)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pica.io import staging as io_staging
from pica.io import AdapterFileError, atomic_directory, atomic_directory_update, reading_directory


def _listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _inside(path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


@pytest.fixture
def other_filesystem(monkeypatch):
    """``other_filesystem(root)``: from then on, renames in or out of ``root`` fail with EXDEV, as for a
    mount point or a symlink to another filesystem."""
    real_replace = os.replace

    def install(root: Path) -> None:
        def replace(source, destination):
            if _inside(source, root) != _inside(destination, root):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
            return real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os.path, "ismount", lambda path: Path(path).resolve() == root.resolve())

    return install


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(directory)``: creating entries directly in ``directory`` fails with EROFS (root ignores
    permission bits, so the fault is injected)."""
    real_mkdir, real_access = os.mkdir, os.access

    def install(directory: Path) -> None:
        def mkdir(path, mode=0o777, *args, **kwargs):
            if Path(path).parent.resolve() == directory.resolve():
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path).resolve() == directory.resolve()
                            else real_access(path, mode, **kw))

    return install


def test_update_of_a_mount_point_or_under_a_read_only_parent_succeeds(tmp_path, other_filesystem, read_only):
    target = tmp_path / "volume"
    target.mkdir()
    (target / "weights").write_text("old")
    other_filesystem(target)
    read_only(tmp_path)
    with atomic_directory_update(target, last=("config",)) as staging:
        (staging / "weights").write_text("new")
        (staging / "config").write_text("new")
    assert _listing(target) == {"config": b"new", "weights": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


def test_whole_directory_output_onto_a_mount_point(tmp_path, other_filesystem):
    out = tmp_path / "volume"
    out.mkdir()  # an empty mount point (docker volume) is used as it is, without overwrite
    other_filesystem(out)
    with atomic_directory(out) as staging:
        (staging / "a.txt").write_text("first")
        assert not (out / "a.txt").exists()
    assert _listing(out) == {"a.txt": b"first"}
    with pytest.raises(FileExistsError, match="exists"), atomic_directory(out):
        pytest.fail("a non-empty directory needs overwrite")
    with pytest.raises(RuntimeError, match="injected"), atomic_directory(out, overwrite=True) as staging:
        (staging / "b.txt").write_text("half")
        raise RuntimeError("injected")
    assert _listing(out) == {"a.txt": b"first"} and sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("second")
    assert _listing(out) == {"sub/b.txt": b"second"} and sorted(p.name for p in out.iterdir()) == ["sub"]


def test_whole_directory_output_under_a_read_only_parent(tmp_path, read_only):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    read_only(tmp_path)
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert _listing(out) == {"new.txt": b"new"}


def test_symlinked_output_is_written_through(tmp_path):
    real = tmp_path / "elsewhere" / "real"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with atomic_directory(link, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert link.is_symlink() and _listing(real) == {"new.txt": b"new"}


@pytest.mark.parametrize("writer", ["update", "whole"])
def test_a_failed_flush_is_an_error_and_replaces_nothing(tmp_path, monkeypatch, writer):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")

    def failing_fsync(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    context = atomic_directory_update(target) if writer == "update" else atomic_directory(target, overwrite=True)
    with pytest.raises(OSError, match="cannot flush .* to disk"), context as staging:
        (staging / "weights").write_text("new")
    monkeypatch.undo()
    assert _listing(target) == {"weights": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in target.iterdir()) == ["weights"]


def test_directory_fsync_unsupported_is_not_an_error(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # e.g. some network filesystems
        return real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_directory_update(tmp_path / "t") as staging:
        (staging / "x").write_text("1")
    assert _listing(tmp_path / "t") == {"x": b"1"}


def test_directories_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "export") as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "w").write_text("1")
        with atomic_directory_update(tmp_path / "adapter") as staging:
            (staging / "w").write_text("1")
    finally:
        os.umask(previous)
    for path in (tmp_path / "export", tmp_path / "export" / "sub", tmp_path / "adapter"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    assert stat.S_IMODE((tmp_path / "adapter" / "w").stat().st_mode) == 0o644


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(directory: Path, name: str, state: str, pid: int, files: dict[str, str]) -> Path:
    prefix = f".{name}." if name else "."
    path = directory / f"{prefix}pica-{state}-{pid}-0123abcd@{io_staging._host()}"
    path.mkdir()
    for relative, text in files.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_text(text)
    return path


@pytest.mark.parametrize("state", ["complete", "old"])
def test_a_killed_publish_never_replaces_what_is_at_its_path_now(tmp_path, caplog, state):
    """The issue's case: a leftover of a killed publish, then the user makes ``out/``; the next unrelated pica
    write in that folder used to publish the leftover over ``out/``, deleting the user's files."""
    leftover = _leftover(tmp_path, "out", state, _dead_pid(), {"results.json": "killed run"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "important.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="pica.io.outputs"):
        with atomic_directory(tmp_path / "other") as staging:
            (staging / "x").write_text("1")
    assert _listing(tmp_path / "out") == {"important.txt": b"mine"}
    kept = tmp_path / f"out.pica-{'interrupted' if state == 'complete' else 'previous'}-0123abcd"
    assert not leftover.exists() and _listing(kept) == {"results.json": b"killed run"}
    assert str(kept) in caplog.text and "kept both" in caplog.text
    with atomic_directory(tmp_path / "third") as staging:  # a visible name is not a leftover: left as it is
        (staging / "y").write_text("2")
    assert _listing(kept) == {"results.json": b"killed run"}


def test_next_output_write_finishes_what_killed_writers_left(tmp_path):
    pid = _dead_pid()
    # killed after writing everything, before publishing: its output is published
    _leftover(tmp_path, "out", "complete", pid, {"results.json": "killed run"})
    # killed while writing: removed
    _leftover(tmp_path, "other", "partial", pid, {"model.safetensors": "half"})
    alive = _leftover(tmp_path, "third", "partial", os.getpid(), {"x": "a live writer's"})
    with atomic_directory(tmp_path / "new") as staging:
        (staging / "x").write_text("1")
    assert _listing(tmp_path / "out") == {"results.json": b"killed run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "new", alive.name])
    # killed after moving the old output aside, before renaming the new one in
    (tmp_path / "out2").mkdir()
    _leftover(tmp_path, "out2", "old", pid, {"a": "older"})
    with atomic_directory(tmp_path / "out2", overwrite=True) as staging:
        (staging / "b").write_text("newest")
    assert _listing(tmp_path / "out2") == {"b": b"newest"}
    assert not [p for p in tmp_path.iterdir() if ".out2." in p.name]


def test_interrupted_commit_is_finished_by_the_next_load_or_save(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("new")  # moved in before the kill
    (target / "config").write_text("old")
    leftover = _leftover(target, "", "complete", _dead_pid(), {"config": "new", ".pica-order.json": '["config"]'})
    with reading_directory(target):
        assert _listing(target) == {"config": b"new", "weights": b"new"}
    assert not leftover.exists()
    partial = _leftover(target, "", "partial", _dead_pid(), {"weights": "half"})
    with atomic_directory_update(target) as staging:
        (staging / "other").write_text("x")
    assert not partial.exists() and _listing(target) == {"config": b"new", "other": b"x", "weights": b"new"}


def test_interrupted_commit_on_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    target.mkdir()
    _leftover(target, "", "complete", _dead_pid(), {"config": "new"})

    def read_only_replace(source, destination):
        raise OSError(errno.EROFS, "Read-only file system", str(source))

    monkeypatch.setattr(os, "replace", read_only_replace)
    with pytest.raises(AdapterFileError, match="interrupted .* save the adapter again"):
        with reading_directory(target):
            pytest.fail("must not read a half-moved adapter")


def test_sigterm_during_a_write_leaves_nothing_behind(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from pica.cli import install_signal_handlers\n"
        "from pica.io import atomic_directory\n"
        "install_signal_handlers()\n"
        f"with atomic_directory(Path({str(tmp_path / 'out')!r})) as staging:\n"
        "    (staging / 'big').write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    assert child.stdout.readline().strip() == "writing"
    child.terminate()
    assert child.wait(timeout=60) == 128 + 15
    assert list(tmp_path.iterdir()) == []


def test_peft_save_and_export_onto_a_mount_point_under_a_read_only_parent(tmp_path, other_filesystem, read_only):
    """What Trainer.save_model does after training, into a docker volume: must work as plain peft does."""
    import torch
    from peft import PeftModel, get_peft_model

    import pica
    from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=4))
    randomize_updates(model)
    volume = tmp_path / "volume"
    volume.mkdir()
    other_filesystem(volume)
    read_only(tmp_path)
    previous = os.umask(0o022)
    try:
        model.save_pretrained(volume / "adapter")  # a new directory on the volume
        model.save_pretrained(volume)  # the mount point itself
        pica.export_lora(model, volume / "lora")
    finally:
        os.umask(previous)
    for path in (volume / "adapter", volume):
        loaded = PeftModel.from_pretrained(make_llama(), path)
        assert torch.equal(model_output(loaded, example_inputs("llama")), model_output(model, example_inputs("llama")))
    assert stat.S_IMODE((volume / "lora").stat().st_mode) == 0o755  # readable by a serving process of another user
    assert not [p for p in volume.rglob(".pica-*")]
