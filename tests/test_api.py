"""fastdd.distill and DistilledSet on a tiny encoder: smoke runs of the three methods, sources,
initialisations, the memory-flat chunked backward, checkpoints and resume, files, argument errors."""
import pytest
import torch
import torch.nn as nn

import fastdd.api as api
from fastdd import encoders
from fastdd.augment import Augment
from fastdd.images import make_images
from fastdd.methods import ClosedFormProbeLoss, FlowMatchingLoss, LinearGradientMatchingLoss
from fastdd.files import CorruptFileError, load_checked
from fastdd.stats import RealStats
from fastdd.step import SyntheticRows, chunked_step, plain_step

C, PER_CLASS, SIZE = 3, 8, 12


class _TinyNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.conv = nn.Conv2d(3, d, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return encoders.wrap(_TinyNet())


@pytest.fixture(scope="module")
def data():
    """Class c: images tinted towards colour channel c, values in [0.05, 0.95]."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(C).repeat(PER_CLASS)
    x = torch.rand(len(y), 3, SIZE, SIZE, generator=g) * 0.5 + 0.2
    x[torch.arange(len(y)), y] += 0.25
    return x.clamp(0.05, 0.95), y


class _MapDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


FAST = dict(progress=False, copies=2, batch_size=16)


@pytest.mark.parametrize("method", ["lgm", "sfm", "clp"])
def test_distill_smoke(tiny, data, method):
    x, y = data
    out = api.distill(x, tiny, method=method, labels=y, ipc=2, steps=4, **FAST)
    assert isinstance(out, api.DistilledSet) and out.method == method
    assert out.images.shape == (C * 2, 3, SIZE, SIZE) and out.images.dtype == torch.float32
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2] and out.ipc == 2 and out.num_classes == C
    assert len(out.history) == 4 and all(torch.isfinite(torch.tensor(out.history)))
    assert out.settings["method"] == method and out.settings["copies"] == 2 and out.settings["steps"] == 4
    images, labels = out  # unpacks like (images, labels)
    assert images is out.images and labels is out.labels


@pytest.mark.parametrize("method", ["sfm", "clp", "lgm"])
def test_loss_falls(tiny, data, method):
    x, y = data
    out = api.distill(x, tiny, method=method, labels=y, ipc=1, steps=25, lr=0.1, parameterization="pixels", init="noise",
                      augment=False, progress=False, copies=1,
                      options={"real_batch": None} if method == "clp" else None)
    first, last = sum(out.history[:5]) / 5, sum(out.history[-5:]) / 5
    assert last < first * 0.8, out.history


@pytest.mark.parametrize("kind", ["dataset", "loader"])
@pytest.mark.parametrize("method", ["sfm", "lgm"])
def test_distill_from_dataset_and_loader(tiny, data, kind, method):
    x, y = data
    source = _MapDataset(x, y)
    if kind == "loader":
        source = torch.utils.data.DataLoader(source, batch_size=5, shuffle=True)
    init = "real" if kind == "loader" else "noise"  # streamed per-class sampling, classes found on the way
    out = api.distill(source, tiny, method=method, ipc=1, steps=2, init=init, **FAST)
    assert out.images.shape == (C, 3, SIZE, SIZE)


def test_same_seed_same_result_other_seed_differs(tiny, data):
    x, y = data
    a = api.distill(x, tiny, method="clp", labels=y, steps=3, seed=5, **FAST)
    b = api.distill(x, tiny, method="clp", labels=y, steps=3, seed=5, **FAST)
    c = api.distill(x, tiny, method="clp", labels=y, steps=3, seed=6, **FAST)
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, c.images)


def test_precomputed_stats(tiny, data):
    x, y = data
    stats = RealStats.from_data(x, tiny, labels=y, bank=True, progress=False)
    a = api.distill(x, tiny, method="clp", labels=y, steps=2, stats=stats, **FAST)
    b = api.distill(x, tiny, method="clp", labels=y, steps=2, **FAST)
    torch.testing.assert_close(a.images, b.images, atol=1e-3, rtol=0)  # fp16 bank either way
    with pytest.raises(ValueError, match="bank"):
        api.distill(x, tiny, method="clp", labels=y, steps=1, stats=RealStats.from_features(
            torch.randn(6, 8), torch.arange(6) % 3, bank=False), **FAST)
    with pytest.raises(ValueError, match="classes"):
        api.distill(x, tiny, method="sfm", labels=y, steps=1, stats=RealStats.from_features(
            torch.randn(8, 8), torch.arange(8) % 4, bank=False), **FAST)


# ---- initialisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["pyramid", "pixels"])
def test_init_real_starts_from_real_images_of_each_class(tiny, data, parameterization):
    x, y = data
    out = api.distill(x, tiny, method="sfm", labels=y, ipc=2, steps=0, init="real",
                      parameterization=parameterization, **FAST)
    for img, label in zip(out.images, out.labels):
        dist = (x - img).flatten(1).abs().max(1).values
        best = int(torch.argmin(dist))
        assert float(dist[best]) < 1e-4 and int(y[best]) == int(label)
    assert not torch.equal(out.images[0], out.images[1])  # two different images of class 0


def test_init_centroid_is_the_real_image_nearest_each_class_mean(tiny, data):
    x, y = data
    out = api.distill(x, tiny, method="lgm", labels=y, ipc=1, steps=0, init="centroid", **FAST)
    with torch.no_grad():
        z = tiny(x)
    for c in range(C):
        members = torch.nonzero(y == c).flatten()
        mean = z[members].mean(0)
        nearest = members[torch.argmin((z[members] - mean).pow(2).sum(1))]
        torch.testing.assert_close(out.images[c], x[nearest], atol=1e-4, rtol=0)


# ---- memory-flat chunked backward ----------------------------------------------------------------

def _gradients(tiny, data, method, chunk_size):
    x, y = data
    torch.manual_seed(0)
    synth = make_images("pyramid", C * 2, SIZE, init_images=x[:C * 2])
    copies = 3
    ys = torch.arange(C).repeat_interleave(2).repeat(copies)
    aug = Augment(crop_size=10)
    params = aug.sample(C * 2 * copies, (SIZE, SIZE), torch.Generator().manual_seed(3))
    with torch.no_grad():
        zr = tiny(x)
    if method == "sfm":
        loss_module = FlowMatchingLoss(RealStats.from_features(zr, y, bank=False))
        loss_fn = lambda zs: loss_module(zs, ys)  # noqa: E731
    elif method == "clp":
        loss_module = ClosedFormProbeLoss(RealStats.from_features(zr, y), lam=0.1, tau=0.1)
        loss_fn = lambda zs: loss_module(zs, ys)  # noqa: E731
    else:
        head = (torch.randn(C, zr.shape[1]) * 0.01, torch.zeros(C))
        loss_fn = lambda zs: LinearGradientMatchingLoss()(zs, ys, zr, y, head=head)  # noqa: E731
    rows = SyntheticRows(synth, aug, params)
    if chunk_size is None:
        loss = plain_step(rows, tiny, loss_fn)
    else:
        loss = chunked_step(rows, tiny, loss_fn, chunk_size)
    return loss, [p.grad.clone() for p in synth.parameters()]


@pytest.mark.parametrize("method", ["sfm", "clp", "lgm"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunked_backward_equals_plain_backward(tiny, data, method, chunk_size):
    loss_a, grads_a = _gradients(tiny, data, method, None)
    loss_b, grads_b = _gradients(tiny, data, method, chunk_size)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    for ga, gb in zip(grads_a, grads_b):
        scale = float(ga.abs().max())
        assert scale > 0
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["sfm", "lgm"])
def test_distill_with_chunk_size_follows_the_plain_run(tiny, data, method):
    x, y = data
    a = api.distill(x, tiny, method=method, labels=y, ipc=2, steps=3, **FAST)
    b = api.distill(x, tiny, method=method, labels=y, ipc=2, steps=3, chunk_size=5, **FAST)
    torch.testing.assert_close(torch.tensor(b.history), torch.tensor(a.history), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.images, a.images, atol=1e-3, rtol=0)


# ---- checkpoints ---------------------------------------------------------------------------------

class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["lgm", "clp"])
def test_resume_after_crash_continues_exactly(tiny, data, tmp_path, method):
    x, y = data
    kw = dict(method=method, labels=y, ipc=1, steps=6, extend_every=2,
              options={"real_batch": 5} if method == "clp" else None, **FAST)
    full = api.distill(x, tiny, **kw)

    def crash(step, loss):
        if step == 4:
            raise _Crash()

    path = tmp_path / "run.ckpt"
    with pytest.raises(_Crash):
        api.distill(x, tiny, checkpoint=path, checkpoint_every=2, callback=crash, **kw)
    assert path.exists()
    stats_file = path.with_name(path.name + ".stats")
    assert stats_file.exists() == (method == "clp")  # statistics kept beside the checkpoint, reused below
    resumed = api.distill(x, tiny, checkpoint=path, checkpoint_every=2, **kw)
    assert resumed.history == pytest.approx(full.history, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(resumed.images, full.images, atol=1e-6, rtol=0)
    # the finished checkpoint resumes to the same result without a step
    again = api.distill(x, tiny, checkpoint=path, **kw)
    assert torch.equal(again.images, resumed.images)


def test_corrupt_checkpoint_raises_and_is_left_untouched(tiny, data, tmp_path):
    x, y = data
    path = tmp_path / "run.ckpt"
    api.distill(x, tiny, method="sfm", labels=y, steps=2, checkpoint=path, **FAST)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    damaged = path.read_bytes()
    with pytest.raises(CorruptFileError, match="run.ckpt"):
        api.distill(x, tiny, method="sfm", labels=y, steps=4, checkpoint=path, **FAST)
    assert path.read_bytes() == damaged
    with pytest.raises(FileExistsError, match="resume"):
        api.distill(x, tiny, method="sfm", labels=y, steps=4, checkpoint=path, resume=False, **FAST)


def test_checkpoint_with_other_settings_is_refused(tiny, data, tmp_path):
    x, y = data
    path = tmp_path / "run.ckpt"
    api.distill(x, tiny, method="sfm", labels=y, steps=2, checkpoint=path, **FAST)
    with pytest.raises(ValueError, match="other settings"):
        api.distill(x, tiny, method="sfm", labels=y, ipc=2, steps=2, checkpoint=path, **FAST)
    # another data set (other class counts) or encoder, same C and D: refused, not continued silently
    with pytest.raises(ValueError, match="class_counts"):
        api.distill(x[1:], tiny, method="sfm", labels=y[1:], steps=4, checkpoint=path, **FAST)
    with pytest.raises(ValueError, match="encoder"):
        api.distill(x, encoders.wrap(_TinyNet(), name="other"), method="sfm", labels=y, steps=4,
                    checkpoint=path, **FAST)
    # the checkpoint's settings come before its statistics file (SFM's has no bank for CLP)
    with pytest.raises(ValueError, match="method 'sfm' -> 'clp'"):
        api.distill(x, tiny, method="clp", labels=y, steps=4, checkpoint=path, **FAST)


def test_resume_with_another_lr_uses_it(tiny, data, tmp_path):
    x, y = data
    path = tmp_path / "run.ckpt"
    kw = dict(method="sfm", labels=y, init="noise", parameterization="pixels", checkpoint=path, **FAST)
    api.distill(x, tiny, steps=2, **kw)
    out = api.distill(x, tiny, steps=3, lr=0.5, **kw)
    saved = load_checked(path, api.CHECKPOINT_FORMAT, api.CHECKPOINT_VERSION)
    assert out.settings["lr"] == 0.5 and [g["lr"] for g in saved["optimizer"]["param_groups"]] == [0.5]


def test_output_paths_are_checked_before_any_step(tiny, data, tmp_path):
    x, y = data
    (tmp_path / "file").write_text("x")
    steps = []
    for path, match in [(tmp_path / "file" / "run.ckpt", "is a file"), (tmp_path, "is a directory")]:
        with pytest.raises(ValueError, match=f"checkpoint.*{match}"):
            api.distill(x, tiny, method="lgm", labels=y, steps=3, checkpoint=path,
                        callback=lambda step, loss: steps.append(step), **FAST)
    assert steps == []  # no work done, none lost
    api.distill(x, tiny, method="sfm", labels=y, steps=1, checkpoint=tmp_path / "new" / "run.ckpt", **FAST)


def test_stats_of_other_data_are_flagged(tiny, data):
    x, y = data
    other = RealStats.from_data(x[1:], tiny, labels=y[1:], progress=False)  # same C and D
    with pytest.warns(api.StatsMismatchWarning, match=r"other data: classes \[0\]"):
        api.distill(x, tiny, method="sfm", labels=y, steps=1, stats=other, **FAST)


def test_bad_device_is_refused_before_the_encoder_moves(data):
    x, y = data
    module = _TinyNet()
    devices = ["meta", "cuda:99" if torch.cuda.is_available() else "cuda"]
    for device in devices:
        with pytest.raises(ValueError, match="device"):
            api.distill(x, module, method="sfm", labels=y, steps=1, device=device, **FAST)
    assert module.conv.weight.device.type == "cpu"


@pytest.mark.parametrize("method, side", [("sfm", "synthetic"), ("clp", "synthetic"), ("lgm", "synthetic"),
                                          ("lgm", "real")])
def test_encoder_nan_names_the_images_and_the_step(data, method, side, monkeypatch):
    """By default a step makes no host sync: the NaN loss is caught when the history is flushed, naming
    the step; with the debug setting FASTDD_CHECKS=1 every step checks and names the cause."""
    x, y = data

    class NaNOn(nn.Module):  # NaN features for the synthetic (graph) or the real (no graph) images only
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, images):
            z = self.lin(images.mean(dim=(2, 3)))
            return z * float("nan") if images.requires_grad == (side == "synthetic") else z

    monkeypatch.delenv("FASTDD_CHECKS", raising=False)
    with pytest.raises(FloatingPointError, match=f"the {method} loss became nan at step 0.*FASTDD_CHECKS=1"):
        api.distill(x, NaNOn(), method=method, labels=y, steps=2, **FAST)
    monkeypatch.setenv("FASTDD_CHECKS", "1")
    with pytest.raises(ValueError, match=f"NaN or Inf features for the {side} images at step 0"):
        api.distill(x, NaNOn(), method=method, labels=y, steps=2, **FAST)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_images(tiny, data, dtype):
    x, y = data
    out = api.distill(x.to(dtype), tiny, method="clp", labels=y, steps=1, **FAST)
    assert out.images.dtype == torch.float32 and len(out.history) == 1


def test_distilled_set_labels_must_be_class_major_and_balanced():
    images = torch.zeros(3, 3, 4, 4)
    for labels in ([0, 2, 5], [1, 0, 2], [0, 0, 1], [0.0, 1.0, 2.0]):
        with pytest.raises(ValueError, match="class-major"):
            api.DistilledSet(images, torch.tensor(labels), "sfm")
    ds = api.DistilledSet(torch.zeros(4, 3, 4, 4), torch.tensor([0, 0, 1, 1]), "sfm")
    assert ds.num_classes == 2 and ds.ipc == 2


# ---- files ---------------------------------------------------------------------------------------

def test_distilled_set_save_load_round_trip_and_corruption(tiny, data, tmp_path):
    x, y = data
    out = api.distill(x, tiny, method="sfm", labels=y, steps=2, **FAST)
    path = tmp_path / "set.pt"
    out.save(path)
    back = api.DistilledSet.load(path)
    assert torch.equal(back.images, out.images) and torch.equal(back.labels, out.labels)
    assert back.method == out.method and back.settings == out.settings and back.history == out.history
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError):
        api.DistilledSet.load(path)
    RealStats.from_features(torch.randn(4, 2), torch.arange(4) % 2).save(path)
    with pytest.raises(CorruptFileError, match="RealStats"):
        api.DistilledSet.load(path)


# ---- argument errors ------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument(tiny, data):
    x, y = data
    cases = [
        (dict(method="mtt"), "method"),
        (dict(ipc=0), "ipc"),
        (dict(ipc=PER_CLASS + 1), "ipc"),
        (dict(steps=-1), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(init="zeros"), "init"),
        (dict(parameterization="fourier"), "parameterization"),
        (dict(copies=0), "copies"),
        (dict(crop_scale=(0.9, 0.1)), "crop_scale"),
        (dict(noise_prob=2.0), "noise_prob"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(method="clp", options={"lam": -1.0}), "lam"),
        (dict(method="clp", options={"tau": 0}), "tau"),
        (dict(method="clp", options={"feature_norm": "zca"}), "feature_norm"),
        (dict(options={"lam": 1.0}), "not options of method 'sfm'"),
        (dict(options=[("lam", 1.0)]), "options"),
        (dict(num_classes=2), "num_classes"),
        (dict(num_classes=5), "empty"),
        (dict(seed=1.5), "seed"),
        (dict(device="warp-drive"), "device"),
        (dict(device="meta"), "device"),
        (dict(crop_size="a"), "crop_size"),
        (dict(labels=y[:-1]), "labels"),
        (dict(labels=y.float()), "labels"),
        (dict(labels=None), "labels"),
    ]
    for overrides, name in cases:
        kw = dict(method="sfm", labels=y, steps=1, progress=False)
        kw.update(overrides)
        with pytest.raises(ValueError, match=name):
            api.distill(x, tiny, **kw)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        api.distill(bad, tiny, method="sfm", labels=y, steps=1, progress=False)
    with pytest.raises(ValueError, match="images"):
        api.distill(x[:, 0], tiny, method="sfm", labels=y, steps=1, progress=False)
    with pytest.raises(TypeError, match="encoder"):
        api.distill(x, 42, method="sfm", labels=y, steps=1, progress=False)
    with pytest.raises(ValueError, match="lgm"):
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(zip(x, y.tolist()))
        api.distill(torch.utils.data.DataLoader(Stream(), batch_size=4), tiny, method="lgm", steps=1,
                    progress=False)


def test_init_given_as_images(tiny, data):
    x, y = data
    start = torch.stack([x[y == c][0] for c in range(C)])
    out = api.distill(x, tiny, method="clp", labels=y, ipc=1, steps=0, init=start, **FAST)
    torch.testing.assert_close(out.images, start, atol=1e-4, rtol=0)
    assert out.settings["init"] == "given"
    with pytest.raises(ValueError, match="init"):
        api.distill(x, tiny, method="clp", labels=y, ipc=2, steps=0, init=start, **FAST)
    with pytest.raises(ValueError, match="init"):
        api.distill(x, tiny, method="clp", labels=y, ipc=1, steps=0, init=start * 2, **FAST)


class _Counting(nn.Module):
    """Logs (rows, grad enabled, input ids) of every call between step boundaries."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.log = []

    def forward(self, x):
        self.log.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))
        return self.inner(x)


