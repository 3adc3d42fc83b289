"""Shared test set-up: the repository root is importable (for ``training``), and Accelerate's process-wide
singletons are reset after each test so that runs with other settings can follow in the same process."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def train_reset_accelerate_state():
    """Forget Accelerate's singleton state (mixed precision, accumulation) left by a training run."""
    yield
    if 'accelerate' in sys.modules:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# --------------------------------------------------------------------------------------------- stand-in datasets
# Small files written in each dataset's real on-disk format, for the loaders and the paper-preset commands.

def _write_idx(path: Path, array) -> None:
    import gzip

    import numpy as np
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 120, n_test: int = 30) -> Path:
    """IDX files as shipped by dataset-fashion-mnist; image i of a split has pixel [0, 0] = i % 256."""
    import numpy as np
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 0, 1] = np.arange(n) // 256
        _write_idx(root / f'{prefix}-images-idx3-ubyte.gz', images)
        _write_idx(root / f'{prefix}-labels-idx1-ubyte.gz', np.arange(n) % 10)
    return root


def write_cifar(root: Path, num_classes: int = 10, n_train: int = 5016, n_test: int = 16) -> Path:
    """The "python version" pickles: cifar-10-batches-py/data_batch_1..5 + test_batch, or cifar-100-python/."""
    import pickle

    import numpy as np
    rng = np.random.default_rng(num_classes)
    folder = root / ('cifar-10-batches-py' if num_classes == 10 else 'cifar-100-python')
    folder.mkdir(parents=True, exist_ok=True)
    label_key = 'labels' if num_classes == 10 else 'fine_labels'

    def batch(n: int, start: int) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0], data[:, 1024], data[:, 2048] = 10, 20, 30  # R, G, B planes of pixel (0, 0)
        labels = [(start + i) % num_classes for i in range(n)]
        out = {'data': data, label_key: labels, 'filenames': [f'img{start + i}.png' for i in range(n)]}
        if num_classes == 100:
            out['coarse_labels'] = [lab // 5 for lab in labels]
        return out

    if num_classes == 10:
        sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
        start = 0
        for i, size in enumerate(sizes, 1):
            with open(folder / f'data_batch_{i}', 'wb') as f:
                pickle.dump(batch(size, start), f)
            start += size
        with open(folder / 'test_batch', 'wb') as f:
            pickle.dump(batch(n_test, 0), f)
    else:
        for name, n in (('train', n_train), ('test', n_test)):
            with open(folder / name, 'wb') as f:
                pickle.dump(batch(n, 0), f)
    return root


def write_svhn(root: Path, train_per_class: int = 401, extra_per_class: int = 201, n_test: int = 20) -> Path:
    """train_32x32.mat / extra_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for '0'."""
    import numpy as np
    import scipy.io
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, n in (('train', 10 * train_per_class), ('extra', 10 * extra_per_class), ('test', n_test)):
        digits = np.arange(n) % 10
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        scipy.io.savemat(str(root / f'{split}_32x32.mat'), {'X': X, 'y': np.where(digits == 0, 10, digits)[:, None]})
    return root


def write_image_folder(root: Path, classes=('n01440764', 'n01443537'), per_class: int = 3) -> Path:
    """ImageNet layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (JPEG and PNG files of odd sizes)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(2)
    for split in ('train', 'val'):
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (37 + 5 * i, 53, 3), dtype=np.uint8))
                img.save(root / split / wnid / (f'{wnid}_{i}.JPEG' if i % 2 == 0 else f'{wnid}_{i}.png'),
                         format='JPEG' if i % 2 == 0 else 'PNG')
    return root


@pytest.fixture
def train_data_writers():
    """The stand-in dataset writers above, as one object (``.cifar``, ``.svhn``, ...)."""
    from types import SimpleNamespace
    return SimpleNamespace(fashion_mnist=write_fashion_mnist, cifar=write_cifar, svhn=write_svhn,
                           image_folder=write_image_folder)
