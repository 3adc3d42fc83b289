"""Readers of the image datasets sd_zoo knows, from their real on-disk formats, into uint8 tensors.

* Fashion-MNIST: IDX files (``.gz`` or not), default folder ``/usr/share/datasets/fashion-mnist`` (Debian
  package ``dataset-fashion-mnist``), or torchvision's download.
* CIFAR-10 / CIFAR-100: the python pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``).
* SVHN: ``train_32x32.mat``, ``extra_32x32.mat``, ``test_32x32.mat`` (needs scipy).

Each loader returns ``{split: (images uint8 (N, C, H, W), labels int64 (N,))}`` for the ``splits`` asked for.
The evaluation command (:mod:`sd_zoo.evaluate`) and the training scripts (``training/data.py``, which builds the
splits and the augmentation on top) share them; problems raise :class:`DataError` naming the file and how to get
the data.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

__all__ = ['DataError', 'DEFAULT_DATA_DIRS', 'read_idx', 'load_fashion_mnist', 'load_cifar', 'load_svhn']

DEFAULT_DATA_DIRS = {
    'fashion_mnist': '/usr/share/datasets/fashion-mnist',
    'cifar10': 'data/cifar10', 'cifar100': 'data/cifar100', 'svhn': 'data/svhn', 'imagenet': 'data/imagenet',
}


Splits = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


class DataError(RuntimeError):
    """Missing or malformed dataset files; the message names the path and how to get the data."""


def _open_maybe_gz(path: Path) -> bytes:
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        return f.read()


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims, then uint8 data."""
    try:
        data = _open_maybe_gz(path)
    except (OSError, EOFError) as e:
        raise DataError(f'{path}: cannot read this IDX file ({e}); re-download or reinstall the dataset') from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f'{path}: not an uint8 IDX file (bad magic number {data[:4].hex()})')
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    offset, expected = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f'{path}: truncated or malformed IDX file ({len(data) - offset} bytes of data for '
                        f'shape {dims}); re-download or reinstall the dataset')
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy())


def _find(root: Path, stem: str, how_to_get: str) -> Path:
    for name in (stem, stem + '.gz'):
        if (root / name).is_file():
            return root / name
    raise DataError(f'{root / stem}(.gz) not found. {how_to_get}')


def load_fashion_mnist(root: Path, download: bool, splits: Sequence[str] = ('train', 'test')) -> Splits:
    how = ('Install the Debian package dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), '
           'pass --data-dir to a folder with the four IDX files, or add --download (torchvision, needs internet).')
    if download and not (root / 'train-images-idx3-ubyte.gz').is_file() and \
            not (root / 'train-images-idx3-ubyte').is_file():
        from torchvision.datasets import FashionMNIST
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        root = root / 'FashionMNIST' / 'raw'
    out = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        if split not in splits:
            continue
        images = read_idx(_find(root, f'{prefix}-images-idx3-ubyte', how))
        labels = read_idx(_find(root, f'{prefix}-labels-idx1-ubyte', how))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f'{root}: {prefix} images {tuple(images.shape)} and labels {tuple(labels.shape)} '
                            f'do not match (expected (N, 28, 28) and (N,))')
        out[split] = (images.unsqueeze(1), labels)
    return out


def _unpickle(path: Path, how: str) -> Dict[str, Any]:
    if not path.is_file():
        raise DataError(f'{path} not found. {how}')
    try:
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='latin1')
    except Exception as e:  # pickle raises many types on bad input
        raise DataError(f'{path}: not a CIFAR python batch ({type(e).__name__}: {e}). {how}') from e


def load_cifar(root: Path, num_classes: int, download: bool, splits: Sequence[str] = ('train', 'test')) -> Splits:
    folder, label_key = ('cifar-10-batches-py', 'labels') if num_classes == 10 else ('cifar-100-python',
                                                                                      'fine_labels')
    how = (f'Pass --data-dir to the folder holding {folder}/ (the "python version" from '
           f'https://www.cs.toronto.edu/~kriz/cifar.html) or add --download.')
    if download and not (root / folder).is_dir():
        from torchvision.datasets import CIFAR10, CIFAR100
        (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
    files = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']} if num_classes == 10 \
        else {'train': ['train'], 'test': ['test']}
    out = {}
    for split in splits:
        images, labels = [], []
        for name in files[split]:
            batch = _unpickle(root / folder / name, how)
            if not isinstance(batch, dict) or 'data' not in batch or label_key not in batch:
                raise DataError(f'{root / folder / name}: missing "data" or "{label_key}". {how}')
            data = np.asarray(batch['data'])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[label_key]) != len(data):
                raise DataError(f'{root / folder / name}: "data" has shape {data.shape} with {len(batch[label_key])} '
                                f'labels; a CIFAR batch holds (N, 3072) uint8 rows (32 x 32 RGB) and N labels. {how}')
            bad = [v for v in batch[label_key] if not 0 <= int(v) < num_classes]
            if bad:
                raise DataError(f'{root / folder / name}: labels {sorted(set(bad))[:5]} lie outside 0..{num_classes - 1} '
                                f'of {folder}. {how}')
            images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[label_key])
        out[split] = (torch.from_numpy(np.concatenate(images)), torch.tensor(labels))
    return out


def load_svhn(root: Path, download: bool, splits: Sequence[str] = ('train', 'extra', 'test')) -> Splits:
    how = ('Pass --data-dir to a folder with train_32x32.mat, extra_32x32.mat and test_32x32.mat '
           '(http://ufldl.stanford.edu/housenumbers/) or add --download.')
    try:
        import scipy.io
    except ImportError as e:
        raise DataError('SVHN .mat files need scipy: pip install scipy (or pip install "sd_zoo[train]")') from e
    out = {}
    for split in splits:
        path = root / f'{split}_32x32.mat'
        if download and not path.is_file():
            from torchvision.datasets import SVHN
            SVHN(str(root), split=split, download=True)
        if not path.is_file():
            raise DataError(f'{path} not found. {how}')
        try:
            mat = scipy.io.loadmat(str(path))
            images = torch.from_numpy(np.transpose(mat['X'], (3, 2, 0, 1)).astype(np.uint8))
            labels = torch.from_numpy(mat['y'].astype(np.int64).reshape(-1)) % 10  # label 10 is digit 0
        except Exception as e:
            raise DataError(f'{path}: not an SVHN .mat file ({type(e).__name__}: {e}). {how}') from e
        if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
            raise DataError(f'{path}: X has shape {tuple(mat["X"].shape)}, expected (32, 32, 3, N) with N labels')
        out[split] = (images, labels)
    return out
