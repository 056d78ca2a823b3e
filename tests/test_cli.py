"""The command line: distill and evaluate on a tiny image folder (the pretrained MobileNetV2; the argument
checks with a randomly initialised one, which they never run)."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fastdd import cli
from fastdd.api import DistilledSet

ENCODER = ["--encoder", "torchvision:mobilenet_v2", "--weights", "none", "--size", "16", "--no-progress"]
PRETRAINED = ["--encoder", "torchvision:mobilenet_v2", "--weights", "imagenet", "--size", "16", "--no-progress"]


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


@pytest.mark.slow  # the pretrained MobileNetV2 on the CPU (a random one's features are near zero: refused)
def test_distill_then_evaluate(folder, tmp_path, capsys):
    out = tmp_path / "set.pt"
    code = cli.main(["distill", "--data", str(folder), *PRETRAINED, "--method", "sfm", "--ipc", "1", "--steps", "2",
                     "--out", str(out), "--init", "real", "--stats", str(tmp_path / "stats.pt")])
    assert code == 0 and "saved" in capsys.readouterr().out
    ds = DistilledSet.load(out)
    assert ds.images.shape == (3, 3, 16, 16) and ds.method == "sfm" and len(ds.history) == 2
    assert ds.classes == ["cat", "dog", "fox"] and (tmp_path / "stats.pt").exists()
    code = cli.main(["evaluate", "--distilled", str(out), "--data", str(folder), "--test-data", str(folder),
                     *PRETRAINED, "--epochs", "2", "--seeds", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["mean"] <= 100.0 and len(result["accuracies"]) == 1
    # exported as another codebase's format, the same set evaluates to the same accuracy
    for fmt, target in (("lgm", tmp_path / "data.pth"), ("dcbench", tmp_path / "dc"), ("folder", tmp_path / "png")):
        assert cli.main(["export", "--distilled", str(out), "--format", fmt, "--out", str(target)]) == 0
        assert f"as {fmt}" in capsys.readouterr().out
    for target in (tmp_path / "data.pth", tmp_path / "dc"):
        code = cli.main(["evaluate", "--distilled", str(target), "--data", str(folder), "--test-data", str(folder),
                         *PRETRAINED, "--epochs", "2", "--seeds", "0", "--json"])
        assert code == 0
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert again["accuracies"] == result["accuracies"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["cat", "dog", "fox"]


def test_version_and_missing_distilled_set(tmp_path, capsys):
    import fastdd

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fastdd {fastdd.__version__}"
    code = cli.main(["export", "--distilled", str(tmp_path / "none.pt"), "--format", "lgm", "--out", "x.pth"])
    assert code == 2 and "--distilled" in capsys.readouterr().err


def test_errors_are_one_line(folder, tmp_path, capsys):
    code = cli.main(["distill", "--data", str(folder), *ENCODER, "--ipc", "9", "--steps", "1",
                     "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "ipc" in err and "Traceback" not in err
    code = cli.main(["distill", "--data", str(tmp_path / "nowhere"), *ENCODER, "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "--data" in capsys.readouterr().err


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
    (["--out", "DIR/x.pt", "--device", "meta"], "--device 'meta'"),
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
    assert code == 1 and "Is a directory" in err and len(err.strip().splitlines()) == 1  # a failed run


def test_real_batch_flag_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--data", "x", "--out", "x.pt", "--real-batch", "foo"])
    assert "--real-batch: expected an int or 'all', got 'foo'" in capsys.readouterr().err


def _distilled_file(tmp_path, data=None):
    import torch

    path = tmp_path / "set.pt"
    DistilledSet(torch.rand(3, 3, 16, 16), torch.arange(3), "sfm", {"data": data} if data else {}).save(path)
    return path


def test_evaluate_on_a_folder_needs_held_out_images(folder, tmp_path, capsys, monkeypatch):
    """A folder has no test split: without --test-data, evaluate would score the training images."""
    monkeypatch.setattr(cli, "_encoder", _no_work)
    code = cli.main(["evaluate", "--data", str(folder), "--distilled", str(_distilled_file(tmp_path)), *ENCODER])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no test split" in err and "--test-data" in err, err


def test_evaluate_uses_the_test_split_of_a_built_in_test_data(tmp_path, monkeypatch, capsys):
    import torch

    from fastdd import data as fdata
    from fastdd import probe

    train = fdata.Split(torch.zeros(4, 3, 16, 16), torch.arange(4) % 2, ["a", "b"])
    test = fdata.Split(torch.ones(2, 3, 16, 16), torch.arange(2), ["a", "b"])
    seen = []

    def evaluate(distilled, encoder, images, labels, **kwargs):
        seen.append(images)
        return _Result()

    monkeypatch.setattr(fdata, "load", lambda name, size=32: (train, test))
    monkeypatch.setattr(cli, "_encoder", lambda args: None)
    monkeypatch.setattr(probe, "evaluate", evaluate)
    for flags in (["--data", "digits"], ["--data", str(tmp_path), "--test-data", "digits"]):
        seen.clear()
        assert cli.main(["evaluate", *flags, "--distilled", str(_distilled_file(tmp_path)), *ENCODER]) == 0
        assert len(seen) == 1 and seen[0] is test.images  # the test split, never the training one
    capsys.readouterr()


class _Result:
    mean, std, accuracies = 50.0, 0.0, (50.0,)


def test_test_data_that_is_the_training_folder_is_warned_about(folder, tmp_path, monkeypatch, capsys):
    from fastdd import probe

    monkeypatch.setattr(cli, "_encoder", lambda args: None)
    monkeypatch.setattr(probe, "evaluate", lambda *a, **kw: _Result())
    path = _distilled_file(tmp_path, data=str(folder))
    assert cli.main(["evaluate", "--data", str(folder), "--test-data", str(folder), "--distilled", str(path),
                     *ENCODER]) == 0
    assert "warning: --test-data" in capsys.readouterr().err


class Opaque:  # torch's weights-only loader refuses it
    pass


def test_files_that_cannot_be_read_say_why(folder, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(cli, "_encoder", _no_work)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "fastdd.DistilledSet", "payload": Opaque()}, pickled)
    for distilled, match in [(tmp_path, "holds no image in class sub-folders"), (pickled, "cannot be read")]:
        code = cli.main(["evaluate", "--data", "digits", "--distilled", str(distilled), *ENCODER])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and re.search(match, err), err  # a failed run
        assert "weights_only" not in err and "Traceback" not in err


def test_stats_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_split", _no_work)
    monkeypatch.setattr(cli, "_encoder", _no_work)
    code = cli.main(["distill", "--data", "x", *ENCODER, "--out", str(tmp_path / "x.pt"), "--stats", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--stats=" in err and "is a directory" in err, err


_INTERRUPTED = r"""
import signal, sys, time
from fastdd import cli
# Python keeps SIGINT ignored when it starts ignored (a shell's background job): install its handler
signal.signal(signal.SIGINT, signal.default_int_handler)
def slow(*args, **kwargs):
    print("working", flush=True)
    time.sleep(120)
