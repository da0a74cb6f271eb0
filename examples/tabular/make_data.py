"""Per-party CSV files of scikit-learn's breast-cancer data (it ships with scikit-learn: nothing is
downloaded):

    python examples/tabular/make_data.py OUT --parties N

writes OUT/<party>/train.csv and OUT/<party>/test.csv for the N workers of a fedavg run (worker-0 ..)
and the N clients of a splitnn run (split-client-0 ..); worker-i and split-client-i hold the same
slice. The 569 samples are shuffled in a fixed order and dealt into N disjoint slices, each with both
classes in the data set's proportion, and each slice is cut 80/20 into its train and test parts. A
header row names the 30 features; the `diagnosis` column holds the class, malignant or benign.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import StratifiedKFold, train_test_split

PARTY_NAMES = ("worker-{index}", "split-client-{index}")  # fedavg's data owners, splitnn's
LABEL_COLUMN = "diagnosis"
SHUFFLE = 0  # the fixed shuffle: every run writes the same files
MOST_PARTIES = 20  # the smaller class has 212 samples: beyond this a test part holds a few of them


def slices(labels: np.ndarray, parties: int) -> list[np.ndarray]:
    """Disjoint sample indices, one array a party, each with both classes in proportion."""
    if parties == 1:
        return [np.random.default_rng(SHUFFLE).permutation(len(labels))]
    folds = StratifiedKFold(n_splits=parties, shuffle=True, random_state=SHUFFLE)
    return [held for _, held in folds.split(np.zeros(len(labels)), labels)]


def write_csv(path: Path, header: list[str], features: np.ndarray, names: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row, name in zip(features, names):
            writer.writerow([repr(float(value)) for value in row] + [name])


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

    bunch = load_breast_cancer()
    header = [str(name) for name in bunch.feature_names] + [LABEL_COLUMN]
    class_names = [str(bunch.target_names[label]) for label in bunch.target]
    for index, held in enumerate(slices(bunch.target, args.parties)):
        train, test = train_test_split(held, test_size=0.2, stratify=bunch.target[held], random_state=SHUFFLE)
        for pattern in PARTY_NAMES:
            folder = args.out / pattern.format(index=index)
            folder.mkdir(parents=True, exist_ok=True)
            for part, rows in (("train", np.sort(train)), ("test", np.sort(test))):
                write_csv(folder / f"{part}.csv", header, bunch.data[rows], [class_names[row] for row in rows])
        print(f"{args.out}/{{{','.join(p.format(index=index) for p in PARTY_NAMES)}}}: {len(train)} train, {len(test)} test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
