"""Real datasets that need no download: MNIST from a local folder, scikit-learn's bundled digits.

The data root follows the seed's convention: an explicit path, else `$DATAPATH`, else a `DATAPATH=...`
line in a `.env` file of the working directory.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["MNIST_MEAN", "MNIST_STD", "load_digits", "load_mnist", "load_mnist_normalized", "resolve_data_root"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data root: `explicit`, else `$DATAPATH`, else `DATAPATH=` in `./.env`; None if none is set."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("DATAPATH"):
        return Path(os.environ["DATAPATH"]).expanduser()
    env = Path(".env")
    if env.is_file():
        for line in env.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "DATAPATH" and value.strip():
                return Path(value.strip().strip("'\"")).expanduser()
    return None


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found under {root} (looked in MNIST/raw/, raw/ and the "
                            f"folder itself, torchvision's layouts)")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as `(images uint8 [N, 28, 28], labels int64 [N])`, read from torchvision's raw IDX files.

    Args:
        root: the folder holding `MNIST/raw/` (as `torchvision.datasets.MNIST(root)` expects), or `raw/`,
            or the IDX files themselves; gzipped or not.
        split: `train` (60,000 images) or `test` (10,000).
    """
    images_stem, labels_stem = MNIST_FILES[split]
    images = _read_idx(_find_idx(Path(root), images_stem))
    labels = _read_idx(_find_idx(Path(root), labels_stem))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist_normalized(root: str | os.PathLike) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """`((train_images, train_labels), (test_images, test_labels))`, images float [N, 28, 28] standardized."""
    splits = []
    for split in ("train", "test"):
        images, labels = load_mnist(root, split)
        splits.append(((images.float() / 255 - MNIST_MEAN) / MNIST_STD, labels))
    return tuple(splits)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """scikit-learn's bundled 8x8 digits (1,797 images), split into train and test.

    Returns:
        `((train_images float [N, 8, 8] in [0, 1], train_labels), (test_images, test_labels))`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])
