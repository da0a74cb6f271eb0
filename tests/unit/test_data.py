import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from splitfed.learning import data


def test_digits_load_normalised_with_shapes():
    train, test = data.load("digits", train=True), data.load("digits", train=False)
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert abs(train.images[:].mean().item()) < 0.2 and train.labels.dtype == torch.int64


def test_images_are_kept_as_pixels_and_normalised_as_they_are_taken():
    """A quarter of the memory of float32, and the same bits as normalising the whole set."""
    train = data.load("fashion-mnist", train=True, limit=1000)
    assert train.images.raw.dtype == torch.uint8
    whole = train.images.raw.to(torch.float32).sub_(train.images.offset).div_(train.images.divisor)
    picked = torch.tensor([7, 3, 999, 0])
    assert train.images[picked].dtype == torch.float32
    assert torch.equal(train.images[picked], whole[picked]) and torch.equal(train.images[10:20], whole[10:20])


def test_fashion_mnist_from_the_debian_package_is_the_full_set():
    train = data.load("fashion-mnist", train=True)
    test = data.load("fashion-mnist", train=False, limit=100)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 100
    assert set(train.labels.unique().tolist()) == set(range(10))


def test_missing_mnist_says_where_it_looked(tmp_path):
    try:
        data.load("mnist", train=True, data_dir=tmp_path)
    except data.DataError as exc:
        assert str(tmp_path) in str(exc)
    else:
        raise AssertionError("expected DataError")


def test_batch_order_is_a_seeded_permutation():
    a = data.batch_order(10, 4, torch.Generator().manual_seed(3))
    b = data.batch_order(10, 4, torch.Generator().manual_seed(3))
    assert [len(x) for x in a] == [4, 4, 2] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))


def test_partitions_cover_as_the_reference_and_dirichlet():
    labels = data.load("digits", train=True).labels
    parts = data.partition(labels, "classes:0-3,4-6,7-9", 3, seed=0)
    assert [sorted(labels[p].unique().tolist()) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for spec in ("iid", "dirichlet:0.5", "shards:2"):
        parts = data.partition(labels, spec, 3, seed=0)
        assert sorted(torch.cat(parts).tolist()) == list(range(len(labels))), spec


def test_mnist_loads_from_idx_files_in_data_dir(tmp_path):
    """MNIST has the same IDX layout as Fashion-MNIST; any folder holding the files works."""
    import shutil

    for path in data.FASHION_MNIST_SYSTEM_DIR.glob("t10k-*"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(data.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz", tmp_path)
    shutil.copy(data.FASHION_MNIST_SYSTEM_DIR / "train-labels-idx1-ubyte.gz", tmp_path)
    test = data.load("mnist", train=False, data_dir=tmp_path, limit=50)
    assert test.images.shape == (50, 1, 28, 28) and test.labels.max() <= 9


# -- CIFAR-10: the python batches of cifar-10-python.tar.gz -------------------------------------


def _py2_str(value: bytes) -> bytes:
    """A Python 2 str as cPickle writes it (SHORT_BINSTRING or BINSTRING)."""
    return (b"U" + bytes([len(value)]) if len(value) < 256 else b"T" + struct.pack("<I", len(value))) + value


def _py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)


def cifar_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A batch file as the official archive holds it: Python 2's cPickle, protocol 2, of
    {'data': uint8 ndarray (N, 3072), 'labels': [int], 'batch_label': str, 'filenames': [str]}."""
    n = len(pixels)
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R" + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _py2_int(0) + b"tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
             + b"(" + _py2_int(1) + _py2_int(n) + _py2_int(3072) + b"\x86" + dtype + b"\x89" + _py2_str(pixels.tobytes()) + b"tb")
    return (b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
            + _py2_str(b"batch_label") + _py2_str(b"training batch") + _py2_str(b"filenames") + b"](" + b"".join(_py2_str(b"img_%d.png" % i) for i in range(n)) + b"e" + b"u.")


def fake_cifar10(folder: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in (*data.CIFAR10_TRAIN, *data.CIFAR10_TEST):
        written[name] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(cifar_batch(written[name], [int(v) for v in rng.integers(0, 10, per_batch)]))
    return written


def test_cifar10_loads_from_the_python_batches(tmp_path):
    written = fake_cifar10(tmp_path / "cifar-10-batches-py")
    train = data.load("cifar10", train=True, data_dir=tmp_path)
    test = data.load("cifar10", train=False, data_dir=tmp_path / "cifar-10-batches-py", limit=2)
    assert train.images.shape == (15, 3, 32, 32) and len(test) == 2 and train.labels.dtype == torch.int64
    # Rows are the R, G then B planes: (3072,) -> (3, 32, 32).
    assert torch.equal(train.images.raw[3], torch.from_numpy(written["data_batch_2"][0]).reshape(3, 32, 32))
    meta = data.info("cifar10")
    expected = (torch.from_numpy(written["test_batch"][1]).float().reshape(3, 32, 32) - meta.mean * 255) / (meta.std * 255)
    assert torch.allclose(test.images[1], expected)


def test_a_cifar10_batch_is_never_unpickled_freely(tmp_path):
    written = tmp_path / "written-by-the-pickle"
    fake_cifar10(tmp_path / "cifar")
    # builtins.open(PATH, 'w'): a pickle may call any importable function as it loads.
    (tmp_path / "cifar" / "test_batch").write_bytes(b"\x80\x02cbuiltins\nopen\n" + _py2_str(str(written).encode()) + _py2_str(b"w") + b"\x86R.")
    with pytest.raises(data.DataError, match="global builtins.open is not allowed in a CIFAR-10 batch"):
        data.load("cifar10", train=False, data_dir=tmp_path / "cifar")
    assert not written.exists()


def test_missing_cifar10_names_the_files_and_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match=r"data_batch_1, .*test_batch, from cifar-10-python.tar.gz\) not found; looked in " + re.escape(str(tmp_path))):
        data.load("cifar10", train=True, data_dir=tmp_path)
    with pytest.raises(data.DataError, match="no --data-dir given"):
        data.load("cifar10", train=True)
