"""Datasets of the paper's experiments (and Fashion-MNIST, the one reachable offline), read from their real formats.

* Fashion-MNIST: IDX files (``.gz`` or not), default folder ``/usr/share/datasets/fashion-mnist`` (Debian
  package ``dataset-fashion-mnist``), or torchvision's download.
* CIFAR-10 / CIFAR-100: the python pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``).
* SVHN: ``train_32x32.mat``, ``extra_32x32.mat``, ``test_32x32.mat`` (needs scipy).
* ImageNet: an ImageFolder tree with ``train/`` and ``val/``.

Small datasets are held as uint8 tensors. Augmentation randomness is a function of (seed, epoch, index)
only, never of a worker's or the process's RNG stream, so that a run resumed mid-epoch (or run with another
number of workers or processes) sees exactly the same images.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from sd_zoo.datasets import DEFAULT_DATA_DIRS, DataError, load_cifar, load_fashion_mnist, load_svhn, read_idx  # noqa: F401  (DataError, read_idx, DEFAULT_DATA_DIRS: re-exported)

__all__ = ['DataError', 'DatasetBundle', 'TensorImageDataset', 'SeededTransformDataset', 'build_datasets',
           'read_idx', 'DEFAULT_DATA_DIRS', 'dataset_labels', 'check_labels']

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DatasetBundle:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]  # None: the validation split is the reported one (ImageNet)
    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    info: Dict[str, Any] = field(default_factory=dict)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + index


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) + labels; normalised, with flip + pad-and-crop translation when augmenting.

    As in fb.resnet.torch, images are normalised first and the padding is zeros (the mean colour).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, pad: int = 0, seed: int = 0):
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.pad, self.seed, self.epoch = augment, pad, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.augment:
            rng = random.Random(_sample_seed(self.seed, self.epoch, index))
            if rng.random() < 0.5:
                x = x.flip(-1)
            if self.pad:
                h, w = x.shape[-2:]
                x = torch.nn.functional.pad(x, (self.pad,) * 4)
                top, left = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
                x = x[:, top:top + h, left:left + w]
        return x.contiguous(), int(self.labels[index])


class SeededTransformDataset(Dataset):
    """Applies a torchvision transform under torch's RNG seeded by (seed, epoch, index) (ImageFolder data)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, index) % (2 ** 63))
            return self.transform(img), label


# ----------------------------------------------------------------------------------------------- splits

