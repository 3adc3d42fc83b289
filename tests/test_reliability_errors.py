"""Named errors instead of tracebacks: each bad input of issue 12 point 8 ends in one line that names the file,
flag or value and says what to do, before any training step."""
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm

import sd_zoo  # noqa: F401
from training import cifar, imagenet
from training.engine import ConfigError, train
from training.recipes import PRESETS, TrainConfig

QUICK = ['--epochs', '1', '--no-progress', '--log-with', 'none', '--workers', '0']


def last_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value.code)
    assert '\n' not in text.strip() and 'Traceback' not in text, text
    return text


def test_num_classes_smaller_than_the_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cifar.main(['--preset', 'fashion_mnist', '--dataset', 'synthetic', '--limit', '32', '--num-classes', '5',
                    '--output-dir', str(tmp_path / 'o'), *QUICK])
    assert exc.value.code == 2
    assert '--num-classes=5 is smaller than the 10 classes' in capsys.readouterr().err


def test_in_chans_that_does_not_match_the_data(tmp_path, train_data_writers, capsys):
    data = train_data_writers.fashion_mnist(tmp_path / 'fm')
    with pytest.raises(SystemExit) as exc:
        cifar.main(['--preset', 'fashion_mnist', '--data-dir', str(data), '--val-size', '20', '--in-chans', '3',
                    '--output-dir', str(tmp_path / 'o'), *QUICK])
    assert exc.value.code == 2
    assert '--in-chans=3 does not match the data: fashion_mnist images have 1 channel' in capsys.readouterr().err


def _cifar_batch(path: Path, data: np.ndarray, labels) -> None:
    with open(path, 'wb') as f:
        pickle.dump({'data': data, 'labels': list(labels)}, f)


@pytest.mark.parametrize('fault, message', [
    ('labels', r'data_batch_3: labels \[12\] lie outside 0..9'),
    ('size', r'data_batch_3: "data" has shape \(8, 3000\).*\(N, 3072\)'),
])
def test_cifar_batch_with_bad_labels_or_size_is_named(tmp_path, train_data_writers, fault, message):
    data = train_data_writers.cifar(tmp_path / 'c10', n_train=40, n_test=8)
    batch = data / 'cifar-10-batches-py' / 'data_batch_3'
    rng = np.random.default_rng(0)
    if fault == 'labels':
        _cifar_batch(batch, rng.integers(0, 256, (8, 3072), dtype=np.uint8), [1] * 7 + [12])
    else:
        _cifar_batch(batch, rng.integers(0, 256, (8, 3000), dtype=np.uint8), [1] * 8)
    with pytest.raises(SystemExit, match=message) as exc:
        cifar.main(['--preset', 'cifar10', '--data-dir', str(data), '--val-size', '8', '--limit', '8',
                    '--model', 'sd_resnet20_cifar', '--output-dir', str(tmp_path / 'o'), *QUICK])
    last_line(exc)


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_image_in_an_image_folder_is_named(tmp_path, train_data_writers, workers):
    root = train_data_writers.image_folder(tmp_path / 'inet', per_class=2)
    bad = root / 'train' / 'n01443537' / 'n01443537_0.JPEG'
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
    with pytest.raises(SystemExit) as exc:
        imagenet.main(['--data-dir', str(root), '--model', 'sd_resnet20_cifar', '--batch-size', '4',
                       '--eval-batch-size', '4', '--output-dir', str(tmp_path / 'o'), *QUICK[:-2],
                       '--workers', str(workers)])
    text = last_line(exc)
    assert text.startswith('error: ') and f'{bad}: unreadable image' in text and 'remove or replace' in text
    # the workers (which ignore SIGTERM) are shut down with the error, not left to block the exit for ever
    assert not multiprocessing.active_children(), multiprocessing.active_children()


def test_one_class_image_folder_is_refused(tmp_path, train_data_writers):
    root = train_data_writers.image_folder(tmp_path / 'inet', classes=('n01440764',), per_class=2)
    with pytest.raises(SystemExit, match=r"1 class folder\(s\) \['n01440764'\].*at least two") as exc:
        imagenet.main(['--data-dir', str(root), '--model', 'sd_resnet20_cifar', '--output-dir', str(tmp_path / 'o'),
                       *QUICK])
    last_line(exc)


def test_non_sd_model_is_refused_before_data_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # the data folder does not exist: the model is checked first
        cifar.main(['--preset', 'cifar10', '--model', 'resnet18', '--data-dir', str(tmp_path / 'none'),
                    '--output-dir', str(tmp_path / 'o'), *QUICK])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model='resnet18' is a timm model without sd_zoo's stochastic-depth controls" in err


def test_string_drop_path_rate_and_bad_seed_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--drop-path-rate='0.5': must be a number, not str"):
        train(TrainConfig(**dict(PRESETS['fashion_mnist'], drop_path_rate='0.5', output_dir=str(tmp_path))))
    with pytest.raises(ValueError, match=r"drop_path_rate='0.5' must be a number"):
        timm.create_model('sd_resnet20_cifar', drop_path_rate='0.5')
    with pytest.raises(ValueError, match=r"drop_path_seed='7' must be an integer"):
        timm.create_model('sd_resnet20_cifar', drop_path_seed='7')


def test_cli_with_workers_exits_after_an_error_in_a_worker(tmp_path, train_data_writers):
    """The command, not only the function: an error raised in a DataLoader worker ends the process (status 1)
    instead of leaving it waiting at exit for workers that ignore SIGTERM (a CI job once hung there)."""
    root = train_data_writers.image_folder(tmp_path / 'inet', per_class=2)
    bad = root / 'train' / 'n01443537' / 'n01443537_0.JPEG'
    bad.write_bytes(bad.read_bytes()[:40])
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(repo / 'training' / 'imagenet.py'), '--data-dir', str(root), '--model',
           'sd_resnet20_cifar', '--batch-size', '4', '--eval-batch-size', '4', '--output-dir', str(tmp_path / 'o'),
           *QUICK[:-2], '--workers', '2']
    env = {**os.environ, 'PYTHONPATH': str(repo)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 1 and f"{bad}: unreadable image" in proc.stderr, proc.stderr[-2000:]
