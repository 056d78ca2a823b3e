"""LGM's augmentation chain: shapes, per-image parameters, constants, reuse of a draw, gradients."""
import math

import pytest
import torch

from fastdd import augment as A


def test_constants_are_lgms():
    assert A.FLIP_PROB == 0.5 and A.CROP_SCALE == (0.08, 1.0)
    assert A.CROP_LOG_RATIO == pytest.approx((math.log(3 / 4), math.log(4 / 3)))
    assert (A.NOISE_PROB, A.NOISE_MEAN, A.NOISE_STD) == (0.5, 0.5, 0.2)
    ev = A.Augment.evaluation()
    assert ev.noise_prob == 0 and ev.crop and ev.flip_prob == 0.5


def test_shapes_and_crop_size():
    x = torch.rand(6, 3, 16, 16)
    assert A.Augment()(x).shape == (6, 3, 16, 16)
    assert A.Augment(crop_size=12)(x).shape == (6, 3, 12, 12)
    assert A.Augment(crop_size=(10, 7))(x).shape == (6, 3, 10, 7)


def test_identity_and_flip():
    x = torch.rand(4, 3, 9, 11)
    torch.testing.assert_close(A.Augment.identity()(x), x, atol=1e-5, rtol=0)
    flip = A.Augment(flip_prob=1.0, crop=False, noise_prob=0.0)
    torch.testing.assert_close(flip(x), torch.flip(x, dims=[3]), atol=1e-5, rtol=0)
    full_crop = A.Augment(crop_scale=(1.0, 1.0), crop_log_ratio=(0.0, 0.0), flip_prob=0.0, noise_prob=0.0)
    torch.testing.assert_close(full_crop(x), x, atol=1e-5, rtol=0)


def test_noise_law():
    x = torch.zeros(400, 3, 8, 8)
    out = A.Augment(flip_prob=0.0, crop=False, noise_prob=1.0)(x, torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - 0.5) < 0.01 and abs(float(out.std()) - 0.2) < 0.01
    half = A.Augment(flip_prob=0.0, crop=False)(x, torch.Generator().manual_seed(0))
    noisy = (half.flatten(1).abs().sum(1) > 0).float().mean()
    assert 0.4 < float(noisy) < 0.6  # noise_prob 0.5, per image


def test_parameters_are_per_image_and_crops_in_range():
    aug = A.Augment(noise_prob=0.0)
    p = aug.sample(2000, (32, 32), torch.Generator().manual_seed(0))
    sx, sy = p.affine[:, 0, 0], p.affine[:, 1, 1]
    assert 0.4 < float((sx < 0).float().mean()) < 0.6                 # flips, per image
    area = (sx.abs() * sy)
    assert float(area.min()) >= 0.08 - 1e-6 and float(area.max()) <= 1 + 1e-6
    ratio = sx.abs() / sy
    assert float(ratio.min()) >= 3 / 4 - 1e-5 and float(ratio.max()) <= 4 / 3 + 1e-5
    inside = sx.abs() <= 1
    assert bool((p.affine[inside, 0, 2].abs() <= 1 - sx.abs()[inside] + 1e-6).all())
    assert len(torch.unique(area)) > 1900


def test_crop_offsets_follow_lgms_chain_also_where_the_crop_is_larger_than_the_image():
    # LGM's RandomResizedCrop: top-left x1 = u * (1 - scale_w), centre offset (x1 + scale_w / 2 - 0.5) * 2,
    # for every crop, including those wider or taller than the image (x1 < 0: the image at a random offset)
    n, g = 4000, torch.Generator().manual_seed(3)
    p = A.Augment(noise_prob=0.0).sample(n, (16, 16), torch.Generator().manual_seed(3))
    flip = torch.rand(n, generator=g) < 0.5
    area = torch.rand(n, generator=g) * (1.0 - 0.08) + 0.08
    lo, hi = A.CROP_LOG_RATIO
    ratio = torch.exp(torch.rand(n, generator=g) * (hi - lo) + lo)
    scale_w, scale_h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    u_x, u_y = torch.rand(n, generator=g), torch.rand(n, generator=g)
    offset_x = (u_x * (1 - scale_w) + scale_w / 2 - 0.5) * 2
    offset_y = (u_y * (1 - scale_h) + scale_h / 2 - 0.5) * 2
    torch.testing.assert_close(p.affine[:, 0, 0], torch.where(flip, -scale_w, scale_w))
    torch.testing.assert_close(p.affine[:, 0, 2], offset_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(p.affine[:, 1, 2], offset_y, atol=1e-6, rtol=0)
    wide = scale_w > 1.02
    assert int(wide.sum()) > 50
    spread = p.affine[wide, 0, 2] / (scale_w[wide] - 1)  # U[-1, 1] over the positions that hold the image
    assert float(spread.abs().max()) <= 1 + 1e-4 and 0.4 < float(spread.abs().mean()) < 0.6


def test_a_draw_can_be_reapplied_chunk_by_chunk():
    x = torch.rand(10, 3, 12, 12)
    aug = A.Augment(crop_size=8)
    p = aug.sample(10, (12, 12), torch.Generator().manual_seed(2))
    whole = aug.apply(x, p)
    torch.testing.assert_close(torch.cat([aug.apply(x[:4], p[:4]), aug.apply(x[4:], p[4:])]), whole)
    idx = torch.tensor([3, 1, 7])
    torch.testing.assert_close(aug.apply(x[idx], p[idx]), whole[idx])
    with pytest.raises(ValueError, match="params"):
        aug.apply(x[:3], p)


def test_differentiable():
    x = torch.rand(5, 3, 10, 10, requires_grad=True)
    out = A.Augment(crop_size=7)(x, torch.Generator().manual_seed(0))
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    xd = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    aug = A.Augment(noise_prob=0.0)
    p = aug.sample(2, (5, 5), torch.Generator().manual_seed(1))
    p = A.AugmentParams(p.affine.double(), None, p.out_size)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (xd,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="flip_prob"):
        A.Augment(flip_prob=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        A.Augment(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="noise_std"):
        A.Augment(noise_std=-1)
