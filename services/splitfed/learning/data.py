"""Data sets as in-memory tensors, and the deterministic batch order every scenario shares.

Each data set is (images: float32 (N, C, H, W) normalised, labels: int64 (N,)).
Split learning is exact only if every mode sees the same batches in the same order, so batch
order comes from one seeded generator (`batch_order`), never from a DataLoader's worker RNG.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitfed.errors import DataError
from splitfed.learning.settings import DATASETS, DatasetInfo, parse_partition

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_TRAIN = tuple(f"data_batch_{n}" for n in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"  # what the official archive, cifar-10-python.tar.gz, unpacks to


class Images:
    """(N, C, H, W) images kept as their raw pixels (uint8: a quarter of float32) and normalised
    as they are taken. Normalising is elementwise, so `images[i]` holds the same bits as the same
    rows of the whole set normalised at once."""

    def __init__(self, raw: torch.Tensor, offset: float, divisor: float):
        self.raw, self.offset, self.divisor = raw, offset, divisor

    def __getitem__(self, index) -> torch.Tensor:  # noqa: ANN001 (whatever a tensor takes)
        return self.take(index, self.raw.device)

    def take(self, index, device: torch.device) -> torch.Tensor:  # noqa: ANN001 (whatever a tensor takes)
        """The images at `index`, normalised on `device`: they cross to it as uint8, a quarter of the bytes."""
        return self.raw[index].to(device, non_blocking=True).to(torch.float32).sub_(self.offset).div_(self.divisor)

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    def subset(self, index) -> Images:  # noqa: ANN001 (whatever a tensor takes)
        """The images at `index`, still raw: a share of the data set stays uint8."""
        return Images(self.raw[index], self.offset, self.divisor)

    def to(self, device: torch.device) -> Images:
        return Images(self.raw.to(device), self.offset, self.divisor)


@dataclass
class Samples:
    images: Images | torch.Tensor  # (N, C, H, W); indexing gives float32
    labels: torch.Tensor  # (N,) int64
    device: torch.device = torch.device("cpu")  # where a batch goes as it is taken (the samples themselves may stay on the CPU)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 (a slice or an index tensor)
        """The samples at `index`, on the device: (B, C, H, W) float32 inputs, (B,) int64 labels."""
        if isinstance(self.images, Images):
            images = self.images.take(index, self.device)
        else:
            images = self.images[index].to(self.device, non_blocking=True)
        return images, self.labels[index].to(self.device, non_blocking=True)

    def on(self, device: torch.device, *, whole: bool = False) -> Samples:
        """These samples with batches taken to `device`; `whole` moves the whole set there at once."""
        if not whole:
            return Samples(self.images, self.labels, device)
        return Samples(self.images.to(device), self.labels.to(device), device)

    def subset(self, index) -> Samples:  # noqa: ANN001 (whatever a tensor takes)
        """The samples at `index`; raw images stay raw."""
        images = self.images.subset(index) if isinstance(self.images, Images) else self.images[index]
        return Samples(images, self.labels[index], self.device)



def info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


def load(name: str, *, train: bool, data_dir: Path | None = None, limit: int | None = None) -> Samples:
    """Load the train or test split of `name`; `limit` keeps the first N samples."""
    meta = info(name)
    if meta.reader == "digits":
        images, labels = _digits(train)
    elif meta.reader == "cifar10":
        images, labels = _cifar10(_cifar10_dir(data_dir), train)
    else:
        images, labels = _idx_pair(_idx_dir(name, data_dir), train)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # Pixels stay uint8 (Fashion-MNIST's training set: 47 MB, not 188 MB as float32) and each
    # batch is normalised as it is taken.
    raw = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).reshape(-1, *meta.shape)
    # IDX and CIFAR pixels are 0..255 and their statistics are for 0..1; digits are 0..16 as published.
    scale = 1.0 if meta.reader == "digits" else 255.0
    return Samples(Images(raw, meta.mean * scale, meta.std * scale), torch.from_numpy(labels.astype(np.int64)))


def _digits(train: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # A fixed 80/20 cut of the 1797 samples; the bundled order is already mixed across classes.
    cut = int(len(bunch.target) * 0.8)
    part = slice(0, cut) if train else slice(cut, None)
    return bunch.data[part], bunch.target[part]


def _cifar10_dir(data_dir: Path | None) -> Path:
    candidates = [data_dir, data_dir / CIFAR10_FOLDER, data_dir / "cifar10"] if data_dir else []
    for path in candidates:
        if all((path / batch).is_file() for batch in CIFAR10_TRAIN + CIFAR10_TEST):
            return path
    looked = ", ".join(str(p) for p in candidates) or "nowhere (no --data-dir given)"
    raise DataError(f"cifar10 python batches ({', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}, from cifar-10-python.tar.gz) not found; looked in {looked}")


def _cifar10(directory: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 pixels (R, G then B planes of 32x32: (N, 3, 32, 32) once reshaped), (N,) labels."""
    batches = [_cifar10_batch(directory / batch) for batch in (CIFAR10_TRAIN if train else CIFAR10_TEST)]
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


