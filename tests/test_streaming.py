"""Image folders streamed: the items of ``fastdd.data.FolderDataset`` are the in-memory loader's pixels, a pass
over 10,000 images holds about as much memory as one over 1,000 (measured in a subprocess), and the command
line reads a folder through a DataLoader without loading it whole."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdd import cli, data, encoders
from fastdd.stats import RealStats


def _tiny_encoder():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return encoders.wrap(module, input_size=None, name="tiny")


def _write_folder(root, classes, per_class, side, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i:04d}.png", compress_level=1)
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Three classes of images of several sizes and modes (RGB, grey, RGBA, palette; PNG and JPEG)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for c, name in enumerate(["ant", "bee", "cow"]):
        (root / name).mkdir()
        for i, mode in enumerate(["RGB", "L", "RGBA", "P"]):
            image = Image.fromarray(rng.integers(0, 256, (18 + 3 * i, 25 - c, 3), dtype=np.uint8)).convert(mode)
            image.save(root / name / f"{i}.{'jpg' if mode in ('RGB', 'L') else 'png'}")
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_streamed_items_are_the_in_memory_loaders_pixels(mixed_folder):
    from PIL import Image

    whole = data.load_folder(mixed_folder, size=20)
    streamed = data.load_folder(mixed_folder, size=20, stream=True)
    assert len(streamed) == 12 and streamed.classes == whole.classes == ["ant", "bee", "cow"]
    assert streamed.targets == whole.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(len(streamed)):
        image, label = streamed[i]
        assert image.dtype == torch.float32 and image.shape == (3, 20, 20) and label == whole.labels[i]
        assert torch.equal(image, whole.images[i])
        with Image.open(streamed.samples[i][0]) as im:  # the pixels of the loader fastdd always had
            expected = np.asarray(im.convert("RGB").resize((20, 20), Image.BILINEAR), dtype=np.uint8)
        assert torch.equal(image, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255.0)
    batches = list(data.iterate_batches(data.batch_loader(streamed, batch_size=5, workers=2)))
    assert [b[1].shape[0] for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), whole.images)


_PEAK = r"""
import sys
import torch
from fastdd import data, encoders
from fastdd.stats import RealStats

root, count, whole = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "whole"
torch.set_num_threads(1)
module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
encoder = encoders.wrap(module, input_size=None, name="tiny")
if whole:  # the control: the same images loaded whole first
    split = data.load_folder(root, size=64)
    stats = RealStats.from_data(split.images, encoder, labels=split.labels, batch_size=250, progress=False)
else:
    images = torch.utils.data.Subset(data.load_folder(root, size=64, stream=True), range(count))
    stats = RealStats.from_data(data.batch_loader(images, batch_size=250, workers=0), encoder, batch_size=250,
                                progress=False)
assert stats.num_samples == count, stats
# this process's peak resident memory: VmHWM, the peak of the memory map made at exec (getrusage's
# ru_maxrss would not do: Linux carries the peak of the process that started this one over exec)
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))  # kB
"""


def _peak_rss(root, count, whole=False) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK, str(root), str(count), "whole" if whole else "streamed"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak resident memory from /proc/self/status")
def test_a_streamed_pass_holds_one_batch_not_the_folder(tmp_path):
    """RealStats over 10,000 streamed 64 px images peaks within a quarter of the 491 MB the images would
    take in memory of a pass over 1,000 of them; the control, the folder loaded whole, goes past that bound."""
    root = _write_folder(tmp_path / "noise", classes=10, per_class=1000, side=32)
    whole_bytes = 10_000 * 3 * 64 * 64 * 4
    bound = whole_bytes // 4
    small, large = _peak_rss(root, 1000), _peak_rss(root, 10_000)
    assert large - small < bound, f"streaming 10,000 images took {(large - small) / 2**20:.0f} MiB more than 1,000"
    loaded = _peak_rss(root, 10_000, whole=True)
    assert loaded - small > bound, f"loaded whole: only {(loaded - small) / 2**20:.0f} MiB more (the bound can't fail)"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("tiny"), classes=3, per_class=5, side=12, seed=2)


def _not_whole(*args, **kwargs):
    raise AssertionError("the folder should have been streamed, not loaded whole")


def test_cli_stats_streams_a_folder_through_workers(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_encoder", lambda args: _tiny_encoder())
    monkeypatch.setattr(data.FolderDataset, "to_split", _not_whole)
    out = tmp_path / "stats.pt"
    assert cli.main(["stats", "--data", str(tiny_folder), "--size", "16", "--workers", "2", "--batch-size", "4",
                     "--bank", "--no-progress", "--out", str(out)]) == 0
    assert "RealStats of 15 images, 3 classes" in capsys.readouterr().out
    got = RealStats.load(out)
    monkeypatch.undo()
    whole = data.load_folder(tiny_folder, size=16)
    expected = RealStats.from_data(whole.images, _tiny_encoder(), labels=whole.labels, bank=True, progress=False)
    assert torch.equal(got.counts, expected.counts) and torch.equal(got.bank_labels, expected.bank_labels)
    assert torch.allclose(got.means, expected.means, atol=1e-6)


@pytest.mark.parametrize("method", ["sfm", "lgm"])  # LGM also draws real batches by index from the folder
def test_cli_distill_streams_a_folder(tiny_folder, tmp_path, monkeypatch, capsys, method):
    import fastdd.api
    from fastdd.api import DistilledSet

    given = []
    real_distill = fastdd.api.distill

    def distill(images, *args, **kwargs):
        given.append(images)
        return real_distill(images, *args, **kwargs)

    monkeypatch.setattr(cli, "_encoder", lambda args: _tiny_encoder())
    monkeypatch.setattr(data.FolderDataset, "to_split", _not_whole)
    monkeypatch.setattr(fastdd.api, "distill", distill)
    out = tmp_path / "set.pt"
    assert cli.main(["distill", "--data", str(tiny_folder), "--size", "16", "--workers", "0", "--method", method,
                     "--steps", "2", "--init", "real", "--no-progress", "--out", str(out)]) == 0
    assert f"saved (3, 3, 16, 16) {method} images" in capsys.readouterr().out
    assert isinstance(given[0], torch.utils.data.DataLoader) and given[0].num_workers == 0
    assert isinstance(given[0].dataset.dataset, data.FolderDataset)
    result = DistilledSet.load(out)
    assert result.classes == ["class00", "class01", "class02"] and len(result.history) == 2


def test_cli_names_an_undecodable_file_read_by_a_worker(tmp_path, monkeypatch, capsys):
    root = _write_folder(tmp_path / "broken", classes=2, per_class=3, side=8)
    bad = root / "class01" / "0001.png"
    bad.write_bytes(b"not a png")
    monkeypatch.setattr(cli, "_encoder", lambda args: _tiny_encoder())
    code = cli.main(["stats", "--data", str(root), "--workers", "2", "--batch-size", "2", "--no-progress",
                     "--out", str(tmp_path / "stats.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and f"image {bad} cannot be decoded" in err, err
