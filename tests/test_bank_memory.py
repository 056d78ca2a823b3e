"""The feature bank of the statistics pass costs about its own size in memory, during the pass and after
(it cost twice that when the batches were kept and then concatenated).

Each measurement is its own subprocess: a cheap encoder (a linear map of 4x4 images to 1024 features)
builds a 40,000-row fp16 bank (82 MB) from a tensor (its length known up front: one preallocated bank)
and from a DataLoader without a length (the batches are merged at the end, each freed once copied). A
thread samples the resident set (``/proc/self/statm``) while ``RealStats.from_data`` runs, and the
kernel's own high-water mark (``ru_maxrss``) replaces the sample when the pass set it; the figures are
the median of three passes, each above the resident set just before it. glibc is told to
return large blocks at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), as in
``tests/test_memory.py``, so the resident set follows the live memory instead of the allocator's caches.
"""
import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import gc, json, os, resource, sys, threading, time
import torch
from fastdd import encoders
from fastdd.stats import RealStats

kind, rows, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.rand(rows, 3, 4, 4)
y = torch.arange(rows) % 10


class Lift(torch.nn.Module):  # a cheap encoder: 48 pixel values -> dim features
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(48, dim)

    def forward(self, images):
        return self.linear(images.flatten(1))


class Stream(torch.utils.data.IterableDataset):  # batches without a len(): the bank's size is unknown
    def __iter__(self):
        return ((x[i:i + 256], y[i:i + 256]) for i in range(0, rows, 256))


encoder = encoders.wrap(Lift(), input_size=4)
source = {"tensor": x, "unsized": torch.utils.data.DataLoader(Stream(), batch_size=None)}[kind]
labels = y if kind == "tensor" else None
page = os.sysconf("SC_PAGE_SIZE")


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


def run():
    return RealStats.from_data(source, encoder, labels=labels, bank=True, progress=False, batch_size=256)


def measure():  # one pass: its peak and what it leaves, above the resident set just before it
    gc.collect()
    base, max_before = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stats = run()
    done.set()
    sampler.join()
    gc.collect()
    after = resident()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:  # the pass set the kernel's exact high-water mark
        peak[0] = max(peak[0], max_after)
    assert stats.bank_features.shape == (rows, dim) and torch.equal(stats.bank_labels, y)
    bank = stats.bank_features.numel() * stats.bank_features.element_size() + stats.bank_labels.numel() * 8
    return peak[0] - base, after - base, bank


run()  # warm-up: one-off costs (torch's, the allocator's) belong to the base, not to the measurement
# the median of three passes: the allocator's heap moves the base of one pass by a few MiB either way
passes = [measure() for _ in range(3)]
peak, after, bank = (sorted(values)[1] for values in zip(*passes))
print(json.dumps({"peak": peak, "after": after, "bank": bank}))
"""


def _measure(kind: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, "40000", "1024"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensor", "unsized"])
def test_the_bank_costs_about_its_size_during_and_after_the_pass(kind):
    m = _measure(kind)
    mib = 2 ** 20
    print(f"{kind}: bank {m['bank'] / mib:.1f} MiB, peak {m['peak'] / mib:.1f} MiB, after {m['after'] / mib:.1f} MiB")
    # 1.1 times the bank, and 2 MiB for one batch's features and the sampler's own noise
    allowed = 1.1 * m["bank"] + 2 * mib
    assert m["peak"] <= allowed, (f"the statistics pass peaked at {m['peak'] / m['bank']:.2f} times the bank "
                                  f"({m['peak'] / mib:.1f} MiB for a {m['bank'] / mib:.1f} MiB bank)")
    assert m["after"] <= allowed, f"after the pass: {m['after'] / m['bank']:.2f} times the bank"
