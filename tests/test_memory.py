"""Memory-flat distillation: with ``chunk_size`` set, what ``distill`` adds on top of the image
parameters and Adam's state does not grow with the number of synthetic images.

Each run is its own subprocess (Fashion-MNIST at 32 px, 60 real images a class, the pretrained
MobileNetV2, SFM, 3 steps, chunk_size 10); a thread samples the resident set while ``distill`` runs, and
the peak over the resident set before it is the memory the run added. glibc is told to return large
blocks at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so the resident set follows the
live memory instead of the allocator's caches.
"""
import json
import os
import subprocess
import sys

import pytest

from fastdd.images import pyramid_resolutions

_CHILD = r"""
import gc, json, os, sys, threading, time
import torch
import fastdd, fastdd.data, fastdd.encoders
ipc = int(sys.argv[1])
torch.set_num_threads(1)
train, _ = fastdd.data.load("fashion-mnist", size=32)
idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:60] for c in range(10)])
x, y = train.images[idx].clone(), train.labels[idx].clone()
del train
encoder = fastdd.encoders.load("torchvision:mobilenet_v2")
stats = fastdd.RealStats.from_data(x, encoder, labels=y, progress=False)
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
gc.collect()
base = resident()
peak, done = [base], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
fastdd.distill(x, encoder, "sfm", labels=y, ipc=ipc, steps=3, stats=stats, chunk_size=10, progress=False)
done.set()
sampler.join()
print(json.dumps({"extra_bytes": peak[0] - base, "feature_dim": stats.feature_dim}))
"""


def _extra_memory(ipc: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ipc)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_chunked_memory_beyond_parameters_and_adam_state_is_flat_in_ipc():
    small, large = _extra_memory(10), _extra_memory(50)
    more_images = 10 * (50 - 10)
    # per image: the pyramid's levels, fp32; the parameters, their gradient, Adam's two moments and its
    # update's temporary are five such copies. Per synthetic row (copies = 1): its features and their
    # gradient, [D] fp32 each. Anything else growing with ipc shows up beyond the slack.
    parameter_bytes = sum(h * w for h, w in pyramid_resolutions(32)) * 3 * 4
    allowed = more_images * (5 * parameter_bytes + 2 * 4 * small["feature_dim"]) + 8 * 2 ** 20
    grown = large["extra_bytes"] - small["extra_bytes"]
    print(f"extra memory: ipc 10 {small['extra_bytes'] / 2**20:.1f} MiB, ipc 50 {large['extra_bytes'] / 2**20:.1f} "
          f"MiB; growth {grown / 2**20:.1f} MiB, allowed {allowed / 2**20:.1f} MiB")
    assert grown <= allowed, (
        f"memory beyond the parameters and Adam's state grew by {(grown - allowed) / 2**20:.1f} MiB "
        f"from ipc 10 to ipc 50 (ipc 10: {small['extra_bytes'] / 2**20:.1f} MiB, ipc 50: "
        f"{large['extra_bytes'] / 2**20:.1f} MiB, allowed growth {allowed / 2**20:.1f} MiB)")
