"""Resuming a checkpoint: every setting that changes the result must match (method options, augmentation,
the encoder's weights by fingerprint), what may change is recorded; the statistics beside a checkpoint and
those passed as ``stats=`` must come from this run's encoder."""
import pytest
import torch

from test_api import FAST, _TinyNet, data  # noqa: F401 (the distill tests' tiny encoder and data fixture)

import fastdd.api as api
from fastdd import encoders
from fastdd.files import load_checked, save_checked
from fastdd.stats import STATS_FORMAT, STATS_FORMAT_VERSION, RealStats


def _net(seed=0):
    torch.manual_seed(seed)
    return _TinyNet()


def _run(data, path, **kw):
    x, y = data
    args = dict(method="clp", labels=y, steps=2, checkpoint=path, options={"real_batch": 5}, **FAST)
    args.update(kw)
    return api.distill(x, args.pop("encoder", encoders.wrap(_net(), name="tiny")), **args)


@pytest.mark.parametrize("change, named", [
    (dict(options={"real_batch": 5, "lam": 0.5}), "lam 1.0 -> 0.5"),
    (dict(options={"real_batch": 5, "tau": 0.3}), "tau 0.1 -> 0.3"),
    (dict(augment=False), "augment True -> False"),
    (dict(crop_scale=(0.25, 1.0)), r"crop_scale \[0.5, 1.0\] -> \[0.25, 1.0\]"),
    (dict(noise_prob=0.5), "noise_prob 0.0 -> 0.5"),
    (dict(bank_dtype=torch.float32), "bank_dtype 'torch.float16' -> 'torch.float32'"),
    (dict(encoder=encoders.wrap(_net(seed=1), name="tiny")), r"encoder_fingerprint .* \(other encoder weights\)"),
])
def test_resume_refuses_settings_that_change_the_result(data, tmp_path, change, named):
    path = tmp_path / "run.ckpt"
    _run(data, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"other settings .*{named}"):
        _run(data, path, steps=4, **change)
    assert path.read_bytes() == before  # refused before anything was written


def test_every_difference_is_named(data, tmp_path):
    path = tmp_path / "run.ckpt"
    _run(data, path)
    with pytest.raises(ValueError) as err:
        _run(data, path, options={"real_batch": 5, "lam": 0.5, "tau": 0.3}, augment=False)
    message = str(err.value)
    assert all(part in message for part in ("lam 1.0 -> 0.5", "tau 0.1 -> 0.3", "augment True -> False"))
    assert "steps" not in message.split("A resumed run")[0]


def test_allowed_changes_are_recorded(data, tmp_path):
    path = tmp_path / "run.ckpt"
    first = _run(data, path)
    assert "resumed" not in first.settings and len(first.settings["encoder_fingerprint"]) == 64
    second = _run(data, path, steps=3, lr=0.02, batch_size=8, chunk_size=2)
    assert second.settings["resumed"] == [
        {"step": 2, "changed": {"steps": [2, 3], "lr": [0.01, 0.02], "chunk_size": [None, 2], "batch_size": [16, 8]}}]
    third = _run(data, path, steps=4, lr=0.02, batch_size=8, chunk_size=2)  # the history is kept
    assert third.settings["resumed"] == second.settings["resumed"] + [{"step": 3, "changed": {"steps": [3, 4]}}]
    saved = load_checked(path, api.CHECKPOINT_FORMAT, api.CHECKPOINT_VERSION)
    assert saved["settings"]["resumed"] == third.settings["resumed"] and len(third.history) == 4


def test_same_weights_under_another_module_resume(data, tmp_path):
    path = tmp_path / "run.ckpt"
    _run(data, path)
    out = _run(data, path, steps=3, encoder=encoders.wrap(_net(), name="tiny"))  # a copy: same fingerprint
    assert len(out.history) == 3 and out.settings["resumed"][0]["changed"] == {"steps": [2, 3]}


