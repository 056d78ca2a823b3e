"""fastdd under torch.distributed: gloo process groups of 2 and 3 CPU processes (tests/distributed_worker.py,
launched with torchrun's environment) against the single-process run in this process.

- statistics (counts, fp64 sums and squared sums, the bank's rows and labels) equal exactly, for a tensor,
  a map-style Dataset, a DataLoader and a bank written to a file;
- one step of every method, plain and chunked, equals the single-process step within fp32 tolerance, and
  20 steps stay in close agreement (LGM's real batch is encoded in shares: rounding only);
- a rank that dies (before the first collective, or in the middle of the steps) makes the other stop with
  fastdd's DistributedError within seconds, not hang;
- a distributed run killed after a checkpoint and resumed gives the uninterrupted distributed run
  exactly; resumed with another world size, the same run up to rounding.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout: float = 300, **env) -> list:
    """Run ``world`` ranks of the worker (the environment torchrun gives); ``[(exit code, output)]``."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
        e.pop("TRITON_INTERPRET", None)
        logs.append(open(out / f"rank{rank}.log", "w+"))  # a file, not a pipe: a talkative rank never blocks
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=e, text=True,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    results = []
    for p, log in zip(procs, logs):
        try:
            code = p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {scenario} ranks did not finish within {timeout} s (a hang)")
        log.seek(0)
        results.append((code, log.read()))
        log.close()
    return results


def load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    x, y = worker.data()
    return worker.stats_cases(x, y, str(tmp_path_factory.mktemp("bank"))), worker.distill_cases(x, y)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def distributed(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"equal{request.param}")
    for code, text in launch("equal", request.param, out):
        assert code == 0, text[-3000:]
    return [load(out, r) for r in range(request.param)]


def test_statistics_and_bank_equal_the_single_process_ones_exactly(reference, distributed):
    stats, _ = reference
    for rank, got in enumerate(distributed):
        for source, fields in stats.items():
            for name, want in fields.items():
                have = got["stats"][source][name]
                if want is None:
                    assert have is None
                    continue
                assert have.dtype == want.dtype and torch.equal(have, want), (rank, source, name)


def test_steps_equal_the_single_process_steps(reference, distributed):
    _, runs = reference
    for rank, got in enumerate(distributed):
        for key, (images, history) in runs.items():
            have_images, have_history = got["distill"][key]
            steps = key[2]
            tol = 1e-4 if steps == 1 else 1e-3
            torch.testing.assert_close(have_images, images, rtol=0, atol=tol, msg=f"rank {rank} {key}")
            torch.testing.assert_close(torch.tensor(have_history), torch.tensor(history), rtol=1e-4, atol=1e-5)
    for key in runs:  # every rank returns the same result
        for got in distributed[1:]:
            assert torch.equal(got["distill"][key][0], distributed[0]["distill"][key][0])


@pytest.mark.parametrize("die_at", [-1, 3], ids=["before-the-first-collective", "in-the-steps"])
def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path, die_at):
    start = time.time()
    results = launch("die", 2, tmp_path, timeout=120, DIE_AT=die_at, TIMEOUT=30)
    assert results[1][0] == 3
    assert results[0][0] == 0, results[0][1][-3000:]
    got = load(tmp_path, 0)
    assert got["error"] is not None and got["error"][0] == "DistributedError", got["error"]
    assert "rank 0 of 2" in got["error"][1] and "another rank stopped" in got["error"][1]
    assert got["seconds"] < 30 and time.time() - start < 120


@pytest.mark.parametrize("method", ["sfm", "lgm"])
def test_killed_and_resumed_distributed_run_equals_the_uninterrupted_one(tmp_path, method):
    crashed = launch("resume-crash", 2, tmp_path / "crash", METHOD=method)
    assert [code for code, _ in crashed] == [9, 9]
    assert (tmp_path / f"{method}.ck").exists()
    (tmp_path / "other.ck").write_bytes((tmp_path / f"{method}.ck").read_bytes())
    for code, text in launch("resume", 2, tmp_path / "resume", METHOD=method):
        assert code == 0, text[-3000:]
    for code, text in launch("whole", 2, tmp_path / "whole", METHOD=method):
        assert code == 0, text[-3000:]
    resumed, whole = load(tmp_path / "resume", 0), load(tmp_path / "whole", 1)
    assert resumed["settings"]["resumed"] == [{"step": 5, "changed": {}}]
    assert torch.equal(resumed["images"], whole["images"]) and resumed["history"] == whole["history"]
    # another world size re-partitions the saved whole set: the same run up to rounding
    for code, text in launch("resume", 3, tmp_path / "three", METHOD=method, CK=tmp_path / "other.ck"):
        assert code == 0, text[-3000:]
    three = load(tmp_path / "three", 2)
    assert three["settings"]["resumed"] == [{"step": 5, "changed": {"world_size": [2, 3]}}]
    torch.testing.assert_close(three["images"], whole["images"], rtol=0, atol=1e-4)


