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
