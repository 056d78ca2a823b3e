"""One rank of the distributed tests (tests/test_distributed.py), and the set-up they share with the
single-process reference: the tiny encoder, the real data, the runs' arguments.

Run as ``python tests/distributed_worker.py SCENARIO OUT_DIR`` with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); it initialises a gloo group and writes ``OUT_DIR/rank<r>.pt``.
"""
import datetime
import os
import sys
import time

import torch
import torch.nn as nn

NUM_CLASSES, PER_CLASS, SIZE = 4, 13, 16   # 52 images: batches of 8 leave a short last batch
BATCH = 8
METHODS = ("lgm", "sfm", "clp", "dm")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(torch.tanh(self.conv(x)).mean((2, 3)))


def encoder():
    import fastdd.encoders

    torch.manual_seed(0)
    return fastdd.encoders.wrap(TinyNet(), name="tiny-distributed")


def data():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(NUM_CLASSES).repeat(PER_CLASS)
    x = torch.rand(len(y), 3, SIZE, SIZE, generator=g) * 0.5 + 0.2
    x[torch.arange(len(y)), y % 3] += 0.25
    return x.clamp(0.05, 0.95), y


def stats_cases(x, y, tmp):
    """The statistics of each kind of source (the bank in fp32 and in fp16 on disk)."""
    import fastdd

    enc = encoder()
    out = {}
    out["tensor"] = fastdd.RealStats.from_data(x, enc, labels=y, bank=True, bank_dtype=torch.float32,
                                               batch_size=BATCH, progress=False, second_moment=True)
    dataset = torch.utils.data.TensorDataset(x, y)  # a map-style Dataset of (image, 0-d label tensor)
    out["dataset"] = fastdd.RealStats.from_data(dataset, enc, bank=True, batch_size=BATCH, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    out["loader"] = fastdd.RealStats.from_data(loader, enc, bank=True, batch_size=BATCH, progress=False)
    out["file"] = fastdd.RealStats.from_data(x, enc, labels=y, bank_path=os.path.join(tmp, "bank.raw"),
                                             batch_size=BATCH, progress=False)
    return {k: {"counts": s.counts, "sums": s.sums, "sq_sums": s.sq_sums, "bank": s.bank_features.clone(),
                "bank_labels": s.bank_labels} for k, s in out.items()}


def run_kwargs(method, steps, **extra):
    kw = dict(method=method, ipc=extra.pop("ipc", 2), steps=steps, batch_size=BATCH, seed=3, progress=False, lr=0.05)
    if method == "clp":
        kw["options"] = {"real_batch": 24}  # drawn rows: the shared generator must draw the same ones
    kw.update(extra)
    return kw


def distill_cases(x, y):
    import fastdd

    enc = encoder()
    out = {}
    for method in METHODS:
        for chunk in (None, 3):
            one = fastdd.distill(x, enc, labels=y, **run_kwargs(method, 1, chunk_size=chunk))
            out[(method, chunk, 1)] = (one.images, one.history)
        twenty = fastdd.distill(x, enc, labels=y, **run_kwargs(method, 20))
        out[(method, None, 20)] = (twenty.images, twenty.history)
    noise = fastdd.distill(x, enc, labels=y, **run_kwargs("sfm", 3, init="noise", extend_every=1))
    out[("sfm-noise", None, 3)] = (noise.images, noise.history)
    for method in ("sfm", "clp"):  # the centroid initialisation: by an encoder pass (SFM), from the bank (CLP)
        centroid = fastdd.distill(x, enc, labels=y, **run_kwargs(method, 2, init="centroid"))
        out[(f"{method}-centroid", None, 2)] = (centroid.images, centroid.history)
    return out


def main():
    scenario, out_dir = sys.argv[1], sys.argv[2]
    import torch.distributed as dist

    import fastdd  # noqa: F401

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("TIMEOUT", "60"))))
    rank = dist.get_rank()
    x, y = data()
    result = {}
    if scenario == "equal":
        result["stats"] = stats_cases(x, y, out_dir)
        result["distill"] = distill_cases(x, y)
    elif scenario == "die":
        die_at = int(os.environ.get("DIE_AT", "-1"))
        if rank == 1 and die_at < 0:
            os._exit(3)  # a rank that dies before distill's first collective

        def callback(step, loss):
            if rank == 1 and step == die_at:
                os._exit(3)  # a rank that dies in the middle of the steps
        start = time.time()
        try:
            fastdd.distill(x, encoder(), labels=y, callback=callback, **run_kwargs("sfm", 8))
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            result["error"] = (type(e).__name__, str(e))
        result["seconds"] = time.time() - start
    elif scenario in ("bad-data", "few"):
        if scenario == "bad-data":
            x = x.clone()
            x[-3] = float("nan")  # in the last batch: rank 1's share only
        else:
            y = y % 2  # 2 classes at ipc 1: 2 synthetic images for 3 ranks
        try:
            fastdd.distill(x, encoder(), labels=y, **run_kwargs("sfm", 2, ipc=1))
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            result["error"] = (type(e).__name__, str(e))
    elif scenario in ("resume-crash", "resume", "whole"):
        method = os.environ["METHOD"]
        ck = os.environ.get("CK") or os.path.join(out_dir, "..", f"{method}.ck")
        kill_at = 7 if scenario == "resume-crash" else None

        def callback(step, loss):
            if step == kill_at:
                os._exit(9)  # killed after the checkpoint of step 5, before the next
        out = fastdd.distill(x, encoder(), labels=y, callback=callback,
                             checkpoint=None if scenario == "whole" else ck, checkpoint_every=5,
                             **run_kwargs(method, 12))
        result["images"], result["history"] = out.images, out.history
        result["settings"] = out.settings
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if result.get("error") and result["error"][0] == "DistributedError":
        # the group is broken (a rank died): destroying it, or the interpreter's exit, can abort
        # ("terminate called without an active exception"); the result is saved, so leave at once
        sys.stdout.flush()
        os._exit(0)
    dist.barrier()  # every rank is done with the group before any tears it down (rank 0 hosts its store)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