def test_saved_statistics_load_by_shard(tmp_path):
    import fastdd
    from fastdd.distributed import shard_bounds

    x, y = worker.data()
    stats = fastdd.RealStats.from_data(x, worker.encoder(), labels=y, bank=True, batch_size=8, progress=False)
    stats.save(tmp_path / "s.safetensors")
    parts = [fastdd.RealStats.load(tmp_path / "s.safetensors", shard=(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([p.bank_features for p in parts]), stats.bank_features)
    assert torch.equal(torch.cat([p.bank_labels for p in parts]), stats.bank_labels)
    assert [p.bank_features.shape[0] for p in parts] == [hi - lo for lo, hi in (shard_bounds(52, r, 3) for r in range(3))]
    assert all(torch.equal(p.sums, stats.sums) and torch.equal(p.counts, stats.counts) for p in parts)
    for bad in [(3, 3), (0,), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            fastdd.RealStats.load(tmp_path / "s.safetensors", shard=bad)


CLI = ["--data", "digits", "--encoder", "torchvision:mobilenet_v2", "--weights", "imagenet", "--size", "16",
       "--no-progress"]


def _fastdd(args, cwd, world=None):
    """``fastdd ARGS`` in a subprocess, under ``torchrun --nproc-per-node world`` when given."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] \
        if world else [sys.executable]
    return subprocess.run(launcher + ["-m", "fastdd"] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_torchrun_command_line_shares_the_work_and_writes_once(tmp_path):
    import fastdd

    one = _fastdd(["stats", *CLI, "--bank", "--out", "one.stats"], tmp_path)
    two = _fastdd(["stats", *CLI, "--bank", "--out", "two.stats"], tmp_path, world=2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("saved RealStats of 1438 images") == 1  # rank 0 alone reports
    a, b = fastdd.RealStats.load(tmp_path / "one.stats"), fastdd.RealStats.load(tmp_path / "two.stats")
    assert torch.equal(a.sums, b.sums) and torch.equal(a.counts, b.counts)
    assert torch.equal(a.bank_features, b.bank_features) and torch.equal(a.bank_labels, b.bank_labels)

    run = ["distill", *CLI, "--method", "sfm", "--steps", "3", "--checkpoint-every", "2"]
    one = _fastdd(run + ["--out", "one.pt"], tmp_path)
    two = _fastdd(run + ["--out", "two.pt", "--json"], tmp_path, world=2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert [line["message"].startswith("saved") for line in lines].count(True) == 1
    x, y = fastdd.DistilledSet.load(tmp_path / "one.pt"), fastdd.DistilledSet.load(tmp_path / "two.pt")
    assert y.settings["world_size"] == 2 and x.settings["world_size"] == 1
    torch.testing.assert_close(y.images, x.images, rtol=0, atol=1e-3)
    assert (tmp_path / "two.loss.png").exists() and json.loads((tmp_path / "two.log.json").read_text())["method"] == "sfm"


def test_the_command_line_ends_its_group_only_after_every_rank_is_done(monkeypatch, capsys):
    """Success: a barrier, then destroy_process_group (a rank that tore down first made gloo abort its
    peer, which was still writing the files). A failed barrier: an error and no destroy (it can hang)."""
    import torch.distributed as dist

    from fastdd import cli, distributed

    calls = []

    class Ranks:
        def barrier(self, what):
            calls.append("barrier")
            if fail:
                raise distributed.DistributedError(f"the collective {what} failed")

    monkeypatch.setattr(cli, "_set_up", lambda args: True)
    monkeypatch.setattr(cli, "_methods", lambda args: calls.append("run") or 0)
    monkeypatch.setattr(distributed, "resolve_group", lambda group=None: Ranks())
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append("destroy"))
    fail = False
    assert cli.main(["methods"]) == 0 and calls == ["run", "barrier", "destroy"]
    calls.clear()
    fail = True
    assert cli.main(["methods"]) == 1 and calls == ["run", "barrier"]
    assert "the collective before ending the process group failed" in capsys.readouterr().err


def test_one_process_commands_refuse_torchrun(tmp_path, capsys):
    from fastdd import cli

    os.environ["WORLD_SIZE"] = "2"
    try:
        code = cli.main(["baseline", *CLI, "--kind", "random", "--out", str(tmp_path / "b.pt")])
    finally:
        del os.environ["WORLD_SIZE"]
    assert code == 2 and "runs in one process: launch it without torchrun" in capsys.readouterr().err


def test_bad_data_in_one_ranks_share_is_one_clear_error_on_every_rank(tmp_path):
    for code, text in launch("bad-data", 2, tmp_path, timeout=120):
        assert code == 0, text[-3000:]
    own, other = load(tmp_path, 1)["error"], load(tmp_path, 0)["error"]
    assert own[0] == other[0] == "DataError" and "NaN" in own[1]
    assert other[1].startswith("rank 1 of 2: ") and own[1] in other[1]


def test_fewer_synthetic_images_than_ranks_is_refused_on_every_rank(tmp_path):
    for code, text in launch("few", 3, tmp_path, timeout=120):
        assert code == 0, text[-3000:]
    for rank in range(3):
        error = load(tmp_path, rank)["error"]
        assert error[0] == "ValueError" and "cannot be shared by 3 ranks" in error[1]


def test_a_distributed_sampler_is_refused():
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from fastdd.distributed import Group, shard_batches

    x, y = worker.data()
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="DistributedSampler"):
        next(shard_batches(loader, None, 8, Group(rank=0, world_size=2)))


def test_a_bank_file_of_an_unsized_stream_is_refused_before_the_pass(tmp_path):
    import fastdd
    from fastdd.distributed import Group

    x, y = worker.data()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y.tolist()))

    seen = []
    encoder = worker.encoder()
    encoder.register_forward_hook(lambda *args: seen.append(1))
    with pytest.raises(ValueError, match="bank_path under a process group needs a sized source"):
        fastdd.RealStats.from_data(torch.utils.data.DataLoader(Stream(), batch_size=8), encoder,
                                   bank_path=tmp_path / "bank.raw", group=Group(rank=0, world_size=2), progress=False)
    assert not seen and not list(tmp_path.iterdir())
