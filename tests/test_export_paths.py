"""Where fastdd.export writes: class names as safe folder names, and destinations it must not merge into
or replace."""
import re

import pytest
import torch

from fastdd import export
from fastdd.distilled import DistilledSet


def _set(classes=None):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 10, generator=g)
    return DistilledSet(images, torch.arange(3).repeat_interleave(2), "clp", {"ipc": 2}, [1.0, 0.5],
                        classes=classes)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("classes, folders", [
    (["T-shirt/top", "..", "bag"], ["T-shirt_top", "__", "bag"]),  # Fashion-MNIST's class 0
    (["", ".", "a\0b"], ["_", "_", "a_b"]),  # "" and "." share "_": refused below
])
def test_class_names_that_are_not_one_path_component_get_safe_folder_names(tmp_path, classes, folders):
    out = _set(classes)
    if len(set(folders)) < len(folders):
        with pytest.raises(ValueError, match="'' and '.' -> '_'"):
            out.export(tmp_path / "images", "folder")
        assert _files(tmp_path) == []  # nothing written
        return
    out.export(tmp_path / "images", "folder")
    assert [p.name for p in tmp_path.iterdir()] == ["images"]  # nothing outside the folder ('..')
    back = export.load(tmp_path / "images")
    assert back.classes == sorted(folders)  # the safe names, as ImageFolder reads them
    for name, folder in zip(classes, folders):
        mine = out.images[out.labels == classes.index(name)]
        theirs = back.images[back.labels == back.classes.index(folder)]
        torch.testing.assert_close(theirs, mine, atol=0.5 / 255 + 1e-6, rtol=0)


def test_colliding_folder_names_name_the_classes(tmp_path):
    with pytest.raises(ValueError, match=r"'T-shirt/top' and 'T-shirt_top' -> 'T-shirt_top'"):
        _set(["T-shirt/top", "T-shirt_top", "bag"]).export(tmp_path / "f", "folder")
    with pytest.raises(ValueError, match=r"distinct folder names: 'a' and 'a' -> 'a'"):
        _set(["a", "a", "b"]).export(tmp_path / "f", "folder")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("fmt", ["folder", "dcbench"])
def test_folder_formats_write_only_into_a_new_or_empty_folder(tmp_path, fmt):
    out = _set(["boot", "coat", "bag"])
    earlier = tmp_path / "earlier"
    _set(["x", "y", "z"]).export(earlier, fmt)
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"'{re.escape(str(earlier))}' is a folder that is not empty.*new or empty"):
        out.export(earlier, fmt)
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before  # not merged into
    (tmp_path / "file").write_bytes(b"keep")
    file = re.escape(str(tmp_path / "file"))
    with pytest.raises(ValueError, match=f"'{file}' is a file, but the {fmt} format writes a folder"):
        out.export(tmp_path / "file", fmt)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        out.export(tmp_path / "file" / "sub", fmt)
    assert (tmp_path / "file").read_bytes() == b"keep"
    (tmp_path / "empty").mkdir()
    assert export.load(out.export(tmp_path / "empty", fmt)).labels.tolist() == out.labels.tolist()


@pytest.mark.parametrize("fmt, name", [("lgm", "data.pth"), ("grid", "grid.png")])
def test_file_formats_replace_only_a_file_of_their_own_format(tmp_path, fmt, name):
    path = tmp_path / name
    _set().export(path, fmt)
    first = path.read_bytes()
    brighter = DistilledSet(_set().images * 0.5, _set().labels, "clp")
    brighter.export(path, fmt)  # an earlier export of the format: replaced
    assert path.read_bytes() != first
    _set().save(tmp_path / "set.pt")  # the distilled set itself, or any other file: kept
    kept = (tmp_path / "set.pt").read_bytes()
    with pytest.raises(ValueError, match="exists and is not an? (PNG|LGM data.pth) file.*choose another path"):
        _set().export(tmp_path / "set.pt", fmt)
    assert (tmp_path / "set.pt").read_bytes() == kept
    with pytest.raises(ValueError, match=f"is a folder, but the {fmt} format writes one file"):
        _set().export(tmp_path, fmt)


def test_dcbench_normalisation_is_checked(tmp_path):
    with pytest.raises(ValueError, match="std must be a finite number > 0"):
        _set().export(tmp_path / "dc", "dcbench", mean=(0.5, 0.5, 0.5), std=(0.3, 0.0, 0.3))
    with pytest.raises(ValueError, match="1 or 3 values"):
        _set().export(tmp_path / "dc", "dcbench", mean=(0.5, 0.5), std=(0.3, 0.3))
    assert not (tmp_path / "dc").exists()