def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _per_class_split(labels: torch.Tensor, per_class: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded (held-out, rest) indices with ``per_class`` held-out images of every class."""
    perm = _permutation(len(labels), seed)
    held = [perm[labels[perm] == c][:per_class] for c in labels.unique().tolist()]
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return held_idx, mask.nonzero().flatten()


def _stratified_subset(labels: torch.Tensor, pool: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A seeded subset of the indices ``pool`` holding ``per_class`` images of every class (``--train-per-class``)."""
    counts = torch.bincount(labels[pool])
    short = {c: int(n) for c, n in enumerate(counts.tolist()) if n < per_class}
    if short:
        raise DataError(f'--train-per-class={per_class}: the training split has fewer images in classes {short}; '
                        f'lower it to at most {int(counts.min())}')
    chosen, _ = _per_class_split(labels[pool], per_class, seed)
    return pool[chosen]


def _fingerprint(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


def _limit(ds: Dataset, limit: int) -> Dataset:
    return Subset(ds, range(min(limit, len(ds)))) if limit and limit < len(ds) else ds


def _take(pair: Tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor, limit: int):
    if limit:
        indices = indices[:limit]
    return pair[0][indices], pair[1][indices]


# ----------------------------------------------------------------------------------------------- builders

def _tensor_bundle(cfg: Any, splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   mean: Tuple[float, ...], std: Tuple[float, ...]) -> DatasetBundle:
    """Seeded train/validation split of ``splits['train']`` (SVHN: 400/class train + 200/class extra)."""
    if 'extra' in splits:
        val_a, rest_a = _per_class_split(splits['train'][1], 400, cfg.split_seed)
        val_b, rest_b = _per_class_split(splits['extra'][1], 200, cfg.split_seed + 1)
        merged = [torch.cat([splits['train'][i], splits['extra'][i]]) for i in (0, 1)]
        offset = len(splits['train'][1])
        val_idx, train_idx = torch.cat([val_a, val_b + offset]), torch.cat([rest_a, rest_b + offset])
        train_pair = (merged[0], merged[1])
    else:
        train_pair = splits['train']
        n = len(train_pair[1])
        if cfg.val_size >= n:
            raise DataError(f'--val-size={cfg.val_size} leaves no training images: the training set has {n}')
        perm = _permutation(n, cfg.split_seed)
        val_idx, train_idx = perm[:cfg.val_size].sort().values, perm[cfg.val_size:]
    if cfg.train_per_class:
        train_idx = _stratified_subset(train_pair[1], train_idx, cfg.train_per_class, cfg.split_seed)
    # the training order comes from the sampler; keep the stored order canonical
    train_idx = train_idx[_permutation(len(train_idx), cfg.split_seed)] if cfg.limit else train_idx.sort().values
    test_idx = torch.arange(len(splits['test'][1]))
    make = lambda pair, aug: TensorImageDataset(pair[0], pair[1], mean, std, aug, cfg.pad, cfg.seed)  # noqa: E731
    info = dict(split_seed=cfg.split_seed, val_fingerprint=_fingerprint(val_idx),
                train_fingerprint=_fingerprint(train_idx.sort().values), train_per_class=cfg.train_per_class,
                train_size=min(len(train_idx), cfg.limit or len(train_idx)),
                val_size=min(len(val_idx), cfg.limit or len(val_idx)),
                test_size=min(len(test_idx), cfg.limit or len(test_idx)))
    images = splits['test'][0]
    return DatasetBundle(
        train=make(_take(train_pair, train_idx, cfg.limit), cfg.augment),
        val=make(_take(train_pair, val_idx, cfg.limit), False),
        test=make(_take(splits['test'], test_idx, cfg.limit), False),
        num_classes=num_classes, in_chans=images.shape[1], img_size=images.shape[-1], mean=mean, std=std, info=info)


def _synthetic_splits(cfg: Any) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Learnable random data: each class brightens its own horizontal band (for fast tests)."""
    g = torch.Generator().manual_seed(1234)
    splits = {}
    for split, n in (('train', max(cfg.limit, 64) + cfg.val_size), ('test', max(cfg.limit, 64))):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 128, (n, cfg.in_chans or 3, 16, 16), generator=g, dtype=torch.uint8)
        for c in range(10):
            images[labels == c, :, c:c + 4] += 120
        splits[split] = (images, labels)
    return splits


def _imagenet_bundle(cfg: Any, root: Path) -> DatasetBundle:
    """ImageFolder train/ and val/ with fb.resnet.torch augmentation; ILSVRC val is the reported split."""
    from torchvision import datasets
    from torchvision import transforms as T
    how = 'Pass --data-dir to an ImageNet folder with train/<class>/*.JPEG and val/<class>/*.JPEG.'
    for split in ('train', 'val'):
        if not (root / split).is_dir():
            raise DataError(f'{root / split} not found. {how}')
    try:
        train_base, val_base = (datasets.ImageFolder(str(root / split), loader=load_image) for split in ('train', 'val'))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f'{root}: {e}. {how}') from e
    if len(train_base.classes) < 2:
        raise DataError(f'{root / "train"} has {len(train_base.classes)} class folder(s) {train_base.classes}: a '
                        f'classifier needs at least two (one folder of images per class). {how}')
    if train_base.classes != val_base.classes:
        raise DataError(f'{root}: train/ has {len(train_base.classes)} classes, val/ {len(val_base.classes)}; '
                        f'both need the same class folders')
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.ColorJitter(0.4, 0.4, 0.4), _Lighting(0.1), normalize]) if cfg.augment else \
        T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train = SeededTransformDataset(_limit(train_base, cfg.limit), train_tf, cfg.seed)
    val = SeededTransformDataset(_limit(val_base, cfg.limit), eval_tf, cfg.seed)
    info = dict(train_size=len(train), val_size=len(val), test_size=0, note='ILSVRC val is the reported split')
    return DatasetBundle(train, val, None, len(train_base.classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD, info)


def load_image(path: str):
    """An RGB PIL image; an unreadable file raises :class:`DataError` naming it (not a bare PIL traceback)."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:  # PIL raises many types on a damaged file
        raise DataError(f'{path}: unreadable image ({type(e).__name__}: {e}); remove or replace the file') from e


def dataset_labels(ds: Dataset) -> Optional[torch.Tensor]:
    """All labels of ``ds`` without loading its images (None if it cannot tell)."""
    if isinstance(ds, TensorImageDataset):
        return ds.labels
    if isinstance(ds, SeededTransformDataset):
        return dataset_labels(ds.base)
    if isinstance(ds, Subset):
        labels = dataset_labels(ds.dataset)
        return None if labels is None else labels[list(ds.indices)]
    targets = getattr(ds, 'targets', None)
    return torch.as_tensor(targets) if targets is not None else None


def check_labels(bundle: DatasetBundle, dataset: str) -> None:
    """Every label lies in 0..num_classes-1 and the training split holds at least two classes."""
    if bundle.num_classes < 2:
        raise DataError(f'--dataset={dataset!r} has {bundle.num_classes} class: a classifier needs at least two')
    for split in ('train', 'val', 'test'):
        labels = dataset_labels(getattr(bundle, split)) if getattr(bundle, split) is not None else None
        if labels is None or not len(labels):
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= bundle.num_classes:
            raise DataError(f'--dataset={dataset!r}: {split} labels lie in [{low}, {high}], outside 0..'
                            f'{bundle.num_classes - 1}; the files do not hold {bundle.num_classes}-class {dataset}')
        if split == 'train' and len(labels.unique()) < 2:
            raise DataError(f'--dataset={dataset!r}: the training split holds only class {low}; a classifier needs '
                            f'images of at least two classes (check --limit / --train-per-class)')


class _Lighting:
    """AlexNet-style PCA lighting noise, as in fb.resnet.torch (ImageNet eigen-values/vectors)."""
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd: float):
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * alpha * self.eigval).sum(dim=1)
        return img + rgb.view(3, 1, 1)


