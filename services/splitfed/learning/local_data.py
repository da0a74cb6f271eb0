"""A party's own data, read from its --data-dir FOLDER (`--dataset imagefolder|csv|npz`).

FOLDER holds a train part and a test part:

- imagefolder: FOLDER/train/<class>/*.png|*.jpg|*.jpeg and FOLDER/test/<class>/... (suffixes in any
  case; other files and hidden entries are skipped), read with Pillow. Grey ("L") images give one
  channel; any other mode is converted to RGB, and if any image of the data set (train or test) is not
  grey, every image is converted to RGB, so both parts share one channel count. Without an image size
  every image of both parts must have one size. Both parts are checked whichever is loaded (image
  headers only for the other part). Samples are ordered by class, then by file name.
- csv: FOLDER/train.csv and FOLDER/test.csv, or instead FOLDER/train/ and FOLDER/test/ folders of
  *.csv files, concatenated in name order and all with the same header. A header row is required; the
  label column holds class names ("0" and "1" are names too) and every other column is a number.
- npz: FOLDER/train.npz and FOLDER/test.npz holding arrays `x` (N, ...) and `y` (N,) integer labels,
  and optionally `classes` (strings, in label order). A uint8 x of shape (N, C, H, W) stays pixels; any
  other numeric x of shape (N, F) or (N, C, H, W) becomes float32 features.

Classes (label i is classes[i]): the given list, else the sorted class folder names of train/
(imagefolder), the sorted label values of train (csv; numeric-looking names in numeric order, so
"2" < "10"), the train `classes` array or "0".."largest train label" (npz).

Normalisation is per channel (images) or per column (features) with the given mean and std, else with
those of the train part, for both parts; a std of 0 (a constant column) divides by 1. Pixels stay uint8
in `data.Images`, and a given mean and std for pixels are in 0..1 units, as torchvision's are.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitfed.errors import DataError
from splitfed.learning.data import Images, Samples

_FORMATS = ("imagefolder", "csv", "npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_SCALE = 255.0  # pixels are 0..255; a given mean and std for them are 0..1


@dataclass(frozen=True)
class LocalOptions:
    label_column: str = "label"  # csv
    classes: tuple[str, ...] | None = None  # the class list, in label order; None: found in the train part
    image_size: tuple[int, int] | None = None  # imagefolder: resize every image to (H, W), bilinear; None: one size for all
    mean: tuple[float, ...] | None = None  # per channel (images) or per column (features); None: the train part's
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LocalData:
    samples: Samples  # images: data.Images (uint8) or a float32 tensor; labels int64 (N,)
    classes: tuple[str, ...]  # label i is classes[i]
    shape: tuple[int, ...]  # one sample's input: (C, H, W) or (F,)


def load_local(kind: str, folder: Path, train: bool, options: LocalOptions = LocalOptions()) -> LocalData:
    """The train or test part of the party's data in `folder`, normalised with the train part's statistics."""
    folder = Path(folder)
    if kind not in _FORMATS:
        raise DataError(f"unknown local data format {kind!r}; choose one of {', '.join(_FORMATS)}")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    if options.classes is not None:
        _check_class_list(options.classes, "--classes")
    if options.image_size is not None and (len(options.image_size) != 2 or min(options.image_size) < 1):
        raise DataError(f"--image-size must be two positive numbers, height and width, not {options.image_size}")
    reader = {"imagefolder": _imagefolder, "csv": _csv, "npz": _npz}[kind]
    return reader(folder, train, options)


def _check_class_list(classes: Sequence[str], source: str) -> None:
    if not classes:
        raise DataError(f"{source} is empty")
    repeated = sorted({name for name in classes if list(classes).count(name) > 1})
    if repeated:
        raise DataError(f"{source} names {', '.join(repeated)} more than once")


# -- normalisation ---------------------------------------------------------------------------------


def _statistics(
    options: LocalOptions, count: int, unit: str, scale: float, measure: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float64 (count,), in the data's own units: the given ones (times `scale`), the
    rest measured on the train part by `measure` (called only if needed)."""
    given = {}
    for name, values in (("mean", options.mean), ("std", options.std)):
        if values is None:
            continue
        if len(values) != count:
            raise DataError(f"--{name} gives {len(values)} values but the data has {count} {unit}{'s' if count != 1 else ''}")
        given[name] = np.asarray(values, dtype=np.float64) * scale
    if "std" in given and not np.all(given["std"] > 0):
        raise DataError(f"--std must be positive, not {', '.join(map(str, options.std or ()))}")
    if len(given) == 2:
        return given["mean"], given["std"]
    mean, std = measure()
    # A constant column carries no information: left centred, not divided by zero.
    return given.get("mean", mean), given.get("std", np.where(std == 0, 1.0, std))


