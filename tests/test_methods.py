"""The method registry and the DM loss: every registered method declares what distill, the command line
and the benchmark read; a method added to the registry runs end to end with no other change; DM against
an fp64 oracle and autograd."""
import pytest
import torch

import fastdd.api as api
import fastdd.cli as cli
from fastdd import encoders, methods
from fastdd.methods import DistributionMatchingLoss
from fastdd.methods.base import LOOP_DEFAULTS
from fastdd.stats import RealStats
from test_api import _TinyNet  # the distill tests' tiny encoder


def test_registry_lists_every_method_once_with_its_declaration():
    assert methods.names() == ("lgm", "sfm", "clp", "dm")
    assert methods.reference().name == "lgm"
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and m.title and m.matches and m.real_per_step
        assert set(m.defaults) == set(LOOP_DEFAULTS)
        assert api.METHOD_DEFAULTS[name] == methods.defaults(name)
        for ipc in (1, 10):
            assert m.resolve_options(None, ipc) == m.option_defaults(ipc) == {
                k: v for k, v in methods.defaults(name, ipc).items() if k in m.options}
        assert m.needs.stats or m.needs.real_batches, f"{name} needs nothing from the real data"
    assert methods.get("lgm").defaults["copies"] == 10 and methods.get("clp").needs.bank
    assert sum(m.reference for m in methods.REGISTRY.values()) == 1


def test_unknown_method_and_options_are_named():
    with pytest.raises(ValueError, match=r"method must be one of \('lgm', 'sfm', 'clp', 'dm'\), got 'mtt'"):
        methods.get("mtt")
    clp = methods.get("clp")
    with pytest.raises(ValueError, match=r"\['temperature'\] are not options of method 'clp' \(its options: lam"):
        clp.resolve_options({"temperature": 1.0}, 1)
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        clp.resolve_options({"feature_norm": "zca"}, 1)
    with pytest.raises(ValueError, match="real_batch"):
        clp.resolve_options({"real_batch": 0}, 1)
    with pytest.raises(ValueError, match="its options: none"):
        methods.get("dm").resolve_options({"lam": 1.0}, 1)


def test_command_line_reads_methods_and_options_from_the_registry(capsys):
    parser = cli.build_parser()
    distill = next(a for a in parser._subparsers._group_actions[0].choices["distill"]._actions if a.dest == "method")
    assert tuple(distill.choices) == methods.names()
    args = parser.parse_args(["distill", "--data", "x", "--out", "o.pt", "--method", "clp", "--lam", "0.5",
                              "--real-batch", "all", "--bias", "true"])
    assert cli._method_options(args) == {"lam": 0.5, "real_batch": None, "bias": True}
    args = parser.parse_args(["distill", "--data", "x", "--out", "o.pt", "--method", "sfm", "--tau", "0.5"])
    with pytest.raises(ValueError, match="--tau: not an option of --method sfm"):
        cli._method_options(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--data", "x", "--out", "o.pt", "--bias", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


# ---- DM ------------------------------------------------------------------------------------------

def _dm_oracle(zs, ys, means):
    zs, means = zs.double(), means.double()
    return sum(((zs[ys == c].mean(0) - means[c]) ** 2).sum() for c in range(means.shape[0]))


def test_dm_loss_matches_the_fp64_oracle_and_autograd():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 7, generator=g)
    ys = torch.arange(5).repeat_interleave(3)
    zs = torch.randn(15, 7, generator=g, requires_grad=True)
    loss = DistributionMatchingLoss(means)(zs, ys)
    expected = _dm_oracle(zs, ys, means)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, zs)
    (oracle_grad,) = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(grad.double(), oracle_grad.double(), rtol=1e-5, atol=1e-6)
    z64 = zs.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: DistributionMatchingLoss(means.double())(z, ys), (z64,))
    at_means = means[ys].clone()
    assert float(DistributionMatchingLoss(means)(at_means, ys)) == pytest.approx(0.0, abs=1e-10)


def test_dm_loss_refuses_bad_input():
    means = torch.randn(3, 4)
    loss = DistributionMatchingLoss(means)
    with pytest.raises(ValueError, match="classes \\[2\\] have no synthetic row"):
        loss(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="feature dimension"):
        loss(torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        DistributionMatchingLoss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        DistributionMatchingLoss(torch.full((2, 4), float("nan")))
    stats = RealStats.from_features(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 3, 3]), bank=False)
    with pytest.raises(ValueError, match="empty classes"):
        DistributionMatchingLoss(stats)


# ---- a method added to the registry runs end to end -----------------------------------------------