cli._load_split = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_is_one_line_that_says_how_to_resume_and_exit_code_130(tmp_path, checkpoint):
    import signal

    args = ["distill", "--data", "x", *ENCODER, "--out", str(tmp_path / "x.pt")]
    ck = tmp_path / "run.ckpt"
    if checkpoint:
        ck.write_bytes(b"a checkpoint")  # only its existence matters here
        args += ["--checkpoint", str(ck)]
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "working"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fastdd distill: interrupted")
    assert (f"resume from the checkpoint {ck}" in err) if checkpoint else ("--checkpoint FILE" in err), err


@pytest.mark.parametrize("kind", ["random", "centroids", "kcenter", "herding"])
def test_baseline_sets_from_the_command_line(folder, tmp_path, capsys, kind):
    import torch

    from fastdd import data, encoders, probe

    out = tmp_path / f"{kind}.pt"
    assert cli.main(["baseline", "--data", str(folder), *PRETRAINED, "--kind", kind, "--ipc", "2",
                     "--out", str(out)]) == 0
    assert f"{kind} baseline" in capsys.readouterr().out
    got = DistilledSet.load(out)
    assert got.method == f"baseline:{kind}" and got.images.shape == (6, 3, 16, 16) and got.classes == ["cat", "dog", "fox"]
    split = data.load_folder(folder, size=16)
    if kind == "random":
        expected = probe.random_real(split.images, split.labels, ipc=2, seed=0)[0]
    else:
        encoder = encoders.load("torchvision:mobilenet_v2", weights="imagenet")
        select = {"centroids": probe.class_centroids, "kcenter": probe.kcenter_greedy, "herding": probe.herding}[kind]
        expected = select(split.images, split.labels, encoder, ipc=2, progress=False)[0]
    assert torch.equal(got.images, expected)


