"""The command line: distill and evaluate on a tiny image folder with a randomly initialised encoder."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fastdd import cli
from fastdd.api import DistilledSet

ENCODER = ["--encoder", "torchvision:mobilenet_v2", "--weights", "none", "--size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir()
        for i in range(4):
            arr = (rng.random((16, 16, 3)) * 120 + 60).astype(np.uint8)
            arr[..., c] = 230
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow  # a real (randomly initialised) MobileNetV2 on the CPU: ~30 s
def test_distill_then_evaluate(folder, tmp_path, capsys):
    out = tmp_path / "set.pt"
    code = cli.main(["distill", "--data", str(folder), *ENCODER, "--method", "sfm", "--ipc", "1", "--steps", "2",
                     "--out", str(out), "--init", "real", "--stats", str(tmp_path / "stats.pt")])
    assert code == 0 and "saved" in capsys.readouterr().out
    ds = DistilledSet.load(out)
    assert ds.images.shape == (3, 3, 16, 16) and ds.method == "sfm" and len(ds.history) == 2
    assert ds.settings["classes"] == ["cat", "dog", "fox"] and (tmp_path / "stats.pt").exists()
    code = cli.main(["evaluate", "--distilled", str(out), "--data", str(folder), "--test-data", str(folder),
                     *ENCODER, "--epochs", "2", "--seeds", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["mean"] <= 100.0 and len(result["accuracies"]) == 1


def test_errors_are_one_line(folder, tmp_path, capsys):
    code = cli.main(["distill", "--data", str(folder), *ENCODER, "--ipc", "9", "--steps", "1",
                     "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "ipc" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["distill", "--data", str(tmp_path / "nowhere"), *ENCODER, "--out", "x.pt"])


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "fastdd", "distill", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--method" in done.stdout and "--chunk-size" in done.stdout


def _no_work(*args, **kwargs):
    raise AssertionError("the arguments should have been refused before any work")


@pytest.mark.parametrize("extra, match", [
    (["--out", "DIR"], "--out=.* is a directory"),
    (["--out", "DIR/file/x.pt"], "is a file, not a folder"),
    (["--out", "DIR/x.pt", "--checkpoint", "DIR"], "--checkpoint=.* is a directory"),
    (["--out", "DIR/x.pt", "--device", "meta"], "device='meta'"),
])
def test_bad_outputs_and_device_are_refused_before_any_work(tmp_path, capsys, monkeypatch, extra, match):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(cli, "_load_split", _no_work)
    monkeypatch.setattr(cli, "_encoder", _no_work)
    extra = [a.replace("DIR", str(tmp_path)) for a in extra]
    code = cli.main(["distill", "--data", str(tmp_path), *ENCODER, *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fastdd distill: error:") and re.search(match, err), err


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def fails(args):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path))

    monkeypatch.setattr(cli, "_distill", fails)
    code = cli.main(["distill", "--data", str(tmp_path), *ENCODER, "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "Is a directory" in err and len(err.strip().splitlines()) == 1


def test_real_batch_flag_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--data", "x", "--out", "x.pt", "--real-batch", "foo"])
    assert "--real-batch: expected an int or 'all', got 'foo'" in capsys.readouterr().err
