"""Per-party folders of PNG images from scikit-learn's handwritten digits (8x8 grey images of 0-9
that ship with scikit-learn: nothing is downloaded):

    python examples/images/make_data.py OUT --parties N

writes OUT/<party>/train/<digit>/<n>.png and OUT/<party>/test/<digit>/<n>.png, n being the image's
place in the data set, for the N clients of a splitnn run (split-client-0 ..) and the N peers of a
p2p run (p2p-peer-0 ..); split-client-i and p2p-peer-i hold the same slice. The 1797 images are
shuffled in a fixed order and dealt into N disjoint slices, each with every digit in the data set's
proportion, and each slice is cut 80/20 into its train and test parts. The digits' 17 grey levels
(0-16) become 0-255.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split

PARTY_NAMES = ("split-client-{index}", "p2p-peer-{index}")  # splitnn's data owners, p2p's
SHUFFLE = 0  # the fixed shuffle: every run writes the same files
MOST_PARTIES = 20  # the rarest digit has 174 images: beyond this a test part holds a few of each
GREY_LEVELS = 16  # the digits' pixels are 0..16


def slices(labels: np.ndarray, parties: int) -> list[np.ndarray]:
    """Disjoint sample indices, one array a party, each with every class in proportion."""
    if parties == 1:
        return [np.random.default_rng(SHUFFLE).permutation(len(labels))]
    folds = StratifiedKFold(n_splits=parties, shuffle=True, random_state=SHUFFLE)
    return [held for _, held in folds.split(np.zeros(len(labels)), labels)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the parties' folders into")
    parser.add_argument("--parties", type=int, default=3, help=f"data owners, 1 to {MOST_PARTIES} (default: 3)")
    args = parser.parse_args()
    if not 1 <= args.parties <= MOST_PARTIES:
        print(f"error: --parties {args.parties}: give 1 to {MOST_PARTIES}", file=sys.stderr)
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: {args.out} is not a new or empty folder: give one (the parties' files would mix with what is there)", file=sys.stderr)
        return 2

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / GREY_LEVELS)).astype(np.uint8)  # (1797, 8, 8): saved as grey ("L") PNGs
    width = len(str(len(pixels) - 1))
    for index, held in enumerate(slices(bunch.target, args.parties)):
        train, test = train_test_split(held, test_size=0.2, stratify=bunch.target[held], random_state=SHUFFLE)
        for pattern in PARTY_NAMES:
            for part, rows in (("train", train), ("test", test)):
                for row in rows:
                    folder = args.out / pattern.format(index=index) / part / str(bunch.target[row])
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels[row]).save(folder / f"{row:0{width}d}.png")
        print(f"{args.out}/{{{','.join(p.format(index=index) for p in PARTY_NAMES)}}}: {len(train)} train, {len(test)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