def test_exit_codes_2_for_usage_errors_1_for_failed_runs(folder, tmp_path, capsys, monkeypatch):
    """Bad flag values found after parsing exit 2 and name the flag, not the Python argument; an error
    while running (NaN features, a full disk) exits 1."""
    out = ["--out", str(tmp_path / "x.pt")]
    for extra, flag in [(["--ipc", "0"], "--ipc"), (["--lr", "-1"], "--lr"), (["--weights", "NOPE_V9"], "--weights"),
                        (["--checkpoint-every", "0"], "--checkpoint-every"), (["--noise-prob", "2"], "--noise-prob")]:
        args = ["distill", "--data", str(folder), *ENCODER, "--steps", "1", *out, *extra]
        if extra[0] == "--weights":
            args = ["distill", "--data", str(folder), "--size", "16", "--no-progress", "--steps", "1", *out, *extra]
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 2 and flag in err and "=" not in err.split(flag)[0][-2:], err
        assert not re.search(r"\b(weights|ipc|lr|checkpoint_every|noise_prob)=", err), err

    def nan_run(*a, **k):
        raise ValueError("the encoder returned NaN or Inf features for the synthetic images at step 3")

    monkeypatch.setattr("fastdd.api.distill", nan_run)
    code = cli.main(["distill", "--data", str(folder), *ENCODER, *out])
    assert code == 1 and "NaN" in capsys.readouterr().err

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "x.pt"))

    monkeypatch.setattr("fastdd.api.distill", full_disk)
    assert cli.main(["distill", "--data", str(folder), *ENCODER, *out]) == 1


def test_every_flag_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.option_strings)


