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
    (dict(options={"real_batch": 5, "lam": 0.5}), "lam 2.0 -> 0.5"),
    (dict(options={"real_batch": 5, "tau": 0.3}), "tau 0.1 -> 0.3"),
    (dict(augment=False), "augment True -> False"),
    (dict(crop_scale=(0.75, 1.0)), r"crop_scale \[0.25, 1.0\] -> \[0.75, 1.0\]"),
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
    assert all(part in message for part in ("lam 2.0 -> 0.5", "tau 0.1 -> 0.3", "augment True -> False"))
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


def test_stats_of_another_image_size_are_refused(data, tmp_path):
    """The features of one image differ between sizes even when the encoder resizes its input: statistics
    of the images at another size are refused, not used as this run's."""
    x, y = data
    enc = encoders.wrap(_net(), name="tiny")
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    stats = RealStats.from_data(small, enc, labels=y, bank=True, progress=False)
    assert stats.image_size == (8, 8)
    stats.save(tmp_path / "s.pt")
    assert RealStats.load(tmp_path / "s.pt").image_size == (8, 8)
    for method in ("sfm", "clp"):
        with pytest.raises(ValueError, match=r"stats were computed from images of 8x8 px, this run's real images "
                                             r"are 12x12 px"):
            api.distill(x, enc, method=method, labels=y, steps=1, stats=stats, **FAST)
    assert len(api.distill(small, enc, method="clp", labels=y, steps=1, stats=stats, **FAST).history) == 1
    # sizes unknown (features from elsewhere, a file of an earlier fastdd): not held against the run
    assert RealStats.from_features(torch.randn(6, 4), torch.arange(3).repeat(2)).image_size is None
    payload = load_checked(tmp_path / "s.pt", STATS_FORMAT, STATS_FORMAT_VERSION)
    del payload["image_size"]
    save_checked(payload, tmp_path / "old.pt", STATS_FORMAT, STATS_FORMAT_VERSION)
    old = RealStats.load(tmp_path / "old.pt")
    assert old.image_size is None
    assert len(api.distill(x, enc, method="clp", labels=y, steps=1, stats=old, **FAST).history) == 1
    with pytest.raises(ValueError, match="image_size must be None or"):
        RealStats(stats.counts, stats.sums, image_size=(8, 0))


def test_resume_refuses_other_data_with_the_same_class_counts(data, tmp_path):
    x, y = data
    path = tmp_path / "run.ckpt"
    _run(data, path)
    before = path.read_bytes()
    other = x.flip(-1)  # other images, the same labels and counts
    with pytest.raises(ValueError, match=r"real_images_fingerprint .* \(other real images"):
        _run((other, y), path, steps=3)
    swapped = y.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # two labels exchanged: the same counts
    with pytest.raises(ValueError, match=r"real_labels_fingerprint .* \(other labels, or in another order"):
        _run((x, swapped), path, steps=3)
    assert path.read_bytes() == before  # refused before anything was written
    out = _run(data, path, steps=3, batch_size=5)  # the same data read in other batches
    assert out.settings["resumed"][0]["changed"] == {"steps": [2, 3], "batch_size": [16, 5]}


def test_data_fingerprints_read_the_first_and_every_strided_row_whatever_the_batches():
    from fastdd.distributed import SINGLE
    from fastdd.realdata import FINGERPRINT_FIRST, FINGERPRINT_STRIDE, DataFingerprints

    n = 2 * FINGERPRINT_STRIDE + 5
    images, labels = torch.rand(n, 1, 1, 2), torch.arange(n) % 3

    def fingerprints(images, batch):
        f = DataFingerprints()
        for start in range(0, n, batch):
            f.add(images[start:start + batch], start)
        return f, f.result(labels, SINGLE)

    f, whole = fingerprints(images, 7)
    assert [row for row, _ in f.rows] == list(range(FINGERPRINT_FIRST)) + [FINGERPRINT_STRIDE, 2 * FINGERPRINT_STRIDE]
    assert fingerprints(images, 1000)[1] == whole and fingerprints(images, n)[1] == whole
    for row, seen in ((FINGERPRINT_FIRST - 1, True), (2 * FINGERPRINT_STRIDE, True), (FINGERPRINT_FIRST, False)):
        changed = images.clone()
        changed[row] += 1
        assert (fingerprints(changed, 7)[1]["real_images_fingerprint"] != whole["real_images_fingerprint"]) == seen
    flipped = DataFingerprints().result(labels.flip(0), SINGLE)
    assert flipped["real_labels_fingerprint"] != whole["real_labels_fingerprint"]


def test_resume_with_fewer_steps_than_done_is_refused(data, tmp_path):
    path = tmp_path / "run.ckpt"
    _run(data, path, steps=3)
    with pytest.raises(ValueError, match=r"has done 3 steps, more than this run's steps=2: pass steps >= 3"):
        _run(data, path, steps=2)
    assert len(_run(data, path, steps=3).history) == 3  # as many as done: the saved result, unchanged
