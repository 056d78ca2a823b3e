"""Distilled sets in the formats of the neighbouring codebases and back (fastdd.export), and
DistilledSet as a map-style dataset."""
import pytest
import torch

from fastdd import export
from fastdd.distilled import DistilledSet
from fastdd.files import CorruptFileError
from test_api import _TinyNet  # the distill tests' tiny encoder


def _set(classes=None):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 10, generator=g)
    return DistilledSet(images, torch.arange(3).repeat_interleave(2), "clp", {"ipc": 2}, [1.0, 0.5],
                        classes=classes)


def test_a_distilled_set_is_a_map_style_dataset():
    out = _set()
    assert len(out) == 6
    image, label = out[3]
    assert torch.equal(image, out.images[3]) and label == 1
    batches = list(torch.utils.data.DataLoader(out, batch_size=4))
    assert torch.equal(torch.cat([b[0] for b in batches]), out.images)
    assert torch.cat([b[1] for b in batches]).tolist() == out.labels.tolist()
    images, labels = out  # still unpacks
    assert images is out.images and labels is out.labels


def test_class_names_survive_save_and_load(tmp_path):
    out = _set(["boot", "coat", "bag"])
    out.save(tmp_path / "set.pt")
    assert DistilledSet.load(tmp_path / "set.pt").classes == ["boot", "coat", "bag"]


@pytest.mark.parametrize("fmt, name", [("lgm", "data.pth"), ("dcbench", "dc"), ("folder", "images")])
def test_export_and_load_round_trip(tmp_path, fmt, name):
    out = _set(["boot", "coat", "bag"])
    path = out.export(tmp_path / name, fmt)
    back = export.load(path)
    assert back.labels.tolist() == out.labels.tolist() and back.method == f"imported:{fmt}"
    if fmt != "folder":
        assert torch.equal(back.images, out.images)
        return
    # class names are the folder names, sorted as ImageFolder sorts them; PNG keeps 8-bit pixels
    assert back.classes == ["bag", "boot", "coat"]
    for name in out.classes:
        mine = out.images[out.labels == out.classes.index(name)]
        theirs = back.images[back.labels == back.classes.index(name)]
        torch.testing.assert_close(theirs, mine, atol=0.5 / 255 + 1e-6, rtol=0)


def test_lgm_file_is_what_lgm_and_sfm_read(tmp_path):
    out = _set()
    export.save_lgm(out, tmp_path / "data.pth")
    raw = torch.load(tmp_path / "data.pth", weights_only=True)
    assert set(raw) == {"images", "labels"} and raw["images"].dtype == torch.float32
    assert torch.equal(raw["images"], out.images) and raw["labels"].dtype == torch.int64


def test_dcbench_normalised_images_need_their_mean_and_std(tmp_path):
    out = _set()
    mean, std = (0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)
    export.save_dcbench(out, tmp_path / "dc", mean=mean, std=std)
    with pytest.raises(ValueError, match="pass the mean and std"):
        export.load(tmp_path / "dc")
    back = export.load(tmp_path / "dc" / "images_best.pt", mean=mean, std=std)
    torch.testing.assert_close(back.images, out.images, atol=1e-6, rtol=0)


def test_imported_rows_are_sorted_class_major(tmp_path):
    images, labels = torch.rand(4, 3, 5, 5), torch.tensor([1, 0, 1, 0])
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pth")
    back = export.load(tmp_path / "data.pth")
    assert back.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(back.images, images[[1, 3, 0, 2]])


def test_grid_has_a_row_per_class(tmp_path):
    from PIL import Image

    path = export.save_grid(_set(), tmp_path / "grid.png", padding=2)
    with Image.open(path) as im:
        assert im.size == (2 * (10 + 2) + 2, 3 * (8 + 2) + 2)


def test_bad_inputs_are_named(tmp_path):
    out = _set()
    with pytest.raises(ValueError, match="format must be one of"):
        out.export(tmp_path / "x", "hdf5")
    with pytest.raises(ValueError, match="distinct folder names"):
        _set(["a", "a", "b"]).export(tmp_path / "f", "folder")
    with pytest.raises(FileNotFoundError):
        export.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="cannot be read") as info:
        export.load(tmp_path / "junk.pt")
    assert "weights_only=False" not in str(info.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a fastdd DistilledSet"):
        export.load(tmp_path / "other.pt")
    out.save(tmp_path / "set.pt")  # a damaged fastdd file stays a fastdd error
    raw = bytearray((tmp_path / "set.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "set.pt").write_bytes(bytes(raw))
    with pytest.raises((CorruptFileError, ValueError)):
        export.load(tmp_path / "set.pt")


def test_distill_keeps_the_class_names_of_its_source_and_takes_a_split():
    import fastdd
    from fastdd.data import Split
    from fastdd.encoders import wrap

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(6)
    x = torch.rand(len(y), 3, 10, 10, generator=g) * 0.5 + 0.2
    x[torch.arange(len(y)), y] += 0.25
    split, encoder = Split(x, y, ["ant", "bee", "cat"]), wrap(_TinyNet())
    out = fastdd.distill(split, encoder, "sfm", steps=1, progress=False, batch_size=8)
    assert out.classes == ["ant", "bee", "cat"]
    plain = fastdd.distill(x, encoder, "sfm", labels=y, steps=1, progress=False, batch_size=8)
    assert plain.classes is None and torch.equal(plain.images, out.images) and out.settings["recipe"] is None
    with pytest.raises(ValueError, match="Split"):
        fastdd.distill(split, encoder, "sfm", labels=y, steps=1, progress=False)


def test_named_writers_and_evaluate_from_a_path(tmp_path, monkeypatch):
    from fastdd import probe

    out = _set(["a", "b", "c"])
    assert sorted(p.name for p in out.save_images(tmp_path / "png").iterdir()) == ["a", "b", "c"]
    assert out.save_grid(tmp_path / "g.png").is_file()
    out.export(tmp_path / "data.pth", "lgm")
    images, labels = probe._unpack_distilled(str(tmp_path / "data.pth"))
    assert torch.equal(images, out.images) and torch.equal(labels, out.labels)


def test_evaluate_takes_the_kinds_of_test_data_distill_takes():
    from fastdd import encoders, probe
    from fastdd.data import Split

    torch.manual_seed(0)
    encoder = encoders.wrap(_TinyNet())
    out = _set()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(12, 3, 8, 10, generator=g) * 255).round().to(torch.uint8)
    y = torch.arange(3).repeat(4)
    kw = dict(epochs=2, seeds=(0,), progress=False)
    reference = probe.evaluate(out, encoder, x.float() / 255, y, **kw).accuracies
    dataset = torch.utils.data.TensorDataset(x.float() / 255, y)
    for images, labels in [(x, y), (Split(x.float() / 255, y, ["a", "b", "c"]), None), (dataset, None),
                           (torch.utils.data.DataLoader(dataset, batch_size=5), None)]:
        assert probe.evaluate(out, encoder, images, labels, **kw).accuracies == reference
    grey = (x.float() / 255)[:, :1]
    assert probe.evaluate(out, encoder, grey, y, **kw).accuracies == \
        probe.evaluate(out, encoder, grey.expand(-1, 3, -1, -1).contiguous(), y, **kw).accuracies
    with pytest.raises(ValueError, match="test_labels is required"):
        probe.evaluate(out, encoder, x, None, **kw)