def _toy_build(context, options):
    means = context.stats.means.to(context.device)

    def loss(zs, ys):  # pull each synthetic feature towards its class mean, scaled by an option
        return options["scale"] * (zs - means[ys]).pow(2).mean()
    return methods.Objective(loss)


def test_a_registered_method_runs_through_distill_and_the_command_line(monkeypatch):
    toy = methods.Method(name="toy", title="a test method", matches="class means", real_per_step="none",
                         build=_toy_build, needs=methods.RealNeeds(means=True),
                         defaults=dict(LOOP_DEFAULTS, steps=3),
                         options={"scale": methods.Option(2.0, "loss scale", lambda n, v: float(v))})
    monkeypatch.setitem(methods.REGISTRY, "toy", toy)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(6)
    x = (torch.rand(len(y), 3, 10, 10, generator=g) * 0.5 + 0.2)
    x[torch.arange(len(y)), y] += 0.25
    out = api.distill(x, encoders.wrap(_TinyNet()), "toy", labels=y, ipc=2, options={"scale": 3.0}, progress=False,
                      batch_size=8)
    assert out.method == "toy" and out.images.shape == (6, 3, 10, 10) and len(out.history) == 3
    assert out.settings["scale"] == 3.0 and out.history[-1] < out.history[0]
    help_text = _distill_help()
    assert "--scale" in help_text and "{lgm,sfm,clp,dm,toy}" in help_text


def test_an_ipc_dependent_default_is_resolved_at_the_runs_ipc():
    rule = methods.ByIpc(((1, 2), (10, 4)))
    assert [rule.at(ipc) for ipc in (1, 2, 9, 10, 50)] == [2, 2, 2, 4, 4]
    assert repr(rule) == "2 (ipc >= 10: 4)"
    with pytest.raises(TypeError):
        rule > 1  # not a number: code that forgets the ipc fails instead of reading one of its values
    for bad in ((), ((2, 1),), ((1, 2), (1, 4)), ((1, 2), (10, 4), (5, 3))):
        with pytest.raises(ValueError, match="ByIpc steps must start at ipc 1 and increase"):
            methods.ByIpc(bad)
    # CLP's crop law and lam: [0.25, 1] and 2 below ipc 10, [0.5, 1] and 1 from it (the grid,
    # benchmarks/results/calibration_grid*.md); a loop default and an option default alike
    below, above = methods.defaults("clp", 1), methods.defaults("clp", 10)
    assert (below["crop_scale"], below["lam"], below["copies"]) == ((0.25, 1.0), 2.0, 4)
    assert (above["crop_scale"], above["lam"], above["copies"]) == ((0.5, 1.0), 1.0, 4)
    assert methods.defaults("sfm", 10)["copies"] == 2 and methods.defaults("lgm", 10)["copies"] == 10
    assert isinstance(methods.defaults("clp")["lam"], methods.ByIpc)  # as declared, without an ipc
    help_text = " ".join(_distill_help().split())
    assert "clp (0.25, 1.0) (ipc >= 10: (0.5, 1.0))" in help_text
    assert "clp: default 2.0 (ipc >= 10: 1.0)" in help_text
    assert "`lam=2.0 (ipc >= 10: 1.0)`" in methods.markdown_table()


def test_distill_reads_an_ipc_dependent_default_at_its_ipc(monkeypatch):
    toy = methods.Method(name="toy", title="a test method", matches="class means", real_per_step="none",
                         build=_toy_build, needs=methods.RealNeeds(means=True),
                         defaults=dict(LOOP_DEFAULTS, steps=1, copies=methods.ByIpc(((1, 1), (3, 3)))),
                         options={"scale": methods.Option(methods.ByIpc(((1, 2.0), (3, 5.0))), "loss scale",
                                                          lambda n, v: float(v))})
    monkeypatch.setitem(methods.REGISTRY, "toy", toy)
    y = torch.arange(3).repeat(6)
    x = torch.rand(len(y), 3, 10, 10, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.2
    run = dict(encoder=encoders.wrap(_TinyNet()), method="toy", labels=y, progress=False, batch_size=8)
    two, three = api.distill(x, ipc=2, **run).settings, api.distill(x, ipc=3, **run).settings
    assert (two["copies"], two["scale"], three["copies"], three["scale"]) == (1, 2.0, 3, 5.0)
    given = api.distill(x, ipc=3, copies=2, options={"scale": 1.5}, **run).settings
    assert (given["copies"], given["scale"]) == (2, 1.5)  # an explicit argument wins


def _distill_help() -> str:
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices["distill"].format_help()


def test_readme_method_table_is_the_registry():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "readme_methods.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in methods.names():
        assert f"| `{name}` " in (root / "README.md").read_text()