def _cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = BatchUnpickler(handle, encoding="bytes").load()  # Python 2 pickles: their str keys come back as bytes
        images, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
        raise DataError(f"{path}: {images.shape} pixels and {len(labels)} labels; a CIFAR-10 batch holds (N, 3072) and N")
    return images, labels


class BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches and nothing else: a pickle can call any importable function,
    so only what the batches hold is let in. Dicts, lists, bytes and ints need no global; the pixel
    array needs numpy's reconstruction (numpy.core before numpy 2, numpy._core since)."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)


def _numpy_reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _idx_dir(name: str, data_dir: Path | None) -> Path:
    candidates = [data_dir, data_dir / name if data_dir else None, data_dir / name.upper() / "raw" if data_dir else None]
    if name == "fashion-mnist":
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for path in filter(None, candidates):
        if _idx_file(path, "train-images-idx3-ubyte"):
            return path
    looked = ", ".join(str(p) for p in candidates if p) or "nowhere (no --data-dir given)"
    hint = " (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(f"{name} IDX files not found; looked in {looked}{hint}")


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_pair(directory: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if train else "t10k"
    images = _read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _read_idx(path: Path | None) -> np.ndarray:
    if path is None:
        raise DataError("IDX file missing")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = bytearray(handle.read())  # writable, so tensors can share it without a copy
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated ({data.size} values for shape {shape})")
    return data.reshape(shape)


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of indices: a seeded permutation cut into `batch_size` pieces."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def party_generator(seed: int, index: int) -> torch.Generator:
    """The batch order of party `index` among several that each hold a share (split clients,
    peers): fixed by the run's seed, and party 0 shuffles as centralized training does."""
    return torch.Generator().manual_seed(seed + 7919 * index)


def share_of(full: Samples, spec: str, parts: int, seed: int, index: int) -> Samples:
    """Party `index`'s samples of `full` shared out by `spec` among `parts` parties."""
    return full.subset(partition(full.labels, spec, parts, seed)[index])


def partition(labels: torch.Tensor, spec: str, parts: int, seed: int) -> list[torch.Tensor]:
    """Indices of each party's share: `iid`, `classes:0-3,4-6,7-9`, `dirichlet:ALPHA`, `shards:K`.
    A share left empty (more parties than samples, classes the data does not hold) is an error."""
    generator = torch.Generator().manual_seed(seed)
    parsed = parse_partition(spec, parts, int(labels.max()) + 1 if len(labels) else 0)
    if parsed.kind == "iid":
        shares = list(torch.randperm(len(labels), generator=generator).tensor_split(parts))
    elif parsed.kind == "classes":
        shares = [torch.nonzero(torch.isin(labels, torch.tensor(group))).flatten() for group in parsed.groups]
    elif parsed.kind == "dirichlet":
        shares = _dirichlet(labels, parts, parsed.alpha, seed)
    else:
        by_label = torch.argsort(labels, stable=True)
        shards = by_label.tensor_split(parts * parsed.shards)
        order = torch.randperm(len(shards), generator=generator).tolist()
        shares = [torch.cat([shards[i] for i in order[p::parts]]) for p in range(parts)]
    for index, share in enumerate(shares):
        if len(share) == 0:
            raise ValueError(f"--partition {spec!r} leaves worker {index} with no samples (of {len(labels)})")
    return shares


def _dirichlet(labels: torch.Tensor, parts: int, alpha: float, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    shares: list[list[int]] = [[] for _ in range(parts)]
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten().numpy()
        rng.shuffle(members)
        cuts = (np.cumsum(rng.dirichlet([alpha] * parts)) * len(members)).astype(int)[:-1]
        for party, chunk in enumerate(np.split(members, cuts)):
            shares[party].extend(chunk.tolist())
    return [torch.tensor(sorted(share), dtype=torch.int64) for share in shares]