def _pixel_statistics(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 (N, C, H, W) pixels, exactly, from each channel's histogram
    (no float copy of the whole set)."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(raw.shape[1]):
        counts = np.bincount(raw[:, channel].ravel(), minlength=256).astype(np.float64)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means), np.array(stds)


def _feature_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of (N, F) features, or per channel of (N, C, H, W)."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    return x.mean(axis=axes, dtype=np.float64), x.std(axis=axes, dtype=np.float64)


def _pixels(raw: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Samples:
    per_channel = (-1, 1, 1)  # broadcasts over (N, C, H, W) and (C, H, W) alike
    offset = torch.from_numpy(mean.astype(np.float32)).reshape(per_channel)
    divisor = torch.from_numpy(std.astype(np.float32)).reshape(per_channel)
    return Samples(Images(torch.from_numpy(np.ascontiguousarray(raw)), offset, divisor), torch.from_numpy(labels.astype(np.int64)))


def _features(x: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Samples:
    along = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    normalised = ((x - mean.reshape(along)) / std.reshape(along)).astype(np.float32)
    return Samples(torch.from_numpy(normalised), torch.from_numpy(labels.astype(np.int64)))


# -- imagefolder -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageLayout:
    channels: int
    size: tuple[int, int]  # (H, W) of every image once read
    example: Path  # an image of that size, named when another differs
    resize: bool


def _imagefolder(folder: Path, train: bool, options: LocalOptions) -> LocalData:
    train_dir = _part_folder(folder, "train")
    classes = options.classes or _class_folders(train_dir)
    train_files = _image_files(train_dir, classes)
    test_dir = folder / "test" if train else _part_folder(folder, "test")
    # Both parts decide the channel count and size, so that either part loads the same way.
    test_files = _image_files(test_dir, classes) if test_dir.is_dir() else []
    layout = _image_layout(train_files + test_files, options.image_size)
    raw, labels = _read_images(train_files if train else test_files, layout)
    mean, std = _statistics(
        options, layout.channels, "channel", PIXEL_SCALE,
        lambda: _pixel_statistics(raw if train else _read_images(train_files, layout)[0]),
    )
    return LocalData(_pixels(raw, labels, mean, std), tuple(classes), (layout.channels, *layout.size))


def _part_folder(folder: Path, part: str) -> Path:
    path = folder / part
    if not path.is_dir():
        raise DataError(f"{path}: the {part} part is missing (expected {part}/<class>/ folders of images)")
    return path


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(train_dir: Path) -> tuple[str, ...]:
    names = tuple(sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir() and _visible(entry)))
    if not names:
        raise DataError(f"{train_dir}: the train part is empty (no class folders)")
    return names


def _image_files(part_dir: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image in `part_dir`, by class, then by file name."""
    label_of = {name: label for label, name in enumerate(classes)}
    found = sorted(entry.name for entry in part_dir.iterdir() if entry.is_dir() and _visible(entry))
    for name in found:
        if name not in label_of:
            raise DataError(f"{part_dir / name}: class folder {name!r} is outside the class list ({_listing(classes)})")
    files = []
    for name in sorted(found, key=label_of.__getitem__):
        images = sorted(
            (entry for entry in (part_dir / name).iterdir()
             if entry.is_file() and _visible(entry) and entry.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda path: path.name,
        )
        if not images:
            raise DataError(f"{part_dir / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
        files.extend((path, label_of[name]) for path in images)
    if not files:
        raise DataError(f"{part_dir}: the {part_dir.name} part is empty (no class folders)")
    return files


def _image_layout(files: list[tuple[Path, int]], image_size: tuple[int, int] | None) -> _ImageLayout:
    """Channels and size of the data set, from the images' headers (nothing is decoded yet)."""
    from PIL import Image  # here, not at the top: only image folders need Pillow

    channels, first, first_size = 1, files[0][0], None
    for path, _ in files:
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        if mode != "L":
            channels = 3
        if first_size is None:
            first_size = (height, width)
        elif image_size is None and (height, width) != first_size:
            raise DataError(_mixed_sizes(path, (height, width), first, first_size))
    if image_size is not None:
        return _ImageLayout(channels, tuple(image_size), first, resize=True)
    return _ImageLayout(channels, first_size, first, resize=False)


def _mixed_sizes(path: Path, size: tuple[int, int], other: Path, other_size: tuple[int, int]) -> str:
    return (f"mixed image sizes: {path} is {size[0]}x{size[1]} but {other} is {other_size[0]}x{other_size[1]} "
            "(height x width); give --image-size H,W to resize them all")


def _read_images(files: list[tuple[Path, int]], layout: _ImageLayout) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) pixels and int64 (N,) labels."""
    from PIL import Image

    height, width = layout.size
    raw = np.empty((len(files), layout.channels, height, width), dtype=np.uint8)
    for index, (path, _) in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert("L" if layout.channels == 1 else "RGB")  # decodes the whole file
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        if layout.resize and image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        elif image.size != (width, height):  # changed on disk since its header was read
            raise DataError(_mixed_sizes(path, (image.height, image.width), layout.example, layout.size))
        pixels = np.asarray(image, dtype=np.uint8)
        raw[index] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return raw, np.array([label for _, label in files], dtype=np.int64)


# -- csv -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    features: np.ndarray  # float64 (N, F)
    labels: list[str]  # class names, one a row
    files: list[Path]
    origins: np.ndarray  # int64 (N, 2): each row's file (an index into files) and line number
    columns: tuple[str, ...]  # the feature columns


def _csv(folder: Path, train: bool, options: LocalOptions) -> LocalData:
    train_table = _read_table(_csv_files(folder, "train"), options.label_column)
    classes = options.classes or _sorted_classes(train_table.labels)
    table = train_table if train else _read_table(_csv_files(folder, "test"), options.label_column)
    if table.columns != train_table.columns:
        raise DataError(f"{table.files[0]}: feature columns {', '.join(table.columns)} differ from train's {', '.join(train_table.columns)}")
    labels = _label_indices(table, classes)
    mean, std = _statistics(options, len(table.columns), "column", 1.0, lambda: _feature_statistics(train_table.features))
    return LocalData(_features(table.features, labels, mean, std), tuple(classes), (len(table.columns),))


def _csv_files(folder: Path, part: str) -> list[Path]:
    single, several = folder / f"{part}.csv", folder / part
    if single.is_file() and several.is_dir():
        raise DataError(f"{folder}: both {part}.csv and {part}/ hold the {part} part; keep one")
    if single.is_file():
        return [single]
    if several.is_dir():
        files = sorted((path for path in several.iterdir() if path.is_file() and path.suffix.lower() == ".csv"), key=lambda path: path.name)
        if not files:
            raise DataError(f"{several}: the {part} part is empty (no .csv files)")
        return files
    raise DataError(f"{folder}: the {part} part is missing (expected {single.name} or a {part}/ folder of .csv files)")


def _read_table(files: list[Path], label_column: str) -> _Table:
    rows: list[list[float]] = []
    labels: list[str] = []
    origins: list[tuple[int, int]] = []
    header: list[str] | None = None
    for file_index, path in enumerate(files):
        # utf-8-sig: spreadsheets often start a CSV file with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            file_header = [name.strip() for name in next(reader, [])]
            if not file_header:
                raise DataError(f"{path}: empty; a header row naming the columns is required")
            if label_column not in file_header:
                raise DataError(f"{path}: no label column {label_column!r}; the columns are {', '.join(file_header)}")
            if header is not None and file_header != header:
                raise DataError(f"{path}: header {', '.join(file_header)} differs from {files[0]}'s {', '.join(header)}")
            header = file_header
            label_at = header.index(label_column)
            if len(header) == 1:
                raise DataError(f"{path}: no feature columns besides the label column {label_column!r}")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                line = f"{path} line {reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{line}: {len(row)} cells but the header names {len(header)} columns")
                label = row[label_at].strip()
                if not label:
                    raise DataError(f"{line}: empty label in column {label_column!r}")
                rows.append([_number(cell, line, header[column]) for column, cell in enumerate(row) if column != label_at])
                labels.append(label)
                origins.append((file_index, reader.line_num))
    assert header is not None  # _csv_files returns at least one file
    columns = tuple(name for name in header if name != label_column)
    if not rows:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: no data rows below the header")
    return _Table(np.array(rows, dtype=np.float64), labels, files, np.array(origins, dtype=np.int64), columns)


def _number(cell: str, line: str, column: str) -> float:
    value = _as_number(cell)
    if value is None:
        raise DataError(f"{line}, column {column!r}: {cell!r} is not a finite number")
    return value


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _sorted_classes(labels: list[str]) -> tuple[str, ...]:
    """Distinct labels, numeric-looking ones first in numeric order ("2" < "10"), then the rest."""

    def key(name: str) -> tuple[int, float, str]:
        value = _as_number(name)
        return (0, value, name) if value is not None else (1, 0.0, name)

    return tuple(sorted(set(labels), key=key))


def _label_indices(table: _Table, classes: Sequence[str]) -> np.ndarray:
    label_of = {name: label for label, name in enumerate(classes)}
    indices = np.empty(len(table.labels), dtype=np.int64)
    for row, name in enumerate(table.labels):
        if name not in label_of:
            file_index, line = table.origins[row]
            raise DataError(f"{table.files[file_index]} line {line}: label {name!r} is outside the class list ({_listing(classes)})")
        indices[row] = label_of[name]
    return indices


# -- npz -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arrays:
    path: Path
    x: np.ndarray
    y: np.ndarray  # int64
    classes: tuple[str, ...] | None


def _npz(folder: Path, train: bool, options: LocalOptions) -> LocalData:
    train_arrays = _read_npz(folder, "train")
    classes = options.classes or train_arrays.classes or tuple(str(label) for label in range(int(train_arrays.y.max()) + 1))
    arrays = train_arrays if train else _read_npz(folder, "test")
    if not train and options.classes is None and arrays.classes is not None and arrays.classes != tuple(classes):
        raise DataError(f"{arrays.path}: classes {_listing(arrays.classes)} differ from the train part's ({_listing(classes)})")
    if _is_pixels(arrays.x) != _is_pixels(train_arrays.x) or arrays.x.shape[1:] != train_arrays.x.shape[1:]:
        raise DataError(f"{arrays.path}: x is {arrays.x.dtype} {arrays.x.shape} but {train_arrays.path}'s is {train_arrays.x.dtype} {train_arrays.x.shape}")
    outside = np.flatnonzero((arrays.y < 0) | (arrays.y >= len(classes)))
    if len(outside):
        row = int(outside[0])
        raise DataError(f"{arrays.path}: y[{row}] = {int(arrays.y[row])} is outside the class list (labels 0..{len(classes) - 1}: {_listing(classes)})")
    shape = tuple(arrays.x.shape[1:])
    if _is_pixels(arrays.x):
        mean, std = _statistics(options, shape[0], "channel", PIXEL_SCALE, lambda: _pixel_statistics(train_arrays.x))
        return LocalData(_pixels(arrays.x, arrays.y, mean, std), tuple(classes), shape)
    unit = "column" if arrays.x.ndim == 2 else "channel"
    mean, std = _statistics(options, shape[0], unit, 1.0, lambda: _feature_statistics(train_arrays.x.astype(np.float64)))
    return LocalData(_features(arrays.x.astype(np.float64), arrays.y, mean, std), tuple(classes), shape)


def _is_pixels(x: np.ndarray) -> bool:
    return x.dtype == np.uint8 and x.ndim == 4


def _read_npz(folder: Path, part: str) -> _Arrays:
    path = folder / f"{part}.npz"
    if not path.is_file():
        raise DataError(f"{path}: the {part} part is missing")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds one array (an .npy file), not an .npz archive of arrays x and y")
    with archive:
        names = list(archive.files)
        for required in ("x", "y"):
            if required not in names:
                raise DataError(f"{path}: no array {required!r}; it holds {', '.join(names) or 'no arrays'}")
        x, y = _array(archive, "x", path), _array(archive, "y", path)
        classes = _array(archive, "classes", path) if "classes" in names else None
    if x.dtype.kind not in "biuf" or x.ndim not in (2, 4):
        raise DataError(f"{path}: x is {x.dtype} {x.shape}; expected numbers shaped (N, F) or (N, C, H, W)")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{path}: y is {y.dtype} {y.shape}; expected integer labels shaped (N,)")
    if len(x) != len(y):
        raise DataError(f"{path}: x holds {len(x)} samples but y holds {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{path}: the {part} part is empty (x and y hold no samples)")
    if classes is not None and (classes.dtype.kind not in "US" or classes.ndim != 1):
        raise DataError(f"{path}: classes is {classes.dtype} {classes.shape}; expected strings shaped (K,)")
    names = None if classes is None else tuple(
        name.decode() if isinstance(name, bytes) else str(name) for name in classes.tolist()
    )
    if names is not None:
        _check_class_list(names, f"{path}: classes")
    return _Arrays(path, x, y.astype(np.int64), names)


def _array(archive: np.lib.npyio.NpzFile, name: str, path: Path) -> np.ndarray:
    try:
        return archive[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # an object array (loading it would unpickle), or a damaged one
        raise DataError(f"{path}: array {name!r} cannot be read ({exc})") from None


def _listing(names: Sequence[str], shown: int = 10) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f", ... ({len(names)} in all)" if len(names) > shown else "")
