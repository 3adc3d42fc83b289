"""Dataset readers on small files in each dataset's real on-disk format: Fashion-MNIST IDX, CIFAR-10/100 python
pickles, SVHN .mat (with the paper's 400 + 200 per class validation split), ImageNet ImageFolder; seeded splits,
deterministic augmentation, and clear errors for missing or malformed files."""
import gzip
from pathlib import Path

import pytest
import torch

from training.data import DataError, build_datasets, read_idx
from training.recipes import PRESETS, TrainConfig

FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')


def config(dataset: str, root: Path, **kwargs) -> TrainConfig:
    preset = {'fashion_mnist': 'fashion_mnist', 'cifar10': 'cifar10', 'cifar100': 'cifar100', 'svhn': 'svhn',
              'imagenet': 'imagenet_resnet152'}[dataset]
    return TrainConfig(**{**PRESETS[preset], 'data_dir': str(root), **kwargs})


def marker(ds, index: int) -> int:
    """The index written into pixel (0, 0) and (0, 1) of a stand-in Fashion-MNIST image."""
    return int(ds.images[index, 0, 0, 0]) + 256 * int(ds.images[index, 0, 0, 1])


def test_fashion_mnist_idx_split_is_seeded_and_disjoint(tmp_path, train_data_writers):
    root = train_data_writers.fashion_mnist(tmp_path)
    bundle = build_datasets(config('fashion_mnist', root, val_size=20))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (100, 20, 30)
    assert (bundle.in_chans, bundle.img_size, bundle.num_classes) == (1, 28, 10)
    train_ids = {marker(bundle.train, i) for i in range(len(bundle.train))}
    val_ids = {marker(bundle.val, i) for i in range(len(bundle.val))}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(120))
    again = build_datasets(config('fashion_mnist', root, val_size=20))
    other = build_datasets(config('fashion_mnist', root, val_size=20, split_seed=1))
    assert again.info['val_fingerprint'] == bundle.info['val_fingerprint'] != other.info['val_fingerprint']
    x, y = bundle.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path, train_data_writers):
    bundle = build_datasets(config('fashion_mnist', train_data_writers.fashion_mnist(tmp_path), val_size=20))
    train = bundle.train
    first = [train[i][0] for i in range(8)]
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(first))
    train.set_epoch(1)
    assert any(not torch.equal(a, train[i][0]) for i, a in enumerate(first))
    assert all(train[i][0].shape == (1, 28, 28) for i in range(8))
    assert all(torch.equal(bundle.val[i][0], bundle.val[i][0]) for i in range(4))


@pytest.mark.skipif(not (FASHION_DIR / 'train-images-idx3-ubyte.gz').is_file(), reason='dataset-fashion-mnist missing')
def test_real_fashion_mnist_files():
    labels = read_idx(FASHION_DIR / 't10k-labels-idx1-ubyte.gz')
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    bundle = build_datasets(TrainConfig(**PRESETS['fashion_mnist']))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)


def test_fashion_mnist_missing_or_malformed_files(tmp_path, train_data_writers):
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte.*dataset-fashion-mnist.*--download'):
        tmp_path.joinpath('empty').mkdir()
        build_datasets(config('fashion_mnist', tmp_path / 'empty'))
    root = train_data_writers.fashion_mnist(tmp_path / 'bad')
    path = root / 'train-images-idx3-ubyte.gz'
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match=f'{path}.*truncated'):
        build_datasets(config('fashion_mnist', root, val_size=20))
    path.write_bytes(b'not gzip at all')
    with pytest.raises(DataError, match=str(path)):
        build_datasets(config('fashion_mnist', root, val_size=20))


@pytest.mark.parametrize('num_classes', [10, 100])
def test_cifar_python_batches(tmp_path, train_data_writers, num_classes):
    root = train_data_writers.cifar(tmp_path, num_classes, n_train=5016, n_test=16)
    bundle = build_datasets(config(f'cifar{num_classes}', root))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 5000, 16)
    assert bundle.num_classes == num_classes and bundle.img_size == 32
    assert bundle.val.images[:, :, 0, 0].tolist() == [[10, 20, 30]] * 5000  # row-major R, G, B planes
    labels = torch.cat([bundle.train.labels, bundle.val.labels])
    assert labels.max() < num_classes and len(labels.unique()) == num_classes
    x, _ = bundle.train[0]
    assert x.shape == (3, 32, 32)


def test_cifar_malformed_batch_names_the_file(tmp_path, train_data_writers):
    root = train_data_writers.cifar(tmp_path, 10, n_train=5010, n_test=4)
    bad = root / 'cifar-10-batches-py' / 'data_batch_3'
    bad.write_bytes(b'garbage')
    with pytest.raises(DataError, match=f'{bad}.*--download'):
        build_datasets(config('cifar10', root))


def test_svhn_mat_files_and_paper_validation_split(tmp_path, train_data_writers):
    pytest.importorskip('scipy')
    root = train_data_writers.svhn(tmp_path, train_per_class=401, extra_per_class=201, n_test=20)
    bundle = build_datasets(config('svhn', root))
    # 400 per class from train + 200 per class from extra = 6,000; the rest of train + extra is trained on
    assert (len(bundle.val), len(bundle.train), len(bundle.test)) == (6000, 20, 20)
    assert torch.bincount(bundle.val.labels, minlength=10).tolist() == [600] * 10
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [2] * 10
    assert bundle.test.labels.tolist() == [i % 10 for i in range(20)]  # label 10 in the file is digit 0
    assert not bundle.train.augment


def test_imagenet_image_folder(tmp_path, train_data_writers):
    root = train_data_writers.image_folder(tmp_path)
    bundle = build_datasets(config('imagenet', root))
    assert (len(bundle.train), len(bundle.val), bundle.test) == (6, 6, None)
    assert bundle.num_classes == 2
    x, y = bundle.train[1]
    assert x.shape == (3, 224, 224) and y == 0
    assert torch.equal(x, bundle.train[1][0])  # seeded by (seed, epoch, index)
    bundle.train.set_epoch(1)
    assert not torch.equal(x, bundle.train[1][0])
    assert bundle.val[5][0].shape == (3, 224, 224) and bundle.val[5][1] == 1


def test_imagenet_missing_split_names_the_folder(tmp_path, train_data_writers):
    root = train_data_writers.image_folder(tmp_path)
    for path in (root / 'val').rglob('*'):
        if path.is_file():
            path.unlink()
    with pytest.raises(DataError, match=str(root)):
        build_datasets(config('imagenet', root))
    with pytest.raises(DataError, match=str(tmp_path / 'none' / 'train')):
        build_datasets(config('imagenet', tmp_path / 'none'))