def build_datasets(cfg: Any) -> DatasetBundle:
    """Train / validation / test datasets for ``cfg.dataset`` (see the module docstring for the formats)."""
    root = Path(cfg.data_dir or DEFAULT_DATA_DIRS.get(cfg.dataset, '.')).expanduser()
    if cfg.dataset == 'imagenet':
        return _imagenet_bundle(cfg, root)
    if cfg.dataset == 'synthetic':
        return _tensor_bundle(cfg, _synthetic_splits(cfg), 10, (0.5,) * (cfg.in_chans or 3), (0.25,) * (cfg.in_chans or 3))
    if cfg.dataset != 'synthetic' and not root.is_dir() and not cfg.download:
        debian = ' or install the Debian package dataset-fashion-mnist,' if cfg.dataset == 'fashion_mnist' else ''
        raise DataError(f'{root}: no such folder for dataset {cfg.dataset!r}. Pass --data-dir to the folder that '
                        f'holds it,{debian} or add --download (needs internet); see training/data.py for the formats.')
    if cfg.dataset == 'fashion_mnist':
        return _tensor_bundle(cfg, load_fashion_mnist(root, cfg.download), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if cfg.dataset in ('cifar10', 'cifar100'):
        num_classes = 10 if cfg.dataset == 'cifar10' else 100
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        return _tensor_bundle(cfg, load_cifar(root, num_classes, cfg.download), num_classes, mean, std)
    if cfg.dataset == 'svhn':
        return _tensor_bundle(cfg, load_svhn(root, cfg.download), 10, SVHN_MEAN, SVHN_STD)
    raise DataError(f'--dataset={cfg.dataset!r} is unknown')