def test_stats_command_writes_real_stats(folder, tmp_path, capsys):
    from fastdd.stats import RealStats

    out = tmp_path / "stats.pt"
    code = cli.main(["stats", "--data", str(folder), "--encoder", "timm:resnet18", "--weights", "random",
                     "--input-size", "32", "--size", "16", "--no-progress", "--bank", "--bank-dtype", "float32",
                     "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(printed) == 1 and str(out) in printed[0] and re.search(r"\d+\.\d s\)$", printed[0])
    stats = RealStats.load(out)
    assert stats.num_classes == 3 and stats.feature_dim == 512 and stats.has_bank
    assert cli.main(["stats", "--data", str(folder), *ENCODER, "--no-bank", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("command", ["distill", "stats", "evaluate", "baseline"])
def test_workers_flag_is_shown_and_checked_before_any_work(command, tmp_path, capsys, monkeypatch):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    workers = next(a for a in sub.choices[command]._actions if "--workers" in a.option_strings)
    assert workers.default == cli._WORKERS and "folder" in workers.help
    monkeypatch.setattr(cli, "_load_split", _no_work)
    monkeypatch.setattr(cli, "_encoder", _no_work)
    extra = {"distill": ["--out", str(tmp_path / "x.pt")], "stats": ["--out", str(tmp_path / "x.pt")],
             "evaluate": ["--distilled", str(_distilled_file(tmp_path))],
             "baseline": ["--kind", "random", "--out", str(tmp_path / "x.pt")]}[command]
    code = cli.main([command, "--data", "digits", *ENCODER, "--workers", "-1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "--workers must be an int >= 0, got -1" in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_streams_a_test_folder_through_workers(folder, tmp_path, monkeypatch, capsys):
    import torch

    from fastdd import data as fdata
    from fastdd import probe

    seen = []

    def evaluate(distilled, encoder, images, labels, **kwargs):
        seen.append((images, labels))
        return _Result()

    monkeypatch.setattr(cli, "_encoder", lambda args: None)
    monkeypatch.setattr(probe, "evaluate", evaluate)
    assert cli.main(["evaluate", "--data", "digits", "--test-data", str(folder), "--workers", "2",
                     "--distilled", str(_distilled_file(tmp_path)), *ENCODER]) == 0
    (loader, labels), = seen
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 2 and labels is None
    assert isinstance(loader.dataset.dataset, fdata.FolderDataset) and loader.dataset.classes == ["cat", "dog", "fox"]
    capsys.readouterr()


@pytest.mark.parametrize("fmt, target, match", [
    ("folder", "earlier", r"--out '.*earlier' is a folder that is not empty .*choose a new or empty folder"),
    ("dcbench", "earlier", r"--out '.*earlier' is a folder that is not empty"),
    ("folder", "file", r"--out '.*file' is a file, but the folder format writes a folder: choose another path"),
    ("dcbench", "file", r"--out '.*file' is a file, but the dcbench format writes a folder"),
    ("lgm", "set.pt", r"--out '.*set.pt' exists and is not an LGM data.pth file .*choose another path"),
    ("grid", "file", r"--out '.*file' exists and is not a PNG file"),
    ("lgm", "earlier", r"--out '.*earlier' is a folder, but the lgm format writes one file"),
])
def test_export_refuses_a_destination_it_would_merge_into_or_replace(tmp_path, capsys, monkeypatch, fmt, target,
                                                                     match):
    distilled = _distilled_file(tmp_path)
    assert cli.main(["export", "--distilled", str(distilled), "--format", "folder", "--out",
                     str(tmp_path / "earlier")]) == 0
    (tmp_path / "file").write_bytes(b"keep")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(cli, "_load_distilled", _no_work)  # refused before the set is read
    code = cli.main(["export", "--distilled", str(distilled), "--format", fmt, "--out", str(tmp_path / target)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_export_mean_and_std_store_dcbench_images_normalised(tmp_path, capsys):
    import torch

    from fastdd import export

    distilled = _distilled_file(tmp_path)
    norm = ["--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.3"]
    assert cli.main(["export", "--distilled", str(distilled), "--format", "dcbench", "--out", str(tmp_path / "dc"),
                     *norm]) == 0
    back = export.load(tmp_path / "dc", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    torch.testing.assert_close(back.images, DistilledSet.load(distilled).images, atol=1e-6, rtol=0)
    capsys.readouterr()
    for fmt, extra, flag in [("dcbench", norm[:4], "--mean and --std go together"),
                             ("lgm", norm, "--mean and --std apply to --format dcbench only"),
                             ("dcbench", [*norm[:6], "0", "0.3"], "--std must be a finite number > 0"),
                             ("dcbench", ["--mean", "nan", "0", "0", *norm[4:]], "--mean must be a finite number")]:
        code = cli.main(["export", "--distilled", str(distilled), "--format", fmt, "--out", str(tmp_path / "x"),
                         *extra])
        err = capsys.readouterr().err
        assert code == 2 and flag in err, err
    assert not (tmp_path / "x").exists()


def test_evaluate_probe_flags_reach_fastdd_evaluate(tmp_path, monkeypatch, capsys):
    import torch

    from fastdd import data as fdata
    from fastdd import probe

    help_text = {a.dest: a.help for a in _subparser("evaluate")._actions}
    assert f"default {probe.DEFAULT_VIEWS}" in help_text["views"] and "none" in help_text["views"]
    assert f"min({probe.MAX_BATCH_SIZE}" in help_text["batch_size"] and "1e-3" in help_text["lr"]
    split = fdata.Split(torch.ones(3, 3, 16, 16), torch.arange(3), ["a", "b", "c"])
    monkeypatch.setattr(fdata, "load", lambda name, size=32: (split, split))
    monkeypatch.setattr(cli, "_encoder", lambda args: None)
    seen = []
    monkeypatch.setattr(probe, "evaluate", lambda *a, **kwargs: seen.append(kwargs) or _Result())
    args = ["evaluate", "--data", "digits", "--distilled", str(_distilled_file(tmp_path)), *ENCODER]
    assert cli.main(args) == 0
    assert seen[-1]["views"] == probe.DEFAULT_VIEWS and seen[-1]["lr"] is None and seen[-1]["batch_size"] is None
    assert cli.main([*args, "--views", "30", "--lr", "0.01", "--batch-size", "2"]) == 0
    assert (seen[-1]["views"], seen[-1]["lr"], seen[-1]["batch_size"]) == (30, 0.01, 2)
    assert cli.main([*args, "--views", "none"]) == 0 and seen[-1]["views"] is None
    capsys.readouterr()
    monkeypatch.setattr(cli, "_load_split", _no_work)  # bad values: refused before any work
    for extra, message in [(["--views", "0"], "--views must be an int >= 1"),
                           (["--lr", "-1"], "--lr must be a finite number > 0"),
                           (["--batch-size", "0"], "--batch-size must be an int >= 1")]:
        code = cli.main([*args, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--views", "many"])
    assert info.value.code == 2 and "--views: expected an int or 'none', got 'many'" in capsys.readouterr().err


def test_evaluate_at_another_size_than_the_set_names_the_flags(tmp_path, monkeypatch, capsys):
    """A set of 16 px evaluated with --size 32 by an encoder that does not resize: the flags that fix it."""
    import torch

    from fastdd import data as fdata
    from fastdd import probe

    split = fdata.Split(torch.ones(3, 3, 32, 32), torch.arange(3), ["a", "b", "c"])
    monkeypatch.setattr(fdata, "load", lambda name, size=32: (split, split))
    monkeypatch.setattr(probe, "evaluate", _no_work)
    monkeypatch.setattr(cli, "_encoder", lambda args: type("Encoder", (), {"input_size": args.input_size})())
    args = ["evaluate", "--data", "digits", "--distilled", str(_distilled_file(tmp_path)), *ENCODER, "--size", "32"]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--distilled images are 16x16 px but --size 32" in err and "pass --size 16" in err, err
    assert "--input-size N" in err and "input_size" not in err, err
    monkeypatch.setattr(probe, "evaluate", lambda *a, **k: _Result())
    assert cli.main([*args, "--input-size", "64"]) == 0  # an encoder that resizes takes both


def _subparser(command):
    import argparse

    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def test_an_unknown_flag_shows_the_usage_of_its_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["distill", "--data", "x", "--out", "x.pt", "--lamb", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: fastdd distill") and "--lam LAM" in err, err
    assert "fastdd distill: error: unrecognized arguments: --lamb 1" in err, err


def test_warnings_are_one_line_while_a_command_runs(tmp_path, capsys, monkeypatch):
    import warnings

    def warns(args):
        warnings.warn("first line\nsecond line", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_distill", warns)
    before = warnings.showwarning
    assert cli.main(["distill", "--data", "x", *ENCODER, "--out", str(tmp_path / "x.pt")]) == 0
    assert capsys.readouterr().err == "fastdd distill: warning: first line second line\n"
    assert warnings.showwarning is before  # restored: the library keeps Python's format


def test_the_recipe_size_warning_gives_the_python_argument_and_the_flag():
    import torch

    from fastdd.methods.base import Recipe, RecipeWarning

    with pytest.warns(RecipeWarning) as record:
        Recipe("a test", image_size=256).apply("paper", "lgm", {"images": torch.rand(1, 3, 8, 8)})
    message = str(record[0].message)
    assert "size=256 in fastdd.data.load" in message and "--size 256 on the command line" in message, message


def test_out_help_says_what_is_written():
    for command in ("distill", "stats"):
        out = next(a for a in _subparser(command)._actions if a.dest == "out")
        assert "safetensors" in out.help and "(.pt)" not in out.help, (command, out.help)