@pytest.mark.parametrize("method", ["sfm", "clp", "lgm"])
def test_what_goes_through_the_encoder_each_step(data, method):
    """SFM/CLP: only the K*N_s synthetic rows (with a graph). LGM: also ipc*K*C real rows, without one."""
    x, y = data
    torch.manual_seed(0)
    counting = _Counting(_TinyNet())
    enc = encoders.wrap(counting)
    per_step = []

    def mark(step, loss):
        per_step.append(list(counting.log))
        counting.log.clear()

    ipc, copies = 2, 3
    api.distill(x, enc, method=method, labels=y, ipc=ipc, steps=3, copies=copies, progress=False,
                callback=mark)
    for calls in per_step[1:]:  # step 0's log also holds the set-up passes
        synthetic = [(n, g) for n, g in calls if g]
        real = [(n, g) for n, g in calls if not g]
        assert sum(n for n, _ in synthetic) == C * ipc * copies
        if method == "lgm":
            assert sum(n for n, _ in real) == C * ipc * copies
        else:
            assert real == []


def test_deprecated_option_keywords_still_work_with_a_warning(tiny, data):
    """fastdd 0.1's top-level option keywords: same result as options=, with a FutureWarning naming
    the new spelling; one of another method is validated, then ignored with a warning."""
    x, y = data
    kw = dict(labels=y, steps=2, **FAST)
    new = api.distill(x, tiny, method="clp", options={"lam": 0.5, "bias": True}, **kw)
    with pytest.warns(FutureWarning, match=r"options=\{'lam': 0.5\}"):
        old = api.distill(x, tiny, method="clp", lam=0.5, probe_bias=True, **kw)
    assert torch.equal(old.images, new.images) and old.settings["bias"] is True
    with pytest.warns(FutureWarning, match="ignored: it is an option of method 'clp', not of 'sfm'"):
        api.distill(x, tiny, method="sfm", tau=0.3, **kw)
    with pytest.raises(ValueError, match="tau"):
        api.distill(x, tiny, method="sfm", tau=-1.0, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        api.distill(x, tiny, method="sfm", temperature=0.3, **kw)