def test_differences_device_type_and_old_checkpoints():
    now = {"device": "cuda:1", "lam": 1.0, "encoder_fingerprint": "ab", "steps": 5, "resumed": []}
    assert api.checkpoints.differences({"device": "cuda:0", "lam": 1.0, "steps": 2}, now) == {}  # no fingerprint saved
    assert api.checkpoints.differences({"device": "cpu", "lam": 2.0, "encoder_fingerprint": "cd"}, now) == {
        "device": ("cpu", "cuda:1"), "lam": (2.0, 1.0), "encoder_fingerprint": ("cd", "ab")}


def test_statistics_record_the_encoder_fingerprint(data, tmp_path):
    x, y = data
    enc = encoders.wrap(_net(), name="tiny")
    stats = RealStats.from_data(x, enc, labels=y, bank=True, progress=False)
    assert stats.encoder_fingerprint == encoders.fingerprint(enc)
    stats.save(tmp_path / "s.pt")
    assert RealStats.load(tmp_path / "s.pt").encoder_fingerprint == stats.encoder_fingerprint
    path = tmp_path / "run.ckpt"
    _run(data, path, encoder=enc)
    beside = RealStats.load(path.with_name(path.name + ".stats"))  # distill's one pass records it too
    assert beside.encoder_fingerprint == stats.encoder_fingerprint
    assert RealStats.from_features(torch.randn(6, 4), torch.arange(3).repeat(2)).encoder_fingerprint is None


def test_statistics_file_of_the_old_format_still_loads(data, tmp_path):
    x, y = data
    stats = RealStats.from_data(x, encoders.wrap(_net()), labels=y, progress=False)
    save_checked({"counts": stats.counts, "sums": stats.sums, "sq_sums": None, "bank_features": None,
                  "bank_labels": None, "encoder_name": "tiny"}, tmp_path / "old.pt", STATS_FORMAT, STATS_FORMAT_VERSION)
    old = RealStats.load(tmp_path / "old.pt")
    assert old.encoder_fingerprint is None and torch.equal(old.sums, stats.sums)
    out = api.distill(x, encoders.wrap(_net(seed=1)), method="sfm", labels=y, steps=1, stats=old, **FAST)
    assert len(out.history) == 1  # no fingerprint: passes as before


def test_stats_of_another_encoder_are_refused(data):
    x, y = data
    enc, other = encoders.wrap(_net(), name="tiny"), encoders.wrap(_net(seed=1), name="tiny")
    stats = RealStats.from_data(x, enc, labels=y, bank=True, progress=False)
    fp, other_fp = encoders.fingerprint(enc), encoders.fingerprint(other)
    for method in ("sfm", "clp"):
        with pytest.raises(ValueError, match=f"another encoder.*{fp[:16]}.*{other_fp[:16]}"):
            api.distill(x, other, method=method, labels=y, steps=1, stats=stats, **FAST)
    assert len(api.distill(x, enc, method="clp", labels=y, steps=1, stats=stats, **FAST).history) == 1
    # features from elsewhere (RealStats.from_features) carry no fingerprint and pass as before
    with torch.no_grad():
        loose = RealStats.from_features(other(x), y)
    assert len(api.distill(x, enc, method="clp", labels=y, steps=1, stats=loose, **FAST).history) == 1


def test_statistics_file_beside_a_checkpoint_of_another_encoder_is_refused(data, tmp_path):
    """A checkpoint of an earlier fastdd (no fingerprint in its settings) beside statistics of another
    encoder: the statistics are refused, not reused."""
    path = tmp_path / "run.ckpt"
    _run(data, path)
    saved = load_checked(path, api.CHECKPOINT_FORMAT, api.CHECKPOINT_VERSION)
    del saved["settings"]["encoder_fingerprint"]
    save_checked(saved, path, api.CHECKPOINT_FORMAT, api.CHECKPOINT_VERSION)
    with pytest.raises(ValueError, match="statistics file .*run.ckpt.stats were computed with another encoder"):
        _run(data, path, steps=3, encoder=encoders.wrap(_net(seed=1), name="tiny"))
