"""A party's own data: image folders, CSV files and npz archives written here, read back by
`load_local`, and checked against numpy computing the same normalisation independently."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitfed.errors import DataError
from splitfed.learning.data import Images
from splitfed.learning.local_data import LocalOptions, load_local


def write_image(path: Path, pixels: np.ndarray) -> None:
    """(H, W) grey or (H, W, 3) colour uint8 pixels as a real image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def load_error(kind: str, folder: Path, train: bool = True, **options) -> str:
    with pytest.raises(DataError) as caught:
        load_local(kind, folder, train, LocalOptions(**options))
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- imagefolder -----------------------------------------------------------------------------------


@pytest.fixture
def grey_folder(tmp_path):
    """train/: 2 'ant' and 3 'bee' 4x5 grey images (written out of order); test/: 1 'bee'."""
    rng = np.random.default_rng(1)
    pixels = {}
    for part, name in [("train", "bee/2.png"), ("train", "ant/b.PNG"), ("train", "bee/1.jpeg"), ("train", "ant/a.png"),
                       ("train", "bee/3.png"), ("test", "bee/x.png")]:
        image = rng.integers(0, 256, (4, 5), dtype=np.uint8)
        if name.endswith(".jpeg"):
            image = np.full((4, 5), 77, dtype=np.uint8)  # flat: JPEG keeps it exactly
        pixels[(part, name)] = image
        write_image(tmp_path / part / name, image)
    write_text(tmp_path / "train" / "bee" / "notes.txt", "not an image, skipped")
    return tmp_path, pixels


def test_imagefolder_orders_by_class_then_file_name_and_keeps_pixels(grey_folder):
    folder, pixels = grey_folder
    loaded = load_local("imagefolder", folder, train=True)
    assert loaded.classes == ("ant", "bee") and loaded.shape == (1, 4, 5)
    assert isinstance(loaded.samples.images, Images) and loaded.samples.images.raw.dtype == torch.uint8
    assert loaded.samples.labels.tolist() == [0, 0, 1, 1, 1] and loaded.samples.labels.dtype == torch.int64
    order = ["ant/a.png", "ant/b.PNG", "bee/1.jpeg", "bee/2.png", "bee/3.png"]
    expected = np.stack([pixels[("train", name)] for name in order])[:, None]
    assert np.array_equal(loaded.samples.images.raw.numpy(), expected)


