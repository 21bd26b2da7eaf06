"""pica.io: atomic directory updates and adapter-file checks (no peft involved)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pica.io import AdapterFileError, atomic_directory, atomic_directory_update, check_safetensors_file, read_json_object


def _listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.txt").write_text("new")
        assert not (tmp_path / "out").exists()
    assert _listing(tmp_path / "out") == {"sub/a.txt": b"new"}
    with pytest.raises(RuntimeError, match="injected"), atomic_directory(tmp_path / "other") as staging:
        (staging / "a.txt").write_text("partial")
        raise RuntimeError("injected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory, no staging


def test_atomic_directory_overwrite_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="what: .*out exists and is not empty; pass --overwrite \\(overwrite=True\\)"):
        with atomic_directory(tmp_path / "out", what="what"):
            pytest.fail("the block must not run")
    with pytest.raises(RuntimeError, match="injected"), atomic_directory(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("injected")
    assert _listing(tmp_path / "out") == {"old.txt": b"old"}
    with atomic_directory(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert _listing(tmp_path / "out") == {"old.txt": b"old"}
    assert _listing(tmp_path / "out") == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"), atomic_directory(tmp_path / "file", True):
        pytest.fail("the block must not run")
    assert (tmp_path / "file").read_text() == "x"


def test_update_replaces_written_files_and_keeps_the_others(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "optimizer.pt").write_text("keep me")
    (target / "README.md").write_text("user notes")
    with atomic_directory_update(target, seed_files=("README.md",)) as staging:
        assert staging.parent == target and staging.name.startswith(".pica-partial-")  # on the target's filesystem
        assert (staging / "README.md").read_text() == "user notes"  # seeded copy to update
        (staging / "weights").write_text("new")
        (staging / "README.md").write_text("user notes + card")
        (staging / "sub").mkdir()
        (staging / "sub" / "config").write_text("named adapter")
        assert (target / "weights").read_text() == "old"  # nothing visible before the block ends
    assert _listing(target) == {"README.md": b"user notes + card", "optimizer.pt": b"keep me",
                                "sub/config": b"named adapter", "weights": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "optimizer.pt", "sub", "weights"]  # staging removed


def test_failure_while_writing_leaves_target_unchanged(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory_update(target) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert _listing(target) == {"weights": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_new_target_is_created_and_a_file_target_refused(tmp_path):
    with atomic_directory_update(tmp_path / "a" / "b") as staging:
        (staging / "x").write_text("1")
    assert (tmp_path / "a" / "b" / "x").read_text() == "1"
    (tmp_path / "file").write_text("")
    with pytest.raises(AdapterFileError, match="not a directory"):
        with atomic_directory_update(tmp_path / "file"):
            pass


def test_last_files_are_moved_after_the_others(tmp_path, monkeypatch):
    import os

    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real_replace(src, dst)))
    with atomic_directory_update(tmp_path / "t", last=("adapter_config.json",)) as staging:
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            (staging / name).write_text(name)
    order = [name for name in order if not name.startswith(".")]  # the staging directory's own renames
    assert order[-1] == "adapter_config.json" and len(order) == 3


def test_read_json_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": 1}')
    assert read_json_object(path) == {"a": 1}
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(AdapterFileError, match="c.json is not UTF-8"):
        read_json_object(path)


def test_check_safetensors_file_reads_only_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"b": torch.zeros(3), "a": torch.ones(2, 2)}, path)
    assert sorted(check_safetensors_file(path)) == ["a", "b"]
    path.write_bytes(path.read_bytes() + b"\0")  # one byte too many is also inconsistent
    with pytest.raises(AdapterFileError, match="w.safetensors is not a valid safetensors file"):
        check_safetensors_file(path)


def test_a_failed_first_save_leaves_no_empty_directories(tmp_path):
    target = tmp_path / "new" / "adapter"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_directory_update(target) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("writer failed")
    assert not (tmp_path / "new").exists()
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_directory_update(target) as staging:
            raise RuntimeError("writer failed")
    assert _listing(target) == {"mine.txt": b"kept"}
