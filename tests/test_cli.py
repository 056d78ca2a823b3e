"""The command line: distill and evaluate on a tiny image folder with a randomly initialised encoder."""
import json
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
