"""Datasets for `scripts/train.py`, in the layouts users already have, and a sampler that resumes exactly.

| name | where | what |
| --- | --- | --- |
| `digits` | bundled with scikit-learn | 8x8 grey digits, 1,437 train / 360 test (no download, no data root) |
| `mnist` | `ROOT/MNIST/raw/` (torchvision's layout, gzipped or not) | 60,000 / 10,000, 28x28 grey |
| `cifar10`, `cifar100` | `ROOT/cifar-10-batches-py/`, `ROOT/cifar-100-python/` (torchvision's) | 32x32 RGB |
| `imagefolder` | `ROOT/train/<class>/*` and `ROOT/val/<class>/*` (or `test/`), or a `.zip` of that | any size RGB |
| `synthetic` | generated | random images and labels of a given size (speed and smoke runs) |

For `cifar10`, a `ROOT/cifar10-jpeg.zip` is used when the torchvision layout is not there.
A `.zip` (such as the CIFAR-10 JPEG set) is extracted once into `~/.cache/dst_prune/` (or
`$DST_PRUNE_CACHE`), never next to the archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from .data import load_digits, load_mnist_normalized

__all__ = ["DATASETS", "DatasetInfo", "ShardedEpochSampler", "build_datasets"]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class DatasetInfo:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int


def _extract(archive: Path) -> Path:
    """Extract `archive` once into the cache and return the folder holding `train/`.

    Safe with several ranks extracting at once and after a crash: each extracts into a folder of its own
    (`<target>.partial-<pid>-<random>`), marks it complete, and renames it to the target; a rank that finds
    the target already there (another won the race) drops its copy. Leftover partial folders of crashed
    runs are ignored (and removed when they are older than a day); a target without its marker (from an
    interrupted older version) is moved aside and extracted again.
    """
    cache = Path(os.environ.get("DST_PRUNE_CACHE", Path.home() / ".cache" / "dst_prune"))
    key = hashlib.sha1(f"{archive.resolve()}:{archive.stat().st_size}".encode()).hexdigest()[:12]
    target = cache / f"{archive.stem}-{key}"
    if target.is_dir() and not (target / ".complete").exists():
        stale = target.with_name(f"{target.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
    if not (target / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{target.name}.partial-*"):
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > 86400:
                    shutil.rmtree(old, ignore_errors=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(partial)
            (partial / ".complete").touch()
            try:
                os.rename(partial, target)
            except OSError:  # another process renamed its copy first
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    found = sorted(p.parent for p in target.rglob("train") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"{archive} has no train/ folder")
    return found[0]


def _image_transforms(mean, std, img_size: int, train: bool, small: bool):
    from torchvision import transforms

    if train and small:
        augment = [transforms.RandomCrop(img_size, padding=img_size // 8), transforms.RandomHorizontalFlip()]
    elif train:
        augment = [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip()]
    else:
        augment = [] if small else [transforms.Resize(int(img_size * 8 / 7)), transforms.CenterCrop(img_size)]
    resize = [transforms.Resize((img_size, img_size))] if small else []
    return transforms.Compose([*resize, *augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


def build_datasets(name: str, root: str | os.PathLike | None, *, img_size: int | None = None,
                   num_classes: int | None = None, synthetic_size: int = 512) -> DatasetInfo:
    """Build the train and validation datasets named `name` from `root` (see the module docstring)."""
    if name == "digits":
        train, val = load_digits()
        return DatasetInfo(TensorDataset(train[0][:, None], train[1]), TensorDataset(val[0][:, None], val[1]),
                           10, 1, 8)
    if name == "synthetic":
        size, classes = img_size or 32, num_classes or 10
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(synthetic_size, 3, size, size, generator=g), torch.randint(0, classes, (synthetic_size,),
                                                                                       generator=g)
        return DatasetInfo(TensorDataset(x, y), TensorDataset(x[:128], y[:128]), classes, 3, size)
    if root is None:
        raise FileNotFoundError(f"dataset {name!r} needs a data root: pass --data, or set DATAPATH (or DATAPATH= in "
                                f".env)")
    root = Path(root)
    if name == "mnist":
        (x_train, y_train), (x_test, y_test) = load_mnist_normalized(root)
        return DatasetInfo(TensorDataset(x_train[:, None], y_train), TensorDataset(x_test[:, None], y_test), 10, 1, 28)
    from torchvision import datasets

    if name == "cifar10" and not (root / "cifar-10-batches-py").is_dir() and (root / "cifar10-jpeg.zip").is_file():
        logger.info("no cifar-10-batches-py under %s: using CIFAR-10 (JPEG) from cifar10-jpeg.zip", root)
        return build_datasets("imagefolder", root / "cifar10-jpeg.zip", img_size=img_size or 32)
    if name in CIFAR_STATS:
        mean, std = CIFAR_STATS[name]
        size = img_size or 32
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        make = lambda train: cls(str(root), train=train, download=False,  # noqa: E731
                                 transform=_image_transforms(mean, std, size, train, small=size <= 64))
        return DatasetInfo(make(True), make(False), 10 if name == "cifar10" else 100, 3, size)
    if name == "imagefolder":
        folder = _extract(root) if root.suffix == ".zip" else root
        val_dir = next((folder / d for d in ("val", "validation", "test") if (folder / d).is_dir()), None)
        if not (folder / "train").is_dir() or val_dir is None:
            raise FileNotFoundError(f"{folder} must hold train/ and val/ (or test/) class folders")
        size = img_size or 224
        mean, std = IMAGENET_STATS
        train = datasets.ImageFolder(folder / "train", _image_transforms(mean, std, size, True, size <= 64))
        val = datasets.ImageFolder(val_dir, _image_transforms(mean, std, size, False, size <= 64))
        return DatasetInfo(train, val, len(train.classes), 3, size)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


class ShardedEpochSampler(Sampler[int]):
    """Shuffles the dataset per epoch from `(seed, epoch)` alone and gives each rank its share.

    Every rank gets the same number of whole batches (the tail is dropped), so ranks stay in step. A
    resumed run calls `set_epoch(epoch, skip_batches=k)` and continues with exactly the batches an
    uninterrupted run would have seen next.
    """

    def __init__(self, size: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.epoch, self.skip_batches = 0, 0
        self.batches_per_epoch = size // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{size} samples cannot make one batch of {batch_size} on each of {world_size} ranks")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[self.rank::self.world_size]
        order = order[self.skip_batches * self.batch_size: self.batches_per_epoch * self.batch_size]
        return iter(order.tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size
