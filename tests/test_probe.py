"""The linear-probe protocol, its baselines and classifier inheritance, on small synthetic data.

The encoder is a fixed random 1x1 convolution + ReLU + global average pool: colour-coded classes are
linearly separable in its features, so a working probe must reach a high accuracy and a broken one
(wrong labels, wrong data) must not.
"""

import math
import statistics

import pytest
import torch
import torch.nn as nn

from fastdd import encoders, probe

NUM_CLASSES = 4
PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])
EPOCHS = 100


class ColourNet(nn.Module):
    """A fixed random 1x1 convolution, ReLU and global average pooling: features [B, dim].

    Many features, as in real encoders: the probe's initial weights shrink as 1/sqrt(D) while the
    protocol's small Adam steps add up coherently over D, so the probe learns within EPOCHS."""

    def __init__(self, dim: int = 2048, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(dim, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(dim, generator=g) * 0.5)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def colour_images(per_class: int, seed: int, size: int = 8, noise: float = 0.05):
    """Images of a class: its palette colour plus per-pixel noise, clamped to [0, 1]; class-major."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    base = PALETTE[labels].view(-1, 3, 1, 1).expand(-1, -1, size, size)
    images = (base + noise * torch.randn(base.shape, generator=g)).clamp(0, 1)
    return images, labels


@pytest.fixture(scope="module")
def encoder():
    return encoders.wrap(ColourNet(), name="colournet")


@pytest.fixture(scope="module")
def test_set():
    return colour_images(50, seed=123)


@pytest.fixture(scope="module")
def train_set():
    return colour_images(30, seed=7)


def run(distilled, encoder, test_set, **kw):
    kw.setdefault("epochs", EPOCHS)
    kw.setdefault("views", 10)
    kw.setdefault("progress", False)
    return probe.evaluate(distilled, encoder, *test_set, **kw)


def test_probe_learns_separable_classes(encoder, test_set):
    result = run(colour_images(2, seed=1), encoder, test_set, seeds=(0, 1, 2))
    assert result.mean > 95.0, result
    assert len(result.accuracies) == 3 and result.seeds == [0, 1, 2]
    assert result.settings["batch_size"] == 8 and result.settings["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert result.settings["epochs"] == EPOCHS
    assert len(result.heads) == 3 and result.heads[0].weight.shape == (NUM_CLASSES, 2048)


def test_probe_reencoding_every_epoch_also_learns(encoder, test_set):
    result = run(colour_images(2, seed=1), encoder, test_set, seeds=(0,), views=None, epochs=EPOCHS)
    assert result.mean > 95.0, result
    assert result.settings["views"] is None


def test_wrong_labels_fail(encoder, test_set):
    images, labels = colour_images(2, seed=1)
    result = run((images, (labels + 1) % NUM_CLASSES), encoder, test_set, seeds=(0, 1))
    assert result.mean < 5.0, result  # every test image lands in the wrong (shifted) class


def test_noise_images_stay_near_chance(encoder, test_set):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(8, 3, 8, 8, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(2)
    result = run((images, labels), encoder, test_set, seeds=(0, 1, 2))
    assert result.mean < 60.0, result


def test_too_few_epochs_underfit(encoder, test_set):
    # the protocol's learning rate is small: one epoch cannot train the probe (the test can fail)
    short = run(colour_images(2, seed=1), encoder, test_set, seeds=(0, 1, 2), epochs=1)
    long = run(colour_images(2, seed=1), encoder, test_set, seeds=(0, 1, 2))
    assert long.mean > short.mean + 20, (short, long)


def test_std_and_seeds(encoder, test_set):
    noisy = colour_images(1, seed=2, noise=0.35)
    result = run(noisy, encoder, test_set, seeds=(0, 1, 2, 3), epochs=40)
    assert result.std == pytest.approx(statistics.stdev(result.accuracies))
    assert result.mean == pytest.approx(statistics.fmean(result.accuracies))
    assert len(set(result.accuracies)) > 1, "different probe seeds must give different probes"
    # a seed's accuracy does not depend on the other seeds run with it, and repeats exactly
    alone = run(noisy, encoder, test_set, seeds=(2,), epochs=40)
    assert alone.accuracies[0] == pytest.approx(result.accuracies[2])
    assert alone.std == 0.0


def test_distilled_set_object_and_precomputed_test_features(encoder, test_set):
    class Distilled:  # anything with .images and .labels, like fastdd.DistilledSet
        images, labels = colour_images(2, seed=1)

    feats = probe.encode(encoder, test_set[0])
    a = run(Distilled(), encoder, test_set, seeds=(0,), test_features=feats)
    b = run(colour_images(2, seed=1), encoder, test_set, seeds=(0,))
    assert a.accuracies == b.accuracies


def test_training_matches_separate_torch_adams_with_cosine_schedule():
    # S probes stacked into one Adam with the closed-form gradient equal S separate trainings with
    # autograd + their own torch.optim.Adam + CosineAnnealingLR, each from its own generator
    import torch.nn.functional as F

    n, dim, classes, epochs, bs, lr, seeds = 37, 20, 5, 7, 10, 0.05, (4, 9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, dim, generator=g), torch.randint(classes, (n,), generator=g)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    weight, bias = probe._train_probes(lambda epoch: x, y, classes, generators, epochs, bs, lr, False, "test")
    assert weight.shape == (len(seeds), dim, classes) and bias.shape == (len(seeds), classes)
    for s, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        head = nn.Linear(dim, classes)  # LGM's evaluator: W ~ N(0, 0.01^2), b = 0, drawn in nn.Linear's layout
        head.weight.data.normal_(0.0, 0.01, generator=g)
        w_ref = head.weight.detach().t().clone().requires_grad_()
        b_ref = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.Adam([w_ref, b_ref], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(n / bs))
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for start in range(0, n, bs):
                i = order[start:start + bs]
                opt.zero_grad()
                F.cross_entropy(x[i] @ w_ref + b_ref, y[i]).backward()
                opt.step()
                schedule.step()
        torch.testing.assert_close(weight[s], w_ref.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bias[s], b_ref.detach(), atol=1e-6, rtol=1e-5)


def test_probe_head_starts_as_lgms_evaluator_by_default():
    # LGM's evaluator: nn.Linear with weight.normal_(0, 0.01) and bias zero, drawn from the probe seed
    dim, classes = 3000, 7
    weight, bias = probe._initial_probes([torch.Generator().manual_seed(5)], dim, classes, torch.device("cpu"))
    head = nn.Linear(dim, classes)
    head.weight.data.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(5))
    assert torch.equal(weight[0], head.weight.detach().t()) and torch.equal(bias[0], torch.zeros(classes))
    assert abs(float(weight.std()) - 0.01) < 3e-4 and abs(float(weight.mean())) < 3e-4
    # nn.Linear's uniform init stays available by name, and a bad name is an error naming the argument
    w_u, b_u = probe._initial_probes([torch.Generator().manual_seed(5)], dim, classes, torch.device("cpu"), "uniform")
    bound = 1 / math.sqrt(dim)
    assert float(w_u.abs().max()) <= bound and float(b_u.abs().max()) > 0
    with pytest.raises(ValueError, match="head_init"):
        probe._initial_probes([torch.Generator()], dim, classes, torch.device("cpu"), "xavier")


def test_evaluate_records_the_head_init_and_uses_it(encoder, test_set):
    lgm = run(colour_images(2, seed=1), encoder, test_set, seeds=(0,), epochs=1)
    uniform = run(colour_images(2, seed=1), encoder, test_set, seeds=(0,), epochs=1, head_init="uniform")
    assert lgm.settings["head_init"] == "lgm" and uniform.settings["head_init"] == "uniform"
    assert float(lgm.heads[0].bias.abs().max()) < 1e-2 < float(uniform.heads[0].bias.abs().max())
    with pytest.raises(ValueError, match="head_init"):
        run(colour_images(2, seed=1), encoder, test_set, head_init="zeros")


def test_cosine_schedule_is_the_closed_form_stepped_per_batch():
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=0.3)
    schedule = probe._cosine_schedule(optimizer, total_steps=8)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == [0.3 * 0.5 * (1.0 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert rates[0] == 0.3 and rates[-1] > 0.0


def test_combine_pools_runs():
    r1 = probe.ProbeResult.from_accuracies([50.0, 52.0], [0, 1], {"epochs": 3})
    r2 = probe.ProbeResult.from_accuracies([60.0], [0], {"epochs": 3})
    both = probe.ProbeResult.combine([r1, r2])
    assert both.accuracies == [50.0, 52.0, 60.0]
    assert both.mean == pytest.approx(54.0)
    assert both.std == pytest.approx(statistics.stdev([50.0, 52.0, 60.0]))
    assert both.settings["runs"] == 2


@pytest.mark.parametrize("mutate, error, match", [
    (lambda im, lb: (im[:, :2], lb), ValueError, r"distilled images must have shape \[N, 3, H, W\]"),
    (lambda im, lb: (im[:0], lb[:0]), ValueError, "distilled images is empty"),
    (lambda im, lb: (im.masked_fill(im > 0.5, float("nan")), lb), ValueError, "NaN"),
    (lambda im, lb: (im * 255, lb), ValueError, r"values in \[0, 1\]"),
    (lambda im, lb: ((im * 255).to(torch.uint8), lb), TypeError, "floating point"),
    (lambda im, lb: (im, lb[:-1]), ValueError, "one label per image"),
    (lambda im, lb: (im, lb.float()), TypeError, "distilled labels must be an integer tensor"),
    (lambda im, lb: (im, lb - 1), ValueError, ">= 0"),
    (lambda im, lb: (im, lb + 10), ValueError, "num_classes=4"),
    (lambda im, lb: im, TypeError, "DistilledSet"),
])
def test_bad_distilled_input(encoder, test_set, mutate, error, match):
    images, labels = colour_images(2, seed=1)
    with pytest.raises(error, match=match):
        run(mutate(images, labels), encoder, test_set, num_classes=4 if "num_classes" in match else None)


def test_bad_arguments(encoder, test_set):
    train = colour_images(2, seed=1)
    with pytest.raises(ValueError, match="epochs"):
        run(train, encoder, test_set, epochs=0)
    with pytest.raises(ValueError, match="views"):
        run(train, encoder, test_set, views=0)
    with pytest.raises(ValueError, match="seeds"):
        run(train, encoder, test_set, seeds=())
    with pytest.raises(ValueError, match="test labels"):
        probe.evaluate(train, encoder, test_set[0], test_set[1][:5], progress=False)
    with pytest.raises(ValueError, match="test_features"):
        run(train, encoder, test_set, test_features=torch.zeros(3, 2048))
    with pytest.raises(ValueError, match="encoder does not resize"):
        probe.evaluate(train, encoder, colour_images(2, seed=5, size=12)[0], test_set[1][:8], progress=False)


def test_random_real_picks_per_class(train_set):
    images, labels = train_set
    a_img, a_lab = probe.random_real(images, labels, ipc=3, seed=0)
    b_img, _ = probe.random_real(images, labels, ipc=3, seed=1)
    assert a_lab.tolist() == sorted(a_lab.tolist()) == [c for c in range(NUM_CLASSES) for _ in range(3)]
    # every pick is a real image of its class, without repeats
    for img, lab in zip(a_img, a_lab):
        matches = (images == img).flatten(1).all(1).nonzero().flatten()
        assert matches.numel() == 1 and labels[matches[0]] == lab
    assert len({tuple(img.flatten().tolist()) for img in a_img}) == 3 * NUM_CLASSES
    assert not torch.equal(a_img, b_img)
    with pytest.raises(ValueError, match="fewer than ipc=31"):
        probe.random_real(images, labels, ipc=31)


def test_class_centroids_pick_the_image_nearest_the_mean(train_set, encoder):
    images, labels = train_set
    # features where the nearest image to each class mean is known: class c's rows are c*10 + offsets
    # whose mean is c*10 + 0.5 and whose closest row is offset 0.6 (index 2 within the class)
    offsets = torch.tensor([-1.0, 0.0, 0.6, 1.4] + [0.5 + 10.0 * ((i % 2) * 2 - 1) for i in range(26)])
    offsets = offsets - offsets.mean() + 0.5
    feats = torch.zeros(images.shape[0], 2)
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        feats[idx, 0] = c * 100.0 + offsets
    picked, picked_labels = probe.class_centroids(images, labels, ipc=1, features=feats)
    assert picked_labels.tolist() == list(range(NUM_CLASSES))
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        nearest = idx[(feats[idx, 0] - (c * 100.0 + 0.5)).abs().argmin()]
        assert torch.equal(picked[c], images[nearest])
    # with the encoder instead of precomputed features: each pick is the class's real image nearest
    # the class mean of the encoder's features
    picked, _ = probe.class_centroids(images, labels, encoder, ipc=1, progress=False)
    enc_feats = probe.encode(encoder, images)
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        nearest = idx[(enc_feats[idx] - enc_feats[idx].mean(0)).norm(dim=1).argmin()]
        assert torch.equal(picked[c], images[nearest])


def test_class_centroids_ipc_above_one_cover_the_clusters(train_set):
    images, labels = train_set
    # each class has three well separated clusters: k-means with k = 3 must pick one image from each
    cluster = torch.arange(images.shape[0]) % 3
    feats = torch.stack([labels.float() * 100 + cluster * 10.0, torch.zeros(images.shape[0])], 1)
    feats = feats + 0.1 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    picked, picked_labels = probe.class_centroids(images, labels, ipc=3, features=feats)
    assert picked_labels.tolist() == [c for c in range(NUM_CLASSES) for _ in range(3)]
    rows = [int((images == img).flatten(1).all(1).nonzero()[0]) for img in picked]
    for c in range(NUM_CLASSES):
        assert sorted(int(cluster[r]) for r in rows[3 * c:3 * c + 3]) == [0, 1, 2]


def _kcenter_oracle(x, k):
    """Brute force: start at the row nearest the mean; then, over every unchosen row, the one whose distance
    to its nearest chosen row is largest (first on ties)."""
    mean = [sum(col) / len(col) for col in zip(*x)]
    dist = lambda a, b: math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))  # noqa: E731
    chosen = [min(range(len(x)), key=lambda i: (dist(x[i], mean), i))]
    while len(chosen) < k:
        rest = [i for i in range(len(x)) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist(x[i], x[j]) for j in chosen), -i)))
    return chosen


def _herding_oracle(x, k):
    """Brute force: every unchosen row tried as the next pick; keep the one whose mean with the picks is
    nearest the mean of all rows (first on ties)."""
    mean = [sum(col) / len(col) for col in zip(*x)]
    chosen = []
    while len(chosen) < k:
        def gap(i):
            rows = [x[j] for j in chosen + [i]]
            return math.sqrt(sum((sum(col) / len(rows) - m) ** 2 for col, m in zip(zip(*rows), mean)))
        chosen.append(min((i for i in range(len(x)) if i not in chosen), key=lambda i: (gap(i), i)))
    return chosen


@pytest.mark.parametrize("name, oracle", [("kcenter_greedy", _kcenter_oracle), ("herding", _herding_oracle)])
def test_coresets_match_brute_force_oracles(train_set, name, oracle):
    images, labels = train_set
    feats = torch.randn(images.shape[0], 3, generator=torch.Generator().manual_seed(4))
    feats[labels == 2] *= 5  # one class spread wide
    select = getattr(probe, name)
    picked, picked_labels = select(images, labels, ipc=4, features=feats)
    assert picked_labels.tolist() == [c for c in range(NUM_CLASSES) for _ in range(4)]  # per class, class-major
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        expect = idx[oracle(feats[idx].double().tolist(), 4)]
        assert torch.equal(picked[4 * c:4 * c + 4], images[expect]), (name, c)
    # ipc 1 is the image nearest the class mean for both (class_centroids' pick)
    assert torch.equal(select(images, labels, ipc=1, features=feats)[0],
                       probe.class_centroids(images, labels, ipc=1, features=feats)[0])
    with pytest.raises(ValueError, match="fewer than ipc=31"):
        select(images, labels, ipc=31, features=feats)
    with pytest.raises(ValueError, match="encoder"):
        select(images, labels, ipc=1)


def test_kcenter_covers_clusters_and_herding_matches_the_mean(train_set, encoder):
    images, labels = train_set
    cluster = torch.arange(images.shape[0]) % 3
    feats = torch.stack([labels.float() * 100 + cluster * 10.0, torch.zeros(images.shape[0])], 1)
    feats = feats + 0.1 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    picked, _ = probe.kcenter_greedy(images, labels, ipc=3, features=feats)
    rows = [int((images == img).flatten(1).all(1).nonzero()[0]) for img in picked]
    for c in range(NUM_CLASSES):
        assert sorted(int(cluster[r]) for r in rows[3 * c:3 * c + 3]) == [0, 1, 2]
    # herding's picks match the class mean far better than random picks of the same size do
    picked, _ = probe.herding(images, labels, ipc=3, features=feats)
    rows = torch.tensor([int((images == img).flatten(1).all(1).nonzero()[0]) for img in picked])
    for c in range(NUM_CLASSES):
        mean = feats[labels == c].mean(0)
        gap = (feats[rows[3 * c:3 * c + 3]].mean(0) - mean).norm()
        idx = (labels == c).nonzero().flatten()
        rand = torch.stack([(feats[idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(s))[:3]]]
                             .mean(0) - mean).norm() for s in range(20)])
        assert float(gap) < 0.1 * float(rand.median())
    # with the encoder: the same picks as with its features given
    by_encoder = probe.herding(images, labels, encoder, ipc=2, progress=False)[0]
    assert torch.equal(by_encoder, probe.herding(images, labels, ipc=2, features=probe.encode(encoder, images))[0])


def test_nearest_real_recovers_the_source_images(train_set, encoder):
    images, labels = train_set
    src = torch.tensor([0, 5, 31, 40, 65, 70, 95, 110])  # two real images per class
    # a zero-mean checkerboard keeps each image's mean colour: its nearest real image is its source
    checker = 0.005 * (torch.arange(8).view(8, 1) + torch.arange(8)).remainder(2).mul(2).sub(1)
    distilled = ((images[src] + checker).clamp(0, 1), labels[src])
    found, found_labels = probe.nearest_real(distilled, images, labels, encoder, progress=False)
    assert torch.equal(found_labels, labels[src])
    assert torch.equal(found, images[src])


def test_full_data_probe_and_classifier_inheritance(train_set, test_set, encoder):
    images, labels = train_set
    full = probe.full_data_probe(images, labels, encoder, *test_set, epochs=40, seeds=(0, 1), progress=False)
    assert full.mean > 95.0, full
    assert len(full.heads) == 2 and full.settings["features"] == "precomputed, un-augmented"
    inherited = probe.classifier_inheritance(probe.random_real(images, labels, ipc=2), encoder, *test_set,
                                             head=full.heads[0], views=5, seeds=(0, 1), progress=False)
    assert inherited.mean > 95.0, inherited
    # a head that predicts the wrong classes is inherited as such: the projector cannot fix labels
    wrong = nn.Linear(2048, NUM_CLASSES)
    with torch.no_grad():
        wrong.weight.copy_(full.heads[0].weight.roll(1, 0))
        wrong.bias.copy_(full.heads[0].bias.roll(1, 0))
    bad = probe.classifier_inheritance(probe.random_real(images, labels, ipc=2), encoder, *test_set,
                                       head=wrong, views=5, seeds=(0,), progress=False)
    assert bad.mean < 5.0, bad
    with pytest.raises(ValueError, match="head takes 32 features"):
        probe.classifier_inheritance(train_set, encoder, *test_set, head=nn.Linear(32, 4), views=2,
                                     progress=False)


def test_silent_wrong_evaluations_are_refused(encoder, test_set):
    train = colour_images(2, seed=1)
    without_last = (train[0][:-2], train[1][:-2])  # no distilled image of the last class
    with pytest.raises(ValueError, match=rf"test_labels hold classes \[{NUM_CLASSES - 1}\]"):
        run(without_last, encoder, test_set)
    for lr in (float("inf"), "a", 0.0):
        with pytest.raises(ValueError, match="lr"):
            run(train, encoder, test_set, lr=lr)
    with pytest.raises(ValueError, match="test_features have 5 features"):
        run(train, encoder, test_set, test_features=torch.zeros(test_set[0].shape[0], 5))
