"""RealStats: one streamed pass (tensor, Dataset, DataLoader), fp64 sums, feature banks in memory and
memory-mapped, from_features, and checked files (round trip, corrupt file errors)."""
import os

import pytest
import torch
import torch.nn as nn

from fastdd import encoders
from fastdd.stats import CorruptFileError, RealStats


class _TinyNet(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.conv = nn.Conv2d(3, d, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return encoders.wrap(_TinyNet())


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(53, 3, 10, 10, generator=g)
    y = torch.randint(0, 4, (53,), generator=g)
    y[:4] = torch.arange(4)
    return x, y


def _fp64_reference(encoder, x, y, c):
    with torch.no_grad():
        z = encoder(x).double()
    sums = torch.zeros(c, z.shape[1], dtype=torch.float64).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=c)
    return z, sums, counts


class _MapDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("kind", ["tensor", "dataset", "loader"])
def test_from_data_matches_fp64_reference_for_every_source(tiny, data, kind):
    x, y = data
    z, sums, counts = _fp64_reference(tiny, x, y, 4)
    if kind == "tensor":
        stats = RealStats.from_data(x, tiny, labels=y, batch_size=8, progress=False, second_moment=True)
    elif kind == "dataset":
        stats = RealStats.from_data(_MapDataset(x, y), tiny, batch_size=8, progress=False, second_moment=True)
    else:
        loader = torch.utils.data.DataLoader(_MapDataset(x, y), batch_size=7)
        stats = RealStats.from_data(loader, tiny, progress=False, second_moment=True)
    assert stats.sums.dtype == torch.float64 and stats.counts.dtype == torch.int64
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.sums, sums, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.means, (sums / counts[:, None]).float(), rtol=1e-5, atol=1e-6)
    sq = torch.zeros_like(sums).index_add_(0, y, z * z)
    torch.testing.assert_close(stats.sq_sums, sq, rtol=1e-6, atol=1e-6)
    assert stats.num_classes == 4 and stats.feature_dim == 6 and stats.num_samples == 53
    assert not stats.has_bank


def test_num_classes_larger_than_labels_keeps_empty_classes(tiny, data):
    x, y = data
    stats = RealStats.from_data(x, tiny, labels=y, num_classes=6, progress=False)
    assert stats.counts.tolist()[4:] == [0, 0] and stats.empty_classes == [4, 5]
    with pytest.raises(ValueError, match="empty"):
        stats.require_nonempty()
    with pytest.raises(ValueError, match="num_classes"):
        RealStats.from_data(x, tiny, labels=y, num_classes=3, progress=False)


def test_class_count_grows_with_streamed_labels(tiny, data):
    """A DataLoader reveals its classes batch by batch: totals grow as higher labels appear."""
    x, y = data
    order = torch.argsort(y)
    loader = torch.utils.data.DataLoader(_MapDataset(x[order], y[order]), batch_size=5)
    stats = RealStats.from_data(loader, tiny, progress=False)
    _, sums, counts = _fp64_reference(tiny, x, y, 4)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.sums, sums, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bank_in_memory_and_memory_mapped(tiny, data, tmp_path, dtype):
    x, y = data
    z, _, _ = _fp64_reference(tiny, x, y, 4)
    mem = RealStats.from_data(x, tiny, labels=y, bank=True, bank_dtype=dtype, batch_size=16, progress=False)
    path = tmp_path / "bank.bin"
    mapped = RealStats.from_data(x, tiny, labels=y, bank_path=path, bank_dtype=dtype, batch_size=16,
                                 progress=False)
    for s in (mem, mapped):
        assert s.bank_features.dtype == dtype and s.bank_features.shape == (53, 6)
        assert torch.equal(s.bank_labels, y)
        torch.testing.assert_close(s.bank_features.double(), z.to(dtype).double())
    assert os.path.getsize(path) == 53 * 6 * torch.empty(0, dtype=dtype).element_size()
    before = path.read_bytes()
    mapped.bank_features.mul_(2)  # copy-on-write map: the file is never altered
    assert path.read_bytes() == before


def test_from_features(data):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    s = RealStats.from_features(z, y, chunk_size=7)
    assert s.bank_features is z and torch.equal(s.bank_labels, y)
    sums = torch.zeros(3, 5, dtype=torch.float64).index_add_(0, y, z.double())
    torch.testing.assert_close(s.sums, sums, rtol=1e-6, atol=1e-6)  # fp32 per chunk, fp64 totals
    assert RealStats.from_features(z, y, num_classes=5, bank=False).counts.tolist()[3:] == [0, 0]
    with pytest.raises(ValueError, match="labels"):
        RealStats.from_features(z, y[:-1])
    with pytest.raises(ValueError, match="num_classes"):
        RealStats.from_features(z, y, num_classes=2)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RealStats.from_features(bad, y)
    with pytest.raises(ValueError, match="features"):
        RealStats.from_features(z.long(), y)


def test_save_load_round_trip_and_memory_mapped_bank(tiny, data, tmp_path):
    x, y = data
    s = RealStats.from_data(x, tiny, labels=y, bank=True, bank_dtype=torch.bfloat16, second_moment=True,
                            progress=False)
    path = tmp_path / "stats.pt"
    s.save(path)
    t = RealStats.load(path)
    assert torch.equal(t.counts, s.counts) and torch.equal(t.sums, s.sums) and torch.equal(t.sq_sums, s.sq_sums)
    assert torch.equal(t.bank_features, s.bank_features) and t.bank_features.dtype == torch.bfloat16
    assert torch.equal(t.bank_labels, s.bank_labels) and t.encoder_name == s.encoder_name
    s.save(path, include_bank=False)
    assert not RealStats.load(path).has_bank
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # atomic write cleaned up


