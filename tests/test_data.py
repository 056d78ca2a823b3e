import gzip
import re
import shutil
import struct

import numpy as np
import pytest
import torch

import fastdd.data as data
from fastdd.data import DataError


def _check_split(split, n, size, classes=10):
    images, labels = split  # a plain (images, labels) pair
    assert images.shape == (n, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.max()) > 0.9  # real content, not a blank tensor
    assert len(split.classes) == classes
    return torch.bincount(labels, minlength=classes)


def test_fashion_mnist_splits(fmnist32):
    train, test = fmnist32
    assert (_check_split(train, 60_000, 32) == 6000).all()
    assert (_check_split(test, 10_000, 32) == 1000).all()
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    # grey images expanded to three identical channels
    assert torch.equal(train.images[:5, 0], train.images[:5, 2])


def test_fashion_mnist_native_size_is_exact():
    train, _ = data.load("fashion-mnist", size=28)
    with gzip.open(f"{data.FASHION_MNIST_ROOT}/train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    first = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    assert torch.allclose(train.images[0, 0], torch.from_numpy(first / 255.0).float())


def test_mnist_5k_and_digits():
    train, test = data.load("mnist-5k", size=16)
    counts = _check_split(train, 4000, 16) + _check_split(test, 1000, 16)
    assert counts.sum() == 5000 and (counts > 300).all()
    again, _ = data.load("mnist-5k", size=16)
    assert torch.equal(again.labels, train.labels)  # the fixed-seed split is stable
    train, test = data.load("digits", size=8)
    assert len(train[0]) + len(test[0]) == 1797
    _check_split(train, len(train[0]), 8)


def _copy_fmnist(tmp_path):
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{data.FASHION_MNIST_ROOT}/{f}", tmp_path / f)
    return tmp_path


def _rewrite(path, mutate):
    with gzip.open(path) as f:
        raw = bytearray(f.read())
    raw = mutate(raw)
    with gzip.open(path, "wb") as f:
        f.write(bytes(raw))


@pytest.mark.parametrize("file, mutate, message", [
    ("t10k-images-idx3-ubyte.gz", lambda r: struct.pack(">I", 1234) + r[4:], "magic number 1234"),
    ("t10k-images-idx3-ubyte.gz", lambda r: r[:-100], "bytes"),
    ("t10k-labels-idx1-ubyte.gz", lambda r: r[:8] + bytes([12]) + r[9:], "labels outside"),
    ("t10k-labels-idx1-ubyte.gz", lambda r: r[:4] + struct.pack(">I", 9999) + r[8:], "bytes"),
])
def test_corrupt_fashion_mnist_is_a_clear_error(tmp_path, file, mutate, message):
    root = _copy_fmnist(tmp_path)
    _rewrite(root / file, mutate)
    with pytest.raises(DataError, match=message):
        data.load("fashion-mnist", size=8, root=root)


def test_not_gzip_and_missing_files(tmp_path):
    root = _copy_fmnist(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        data.load("fashion-mnist", size=8, root=root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", size=8, root=root)


def test_corrupt_mnist_5k(tmp_path):
    rows = np.zeros((5000, 785))
    rows[:, 784] = np.arange(5000) % 10
    rows[7, 3] = 300  # a pixel out of range
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, delimiter=",", fmt="%d")
    with pytest.raises(DataError, match="0..255"):
        data.load("mnist-5k", root=tmp_path)
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows[:100], delimiter=",", fmt="%d")
    with pytest.raises(DataError, match="shape"):
        data.load("mnist-5k", root=tmp_path)


def test_bad_arguments():
    with pytest.raises(DataError, match="name='cifar'"):
        data.load("cifar")
    with pytest.raises(DataError, match="size"):
        data.load("digits", size=3)


def test_load_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    split = data.load_folder(tmp_path, size=16)
    assert split.classes == ["cat", "dog"]
    assert split.images.shape == (5, 3, 16, 16) and split.labels.tolist() == [0, 0, 0, 1, 1]
    (tmp_path / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be decoded"):
        data.load_folder(tmp_path)
    (tmp_path / "cat" / "0.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        data.load_folder(tmp_path)


def _noise_folder(root, counts=(("cat", 3), ("dog", 2))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in counts:
        (root / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_keeps_the_errors(tmp_path, workers):
    for stream in (False, True):
        with pytest.raises(DataError, match="is not a folder"):
            data.load_folder(tmp_path / "nowhere", stream=stream)
        with pytest.raises(DataError, match="has no class sub-folders"):
            data.load_folder(tmp_path, stream=stream)
    root = _noise_folder(tmp_path)
    with pytest.raises(DataError, match="size must be a positive int"):
        data.load_folder(root, size=0, stream=True)
    dataset = data.load_folder(root, size=8, stream=True)
    assert isinstance(dataset, data.FolderDataset) and isinstance(dataset, torch.utils.data.Dataset)
    assert dataset.classes == ["cat", "dog"] and dataset.targets == [0, 0, 0, 1, 1]
    bad = root / "dog" / "1.png"
    bad.write_bytes(b"not an image")
    listed = data.load_folder(root, size=8, stream=True)  # listed, not decoded: the error comes when read
    image, label = listed[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0
    with pytest.raises(DataError, match=re.escape(f"image {bad} cannot be decoded")):
        listed[4]
    with pytest.raises(DataError, match=re.escape(f"image {bad} cannot be decoded")):
        list(data.iterate_batches(listed, batch_size=2, workers=workers))
    with pytest.raises(DataError, match=re.escape(f"image {bad} cannot be decoded")):
        listed.to_split(workers=workers)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        data.load_folder(root, stream=True)


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_iterate_batches_all_sources_agree():
    images, labels = torch.rand(10, 3, 8, 8), torch.arange(10) % 3
    from_tensor = list(data.iterate_batches(images, labels, batch_size=4))
    from_dataset = list(data.iterate_batches(_PairDataset(images, labels), batch_size=4))
    loader = torch.utils.data.DataLoader(_PairDataset(images, labels), batch_size=4)
    from_loader = list(data.iterate_batches(loader))
    assert [len(b[1]) for b in from_tensor] == [4, 4, 2]
    for other in (from_dataset, from_loader):
        assert torch.equal(torch.cat([b[0] for b in other]), images)
        assert torch.equal(torch.cat([b[1] for b in other]), labels)
    grey = list(data.iterate_batches((images[:, :1] * 255).to(torch.uint8), labels))
    assert grey[0][0].shape == (10, 3, 8, 8) and grey[0][0].dtype == torch.float32


@pytest.mark.parametrize("images, labels, message", [
    (torch.rand(4, 3, 8, 8), None, "labels is required"),
    (torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long), r"labels must have shape \[4\]"),
    (torch.rand(4, 3, 8, 8), torch.zeros(4), "labels must be an integer tensor"),
    (torch.rand(4, 3, 8, 8), -torch.ones(4, dtype=torch.long), ">= 0"),
    (torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long), "shape"),
    (torch.rand(4, 3, 8, 8) * 255, torch.zeros(4, dtype=torch.long), r"\[0, 1\]"),
    (torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), "NaN"),
    (torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), "empty"),
    (object(), None, "must be a tensor"),
])
def test_iterate_batches_rejects_bad_input(images, labels, message):
    with pytest.raises(DataError, match=message):
        list(data.iterate_batches(images, labels))


def test_num_classes_of():
    assert data.num_classes_of(torch.tensor([0, 4, 2])) == 5
    with pytest.raises(DataError):
        data.num_classes_of(torch.tensor([], dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_iterate_batches_gives_float32(dtype):
    images = torch.rand(5, 3, 4, 4).to(dtype)
    (batch, _), = data.iterate_batches(images, torch.arange(5) % 2)
    assert batch.dtype == torch.float32 and torch.equal(batch, images.float())


@pytest.mark.parametrize("label", ["cat", "3", 1.0, True, None])
def test_dataset_labels_must_be_integers(label):
    from fastdd.data import iterate_batches

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(3, 4, 4), label

    with pytest.raises(DataError, match=r"dataset\[0\]: the label must be an integer class index"):
        next(iter(iterate_batches(Items(), batch_size=2)))


def test_dataset_integer_labels_of_every_kind_pass():
    import numpy as np

    from fastdd.data import iterate_batches

    labels = [1, np.int64(2), torch.tensor(0)]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(3, 4, 4), labels[i]

    _, ys = next(iter(iterate_batches(Items(), batch_size=3)))
    assert ys.tolist() == [1, 2, 0] and ys.dtype == torch.int64


class _Named(_PairDataset):
    """A map-style dataset with class names and one item (``bad``) whose label is a string."""
    classes = ["a", "b", "c"]

    def __init__(self, images, labels, bad=None):
        super().__init__(images, labels)
        self.bad = bad

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image, ("cat" if i == self.bad else label)


def test_workers_give_the_same_batches_in_the_same_order():
    images, labels = torch.rand(11, 3, 8, 8), torch.arange(11) % 3
    dataset = _Named(images, labels)
    plain = list(data.iterate_batches(dataset, batch_size=4))
    assert [len(b[1]) for b in plain] == [4, 4, 3]
    loader = data.batch_loader(dataset, batch_size=4, workers=2)
    for batches in (list(data.iterate_batches(dataset, batch_size=4, workers=2)), list(data.iterate_batches(loader))):
        assert len(batches) == len(plain)
        for (x, y), (x0, y0) in zip(batches, plain):
            assert torch.equal(x, x0) and torch.equal(y, y0) and x.dtype == x0.dtype and y.dtype == y0.dtype
    # the loader's dataset reads the items as they are and answers for the dataset's attributes
    assert loader.dataset.classes == ["a", "b", "c"] and len(loader.dataset) == 11
    assert torch.equal(loader.dataset[3][0], images[3])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_item_read_by_workers_has_the_same_message(workers):
    dataset = _Named(torch.rand(9, 3, 4, 4), torch.arange(9) % 3, bad=6)
    with pytest.raises(DataError) as plain:
        list(data.iterate_batches(dataset, batch_size=4))
    with pytest.raises(DataError) as read:
        list(data.iterate_batches(data.batch_loader(dataset, batch_size=4, workers=workers)))
    assert str(read.value) == str(plain.value) and str(plain.value).startswith("dataset[6]: the label must be")
    shapes = [torch.rand(3, 4, 4), torch.rand(3, 5, 5)]

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return shapes[i], 0

    with pytest.raises(DataError, match=r"dataset items 0\.\.1 have different image shapes"):
        list(data.iterate_batches(Mixed(), batch_size=2, workers=workers))


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_workers_must_be_a_non_negative_int(workers):
    dataset = _PairDataset(torch.rand(2, 3, 4, 4), torch.arange(2))
    with pytest.raises(DataError, match="workers must be a non-negative int"):
        list(data.iterate_batches(dataset, workers=workers))
    with pytest.raises(DataError, match="workers must be a non-negative int"):
        data.batch_loader(dataset, workers=workers)


def test_batch_loader_needs_a_map_style_dataset():
    loader = torch.utils.data.DataLoader(_PairDataset(torch.rand(2, 3, 4, 4), torch.arange(2)))
    for source in (loader, iter([1, 2]), 3):
        with pytest.raises(DataError, match="dataset must be a map-style Dataset"):
            data.batch_loader(source)
    with pytest.raises(DataError, match="batch_size must be a positive int"):
        data.batch_loader(loader.dataset, batch_size=0)


def test_folder_dataset_pickles_and_is_made_on_first_use(tmp_path):
    import pickle
    import subprocess
    import sys

    dataset = data.load_folder(_noise_folder(tmp_path), size=8, stream=True)
    again = pickle.loads(pickle.dumps(dataset))  # as spawned DataLoader workers receive it
    assert type(again) is data.FolderDataset and again.samples == dataset.samples
    assert torch.equal(again[2][0], dataset[2][0])
    probe = "import sys, fastdd.data; assert 'torchvision' not in sys.modules; fastdd.data.FolderDataset; " \
            "assert 'torchvision' in sys.modules"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
