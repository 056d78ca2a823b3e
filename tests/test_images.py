"""Image parameterisations: colour decorrelation, pixels, LGM's pyramid and its extension schedule."""
import pytest
import torch
import torch.nn.functional as F

from fastdd import images as fimages


def test_color_matrix_is_lgm_matrix_over_its_largest_column_norm():
    raw = torch.tensor(fimages.COLOR_CORRELATION, dtype=torch.float64)
    norms = raw.norm(dim=0)
    assert abs(float(norms.max()) - 0.462) < 1e-3
    m = fimages.color_matrix(torch.float64)
    torch.testing.assert_close(m, raw / norms.max())
    assert abs(float(m.norm(dim=0).max()) - 1.0) < 1e-12
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    # per pixel: v -> M v
    expected = (raw / norms.max()) @ x.permute(1, 0, 2, 3).reshape(3, -1)
    torch.testing.assert_close(fimages.decorrelate(x), expected.reshape(3, 2, 4, 5).permute(1, 0, 2, 3))
    torch.testing.assert_close(fimages.correlate(fimages.decorrelate(x)), x)


def test_decode_encode_round_trip_and_range():
    s = torch.rand(3, 3, 8, 8) * 0.98 + 0.01
    torch.testing.assert_close(fimages.decode(fimages.encode(s)), s, atol=1e-5, rtol=0)
    theta = torch.randn(2, 3, 5, 5) * 10
    out = fimages.decode(theta)
    assert bool((out >= 0).all() and (out <= 1).all())
    torch.testing.assert_close(out, torch.sigmoid(2 * fimages.decorrelate(theta)))


@pytest.mark.parametrize("size,expected", [
    (32, [1, 2, 4, 8, 16, 32]), (1, [1]), (28, [1, 2, 4, 8, 16, 28]),
    (224, [1, 2, 4, 8, 16, 32, 64, 128, 224]), (256, [1, 2, 4, 8, 16, 32, 64, 128, 256])])
def test_pyramid_resolutions(size, expected):
    assert fimages.pyramid_resolutions(size) == [(r, r) for r in expected]


def test_pyramid_resolutions_non_square():
    assert fimages.pyramid_resolutions((4, 8)) == [(1, 1), (2, 2), (4, 4), (4, 8)]


def test_pyramid_schedule_lgm_256_full_by_step_1601():
    """LGM: a level every 200 steps; 256-px images reach full resolution before (0-based) step 1600."""
    pyr = fimages.PyramidImages.from_noise(2, 256, torch.Generator().manual_seed(0), extend_every=200)
    extended_at = [step for step in range(5000) if pyr.maybe_extend(step)]
    assert extended_at == [200, 400, 600, 800, 1000, 1200, 1400, 1600]
    assert pyr.complete and pyr.num_levels == 9
    assert pyr().shape == (2, 3, 256, 256)


def test_pyramid_extension_rescales_levels_and_adds_scaled_noise():
    g = torch.Generator().manual_seed(1)
    pyr = fimages.PyramidImages.from_noise(3, 16, g, extend_every=5)
    assert pyr.num_levels == 1 and pyr.levels[0].shape == (3, 3, 1, 1)
    before = [lv.detach().clone() for lv in pyr.levels]
    state = g.get_state()
    assert pyr.maybe_extend(5, g)
    g2 = torch.Generator()
    g2.set_state(state)
    new = torch.randn(3, 3, 2, 2, generator=g2) / 2
    torch.testing.assert_close(pyr.levels[0].detach(), before[0] * 0.5)
    torch.testing.assert_close(pyr.levels[1].detach(), new)
    before = [lv.detach().clone() for lv in pyr.levels]
    assert not pyr.maybe_extend(7, g) and pyr.maybe_extend(10, g)
    for old, now in zip(before, pyr.levels):
        torch.testing.assert_close(now.detach(), old * (2 / 3))
    assert pyr.levels[2].shape == (3, 3, 4, 4)


def test_pyramid_decode_is_sum_of_bilinear_upsampled_levels():
    levels = [torch.randn(2, 3, r, r) for r in (1, 2, 4)]
    pyr = fimages.PyramidImages(levels, 8)
    x = sum(F.interpolate(lv, size=(8, 8), mode="bilinear", align_corners=False) for lv in levels)
    torch.testing.assert_close(pyr(), torch.sigmoid(2 * fimages.decorrelate(x)))


@pytest.mark.parametrize("shape, size", [((3, 5), (8, 12)), ((2, 2), (3, 7)), ((64, 64), (96, 96)),
                                         ((16, 8), (32, 32)), ((5, 5), (4, 4))])
def test_upsampling_products_equal_bilinear_interpolation_in_fp64(shape, size):
    """The pyramid's upsampling as two matrix products (``A_h level A_w^T``) is F.interpolate's bilinear
    (align_corners=False) to fp64 rounding, values and gradients, for non-square levels, sizes that are
    no multiple of the level's and a downsampling; the 1x1 and full-size levels are exact."""
    g = torch.Generator().manual_seed(0)
    level = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    got = fimages._upsampled(level, size)
    want = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    (g_got,) = torch.autograd.grad(got, level, upstream)
    (g_want,) = torch.autograd.grad(want, level, upstream)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    one = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    assert torch.equal(fimages._upsampled(one, size), one.expand(2, 3, *size))
    assert fimages._upsampled(level, shape) is level


@pytest.mark.parametrize("kind", ["pixels", "pyramid"])
def test_init_from_images_reproduces_them_and_state_round_trips(kind):
    imgs = torch.rand(4, 3, 12, 12) * 0.9 + 0.05
    p = fimages.make_images(kind, 4, 12, init_images=imgs)
    torch.testing.assert_close(p(), imgs, atol=1e-5, rtol=0)
    if kind == "pyramid":
        assert p.complete and not p.maybe_extend(200)
    q = fimages.images_from_state(p.get_state())
    torch.testing.assert_close(q(), p())


def test_images_are_differentiable_and_from_noise_shapes():
    for kind in fimages.PARAMETERIZATIONS:
        p = fimages.make_images(kind, 5, (8, 6), generator=torch.Generator().manual_seed(0))
        out = p()
        assert out.shape == (5, 3, 8, 6)
        (out * torch.randn_like(out)).sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in p.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="parameterization"):
        fimages.make_images("fourier", 2, 8)
    with pytest.raises(ValueError, match="init_images"):
        fimages.make_images("pixels", 2, 8, init_images=torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="extend_every"):
        fimages.PyramidImages.from_noise(1, 8, extend_every=0)
    with pytest.raises(ValueError, match="level 0"):
        fimages.PyramidImages([torch.randn(1, 3, 2, 2)], 8)