def test_imagefolder_normalises_both_parts_with_the_train_statistics(grey_folder):
    folder, _ = grey_folder
    train = load_local("imagefolder", folder, train=True)
    test = load_local("imagefolder", folder, train=False)
    train_pixels = train.samples.images.raw.numpy().astype(np.float64)
    mean, std = train_pixels.mean(axis=(0, 2, 3)), train_pixels.std(axis=(0, 2, 3))
    for part in (train, test):
        images = part.samples.images
        assert images.offset.shape == (1, 1, 1) and images.divisor.shape == (1, 1, 1)
        expected = (images.raw.numpy().astype(np.float64) - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(images[:].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert images[0].shape == (1, 4, 5)
    assert test.samples.labels.tolist() == [1] and test.classes == ("ant", "bee")


def test_imagefolder_colour_makes_every_image_rgb_with_per_channel_statistics(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    colour = np.stack([np.full((3, 4), 10), np.full((3, 4), 100), np.arange(12).reshape(3, 4) * 5], axis=-1).astype(np.uint8)
    write_image(tmp_path / "train" / "a" / "grey.png", grey)
    write_image(tmp_path / "test" / "a" / "colour.png", colour)
    loaded = load_local("imagefolder", tmp_path, train=True)
    assert loaded.shape == (3, 3, 4)
    raw = loaded.samples.images.raw.numpy()
    assert all(np.array_equal(raw[0, channel], grey) for channel in range(3))
    test = load_local("imagefolder", tmp_path, train=False).samples.images
    assert np.array_equal(test.raw.numpy()[0], colour.transpose(2, 0, 1))
    mean, std = grey.mean(), grey.std()
    np.testing.assert_allclose(test.offset.flatten().numpy(), [mean] * 3, rtol=1e-6)
    np.testing.assert_allclose(test[:].numpy(), (colour.transpose(2, 0, 1)[None] - mean) / std, rtol=1e-5, atol=1e-5)


def test_imagefolder_resizes_with_pillow_bilinear(tmp_path):
    big = np.random.default_rng(2).integers(0, 256, (8, 10), dtype=np.uint8)
    write_image(tmp_path / "train" / "a" / "big.png", big)
    write_image(tmp_path / "train" / "b" / "small.png", np.full((3, 3), 9, dtype=np.uint8))
    loaded = load_local("imagefolder", tmp_path, train=True, options=LocalOptions(image_size=(4, 6)))
    assert loaded.shape == (1, 4, 6) and loaded.samples.images.raw.shape == (2, 1, 4, 6)
    expected = np.asarray(Image.fromarray(big).resize((6, 4), Image.Resampling.BILINEAR))
    assert np.array_equal(loaded.samples.images.raw.numpy()[0, 0], expected)
    assert np.all(loaded.samples.images.raw.numpy()[1] == 9)


def test_imagefolder_explicit_classes_mean_and_std(grey_folder):
    folder, _ = grey_folder
    options = LocalOptions(classes=("bee", "wasp", "ant"), mean=(0.5,), std=(0.25,))
    loaded = load_local("imagefolder", folder, train=True, options=options)
    assert loaded.classes == ("bee", "wasp", "ant")
    assert loaded.samples.labels.tolist() == [0, 0, 0, 2, 2]  # bee first now
    images = loaded.samples.images
    np.testing.assert_allclose(images[:].numpy(), (images.raw.numpy() - 127.5) / 63.75, rtol=1e-6)


def test_imagefolder_errors_name_the_file_or_folder(tmp_path, grey_folder):
    folder, _ = grey_folder
    assert "train part is missing" in load_error("imagefolder", tmp_path / "train" / "ant")
    (folder / "test").rename(folder / "later")
    message = load_error("imagefolder", folder, train=False)
    assert str(folder / "test") in message and "test part is missing" in message
    (folder / "later").rename(folder / "test")
    assert "does not exist" in load_error("imagefolder", tmp_path / "nowhere")

    (folder / "test" / "moth").mkdir()
    message = load_error("imagefolder", folder, train=False)
    assert str(folder / "test" / "moth") in message and "outside the class list" in message
    (folder / "test" / "moth").rmdir()

    (folder / "train" / "cat").mkdir()
    message = load_error("imagefolder", folder)
    assert str(folder / "train" / "cat") in message and "empty class folder" in message
    (folder / "train" / "cat").rmdir()

    write_image(folder / "train" / "bee" / "4.png", np.zeros((6, 5), dtype=np.uint8))
    message = load_error("imagefolder", folder)
    assert "mixed image sizes" in message and "4.png is 6x5" in message and "a.png is 4x5" in message
    (folder / "train" / "bee" / "4.png").unlink()

    write_text(folder / "train" / "bee" / "4.png", "not a png")
    message = load_error("imagefolder", folder)
    assert str(folder / "train" / "bee" / "4.png") in message and "not a readable image" in message
    (folder / "train" / "bee" / "4.png").write_bytes((folder / "train" / "bee" / "3.png").read_bytes()[:60])  # truncated
    assert str(folder / "train" / "bee" / "4.png") in load_error("imagefolder", folder)
    (folder / "train" / "bee" / "4.png").unlink()

    assert "--mean gives 2 values but the data has 1 channel" in load_error("imagefolder", folder, mean=(0.1, 0.2))
    assert "--std must be positive" in load_error("imagefolder", folder, std=(0.0,))

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    assert "train part is empty" in load_error("imagefolder", empty)


# -- csv -------------------------------------------------------------------------------------------


TRAIN_CSV = "f1,label,const,f2\n1.5,10,3,-2\n2.5,2,3,0\n\n4,10,3,1e1\n-1,2,3,0.5\n"
TEST_CSV = "f1,label,const,f2\n0,2,3,1\n10,10,4,-1\n"


def csv_matrix(text: str) -> tuple[np.ndarray, list[str]]:
    """The features (label column dropped) and labels of a small CSV, independently of the reader."""
    rows = [line.split(",") for line in text.splitlines()[1:] if line]
    return np.array([[float(r[0]), float(r[2]), float(r[3])] for r in rows]), [r[1] for r in rows]


def test_csv_classes_sorted_numerically_and_features_normalised_with_train_statistics(tmp_path):
    write_text(tmp_path / "train.csv", TRAIN_CSV)
    write_text(tmp_path / "test.csv", TEST_CSV)
    train = load_local("csv", tmp_path, train=True)
    test = load_local("csv", tmp_path, train=False)
    assert train.classes == ("2", "10") and test.classes == ("2", "10") and train.shape == (3,)
    x_train, labels_train = csv_matrix(TRAIN_CSV)
    x_test, labels_test = csv_matrix(TEST_CSV)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # the constant column is centred, not divided by zero
    for part, x, labels in ((train, x_train, labels_train), (test, x_test, labels_test)):
        features = part.samples.images
        assert features.dtype == torch.float32 and features.shape == x.shape
        np.testing.assert_allclose(features.numpy(), (x - x_train.mean(axis=0)) / std, rtol=1e-6, atol=1e-6)
        assert part.samples.labels.tolist() == [("2", "10").index(label) for label in labels]


def test_csv_folders_of_files_are_concatenated_in_name_order(tmp_path):
    write_text(tmp_path / "train" / "b.csv", "y,a\ncat,2\n")
    write_text(tmp_path / "train" / "a.csv", "y,a\ndog,1\nant,3\n")
    write_text(tmp_path / "test" / "only.csv", "y,a\nant,4\n")
    options = LocalOptions(label_column="y", classes=("dog", "cat", "ant"), mean=(1.0,), std=(2.0,))
    train = load_local("csv", tmp_path, train=True, options=options)
    assert train.classes == ("dog", "cat", "ant") and train.samples.labels.tolist() == [0, 2, 1]
    assert train.samples.images.flatten().tolist() == [0.0, 1.0, 0.5]
    test = load_local("csv", tmp_path, train=False, options=options)
    assert test.samples.labels.tolist() == [2] and test.samples.images.flatten().tolist() == [1.5]


def test_csv_errors_name_the_file_line_and_column(tmp_path):
    assert "train part is missing" in load_error("csv", tmp_path)
    train = tmp_path / "train.csv"
    write_text(train, TRAIN_CSV)
    message = load_error("csv", tmp_path, train=False)
    assert str(tmp_path) in message and "test part is missing" in message

    write_text(train, "f1,label\n1,a\nx7,b\n")
    assert load_error("csv", tmp_path) == f"{train} line 3, column 'f1': 'x7' is not a finite number"
    write_text(train, "f1,label\n1,a\n,b\n")
    assert f"{train} line 3, column 'f1'" in load_error("csv", tmp_path)
    write_text(train, "f1,label\nnan,a\n")
    assert f"{train} line 2, column 'f1'" in load_error("csv", tmp_path)

    write_text(train, "f1,target\n1,a\n")
    message = load_error("csv", tmp_path)
    assert str(train) in message and "no label column 'label'" in message and "f1, target" in message

    write_text(train, "f1,label\n1,a\n2,b,3\n")
    assert load_error("csv", tmp_path) == f"{train} line 3: 3 cells but the header names 2 columns"

    write_text(train, "f1,label\n")
    message = load_error("csv", tmp_path)
    assert str(train) in message and "no data rows" in message
    write_text(train, "")
    assert str(train) in load_error("csv", tmp_path)

    write_text(train, "f1,label\n1,a\n2,b\n")
    write_text(tmp_path / "test.csv", "f1,label\n1,a\n1,c\n")
    message = load_error("csv", tmp_path, train=False)
    assert message.startswith(f"{tmp_path / 'test.csv'} line 3: label 'c' is outside the class list (a, b)")
    assert "line 2: label 'a'" in load_error("csv", tmp_path, classes=("b",))

    write_text(tmp_path / "test.csv", "f1,f2,label\n1,2,a\n")
    assert str(tmp_path / "test.csv") in load_error("csv", tmp_path, train=False)

    write_text(tmp_path / "train" / "more.csv", "f1,label\n1,a\n")
    assert "both train.csv and train/" in load_error("csv", tmp_path)


# -- npz -------------------------------------------------------------------------------------------


def test_npz_features_default_classes_and_train_statistics(tmp_path):
    rng = np.random.default_rng(3)
    x_train, x_test = rng.normal(5, 3, (20, 4)), rng.normal(5, 3, (6, 4))
    x_train[:, 2] = 7.0  # constant
    np.savez(tmp_path / "train.npz", x=x_train, y=np.arange(20) % 3)
    np.savez(tmp_path / "test.npz", x=x_test, y=np.array([0, 1, 2, 2, 1, 0]))
    train = load_local("npz", tmp_path, train=True)
    test = load_local("npz", tmp_path, train=False)
    assert train.classes == ("0", "1", "2") and train.shape == (4,) and test.samples.labels.tolist() == [0, 1, 2, 2, 1, 0]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[2] = 1.0
    for part, x in ((train, x_train), (test, x_test)):
        assert part.samples.images.dtype == torch.float32
        np.testing.assert_allclose(part.samples.images.numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)


def test_npz_uint8_images_stay_pixels_with_per_channel_statistics(tmp_path):
    rng = np.random.default_rng(4)
    x_train = rng.integers(0, 256, (5, 2, 3, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 2, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x_train, y=np.array([1, 0, 1, 1, 0], dtype=np.uint8), classes=np.array(["no", "yes"]))
    np.savez(tmp_path / "test.npz", x=x_test, y=np.array([1, 1]))
    test = load_local("npz", tmp_path, train=False)
    assert test.classes == ("no", "yes") and test.shape == (2, 3, 3) and test.samples.labels.dtype == torch.int64
    images = test.samples.images
    assert isinstance(images, Images) and np.array_equal(images.raw.numpy(), x_test)
    mean = x_train.astype(np.float64).mean(axis=(0, 2, 3))[:, None, None]
    std = x_train.astype(np.float64).std(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(images[:].numpy(), (x_test - mean) / std, rtol=1e-5, atol=1e-5)
    given = load_local("npz", tmp_path, train=True, options=LocalOptions(mean=(0.5, 0.0), std=(0.5, 1.0))).samples.images
    np.testing.assert_allclose(given.offset.flatten().numpy(), [127.5, 0.0])
    np.testing.assert_allclose(given.divisor.flatten().numpy(), [127.5, 255.0])


def test_npz_float_images_are_normalised_per_channel(tmp_path):
    x = np.random.default_rng(5).normal(0, 1, (4, 3, 2, 2)).astype(np.float32) * np.array([1, 10, 100], dtype=np.float32)[:, None, None]
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 0, 1]))
    loaded = load_local("npz", tmp_path, train=True)
    assert loaded.shape == (3, 2, 2) and loaded.samples.images.shape == (4, 3, 2, 2)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axis=(0, 2, 3))[:, None, None]) / x64.std(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(loaded.samples.images.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_npz_errors_name_the_file(tmp_path):
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    assert str(train) in load_error("npz", tmp_path)
    np.savez(train, x=np.zeros((3, 2)), labels=np.zeros(3, dtype=int))
    assert load_error("npz", tmp_path) == f"{train}: no array 'y'; it holds x, labels"
    np.savez(train, y=np.zeros(3, dtype=int))
    assert load_error("npz", tmp_path) == f"{train}: no array 'x'; it holds y"
    np.savez(train, x=np.zeros((3, 2)), y=np.zeros(2, dtype=int))
    assert load_error("npz", tmp_path) == f"{train}: x holds 3 samples but y holds 2 labels"
    np.savez(train, x=np.zeros((0, 2)), y=np.zeros(0, dtype=int))
    assert "train part is empty" in load_error("npz", tmp_path)
    np.savez(train, x=np.zeros((3, 2)), y=np.array([0, 1, 1]))
    assert f"{test}: the test part is missing" in load_error("npz", tmp_path, train=False)
    np.savez(test, x=np.zeros((2, 2)), y=np.array([1, 2]))
    assert load_error("npz", tmp_path, train=False).startswith(f"{test}: y[1] = 2 is outside the class list")
    np.savez(test, x=np.zeros((2, 3)), y=np.array([1, 0]))
    assert str(test) in load_error("npz", tmp_path, train=False)
    np.savez(train, x=np.array([{"a": 1}] * 3, dtype=object), y=np.array([0, 1, 1]))  # would need unpickling
    assert load_error("npz", tmp_path).startswith(f"{train}: array 'x' cannot be read")
    train.write_bytes(b"not a zip")
    assert str(train) in load_error("npz", tmp_path)


def test_unknown_format_is_a_data_error(tmp_path):
    assert "choose one of imagefolder, csv, npz" in load_error("parquet", tmp_path)
