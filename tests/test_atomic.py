"""Atomic writes: all or nothing, and modes that follow the user's umask."""

import os
import stat

import pytest

from sliderquant.atomic import atomic_dir, atomic_path, current_umask, write_text


@pytest.fixture
def umask():
    """Set a umask for one test, then restore the old one."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_umask_modes(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o666 & ~mask
    with atomic_dir(tmp_path / "folder") as staging:
        (staging / "b.txt").write_text("x")
    assert mode(tmp_path / "folder") == 0o777 & ~mask
    assert mode(tmp_path / "folder" / "b.txt") == 0o666 & ~mask


def test_run_folder_and_exports_get_the_umask_modes(tmp_path, umask):
    from test_export import tiny_run

    from sliderquant import api

    umask(0o027)
    tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "compressed", tmp_path / "c")
    api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    assert mode(tmp_path / "c") == 0o750 and mode(tmp_path / "m.gguf") == 0o640
    files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {str(p): mode(tmp_path / p) for p in files} == {str(p): 0o640 for p in files}


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("new")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "kept").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "f") as staging:
        (staging / "new").write_text("new")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["kept"]
    with atomic_dir(tmp_path / "f") as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "f"]