def test_corrupt_or_foreign_files_raise_clear_errors(tmp_path):
    z = torch.randn(20, 4)
    y = torch.arange(20) % 2
    path = tmp_path / "stats.pt"
    RealStats.from_features(z, y).save(path)
    raw = bytearray(path.read_bytes())

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CorruptFileError, match="truncated.pt"):
        RealStats.load(truncated)

    # alter one byte of tensor data (keep the zip structure readable)
    altered = tmp_path / "altered.pt"
    needle = z.numpy().tobytes()[:16]
    pos = bytes(raw).find(needle)
    assert pos > 0
    raw2 = bytearray(raw)
    raw2[pos + 3] ^= 0x40
    altered.write_bytes(bytes(raw2))
    with pytest.raises(CorruptFileError, match="corrupt"):
        RealStats.load(altered)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CorruptFileError):
        RealStats.load(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CorruptFileError, match="not a fastdd file"):
        RealStats.load(foreign)
    with pytest.raises(FileNotFoundError):
        RealStats.load(tmp_path / "missing.pt")


def test_from_data_rejects_bad_encoder_output(data):
    x, y = data

    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        RealStats.from_data(x, encoders.wrap(Nan()), labels=y, progress=False)
    with pytest.raises(ValueError, match="bank_dtype"):
        RealStats.from_data(x, encoders.wrap(Nan()), labels=y, bank=True, bank_dtype=torch.int8, progress=False)


def test_fp16_bank_overflow_is_an_error_not_inf(data):
    x, y = data

    class Big(nn.Module):  # finite features beyond fp16's 65504
        def forward(self, x):
            return x.mean(dim=(2, 3)) * 1e5 + 1e5

    with pytest.raises(ValueError, match="bank_dtype=torch.float32"):
        RealStats.from_data(x, encoders.wrap(Big()), labels=y, bank=True, progress=False)
    s = RealStats.from_data(x, encoders.wrap(Big()), labels=y, bank=True, bank_dtype=torch.float32, progress=False)
    assert bool(torch.isfinite(s.bank_features).all())


def test_from_features_bad_options_name_the_argument():
    z, y = torch.randn(6, 4), torch.arange(6) % 3
    for kwargs, name in [({"chunk_size": 0}, "chunk_size"), ({"num_classes": "3"}, "num_classes"),
                         ({"num_classes": 3.0}, "num_classes")]:
        with pytest.raises(ValueError, match=name):
            RealStats.from_features(z, y, **kwargs)


def test_constructor_refuses_nan_sums_and_bank_labels_out_of_range():
    counts, sums = torch.tensor([2, 3]), torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be finite"):
        RealStats(counts, sums.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=r"bank_labels must lie in \[0, C=2\)"):
        RealStats(counts, sums, bank_features=torch.zeros(5, 4), bank_labels=torch.tensor([0, 1, 1, 2, 0]))
    assert RealStats(counts, sums, bank_features=torch.zeros(5, 4), bank_labels=torch.tensor([0, 1, 1, 1, 0])).has_bank


def test_load_of_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        RealStats.load(tmp_path)


def test_string_labels_are_a_clear_error(tiny, data):
    x, _ = data
    with pytest.raises(TypeError, match="strings such as 'cat'.*map the class names to indices"):
        RealStats.from_data(x[:4], tiny, labels=["cat", "dog", "cat", "dog"], progress=False)


@pytest.mark.parametrize("case", ["exact", "shorter", "longer", "unsized"])
def test_bank_rows_whatever_the_stream_length_says(tiny, data, case):
    """The bank is preallocated from the source's length: a stream shorter than it (drop_last) or
    longer (a sampler drawing more rows than the dataset holds), or without one, still gives every row
    in stream order."""
    from fastdd.stats import StatsAccumulator

    x, y = data
    order = {"exact": torch.arange(53), "shorter": torch.arange(48),
             "longer": torch.cat([torch.arange(53), torch.arange(20)]), "unsized": torch.arange(53)}[case]
    acc = StatsAccumulator(4, bank=True, bank_dtype=torch.float32, rows=None if case == "unsized" else 53)
    for start in range(0, order.shape[0], 8):
        idx = order[start:start + 8]
        acc.encode_and_add(tiny, x[idx], y[idx], "cpu")
    acc.close()
    stats = acc.result()
    with torch.no_grad():
        want = tiny(x[order])
    assert stats.bank_features.shape == (order.shape[0], 6) and torch.equal(stats.bank_labels, y[order])
    torch.testing.assert_close(stats.bank_features, want)
    assert torch.equal(stats.counts, torch.bincount(y[order], minlength=4))


def test_from_data_preallocates_the_bank_from_the_source_length(tiny, data, monkeypatch):
    from fastdd import stats as fstats

    sizes = []
    real = fstats._Rows

    class Spy(real):
        def __init__(self, capacity, dtype):
            sizes.append(capacity)
            super().__init__(capacity, dtype)

    monkeypatch.setattr(fstats, "_Rows", Spy)
    x, y = data
    loader = torch.utils.data.DataLoader(_MapDataset(x, y), batch_size=10, drop_last=True)
    s = RealStats.from_data(loader, tiny, bank=True, progress=False)
    assert sizes == [53, 53] and s.bank_features.shape == (50, 6) and torch.equal(s.bank_labels, y[:50])
