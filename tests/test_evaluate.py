"""The evaluation command (issue 14): ``sd-zoo-eval`` / ``python -m sd_zoo.evaluate`` on the committed
Fashion-MNIST weights (real test set, the card's error reproduced) and on stand-in files in the real CIFAR, SVHN
and ImageFolder formats; Hub and export sources; the card comparison; the random-depth ensemble; clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import sd_zoo  # noqa: F401
from sd_zoo import evaluate, hub, publishing
from sd_zoo.cards import render_card
from sd_zoo.datasets import read_idx
from sd_zoo.pretrained import PublishedWeight, Result, find_weight
from sd_zoo.sources import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_TAG = 'sd_resnet20_cifar.fashion_mnist'
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture
def fashion_hub_cache(monkeypatch, tmp_path):
    """A Hub cache holding the committed Fashion-MNIST export under its registered repo id, network off."""
    from huggingface_hub import constants
    oid = publishing.publish(ROOT / 'results' / 'fashion_mnist' / 'export', find_weight(FASHION_TAG).repo_id,
                      api=publishing.LocalHubCache(tmp_path / 'cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    return oid


def run_eval(tmp_path: Path, *argv: str):
    out = tmp_path / 'eval.json'
    code = evaluate.main([*argv, '--no-progress', '--output', str(out)])
    return code, (json.loads(out.read_text()) if out.is_file() else None)


def small_export(path: Path, num_classes: int = 10, drop_path_rate: float = 0.5, card: str = '# card\n') -> Path:
    torch.manual_seed(3)
    model = timm.create_model('sd_resnet20_cifar', num_classes=num_classes, drop_path_rate=drop_path_rate)
    for m in model.modules():  # trained-like BatchNorm state, so that dropping a block changes the output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    return hub.export_model(model.eval(), path, card, tag='unit',
                            data_config=dict(input_size=(3, 32, 32), crop_pct=1.0, mean=MEAN, std=STD))


def direct_error(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 error (%) computed without the command: normalise the uint8 tensors, one forward."""
    model = load_pretrained(str(path))[0]
    x = (images.float() / 255 - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    with torch.no_grad():
        return 100.0 * int((model(x).argmax(1) != labels).sum()) / len(labels)


# ------------------------------------------------------------------------------------------------------------
# The committed Fashion-MNIST weights on the real test set
# ------------------------------------------------------------------------------------------------------------
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / 't10k-images-idx3-ubyte.gz').is_file(),
                                   reason='needs the Debian package dataset-fashion-mnist')


@needs_fashion
@pytest.mark.slow
def test_registered_tag_reproduces_its_cards_error_on_the_full_test_set(fashion_hub_cache, tmp_path, capsys):
    code, out = run_eval(tmp_path, FASHION_TAG, '--dataset', 'fashion_mnist')
    assert code == 0 and out['passed'] is True and out['images'] == 10000
    (row,) = out['card_comparison']  # the card's test error (its validation figure is another split)
    assert row['metric'] == 'error' and row['value'] == 11.8 and row['source'].endswith('README.md')
    assert abs(out['error'] - 11.8) < 1e-9 and abs(row['difference']) < 1e-9
    assert out['source']['revision'] == fashion_hub_cache and out['data_config']['input_size'] == [1, 28, 28]
    assert 'error 11.80%' in capsys.readouterr().out


@needs_fashion
def test_registered_tag_on_real_images_matches_a_direct_computation(fashion_hub_cache, tmp_path, capsys):
    code, out = run_eval(tmp_path, FASHION_TAG, '--dataset', 'fashion_mnist', '--limit', '512')
    assert code == 0 and out['images'] == 512 and out['card_comparison'] == [] and out['passed'] is None
    assert 'no figure to compare with (--limit evaluates a subset)' in capsys.readouterr().out
    images = read_idx(FASHION_DIR / 't10k-images-idx3-ubyte.gz')[:512].unsqueeze(1)
    labels = read_idx(FASHION_DIR / 't10k-labels-idx1-ubyte.gz')[:512].long()
    model = timm.create_model(FASHION_TAG, pretrained=True).eval()
    with torch.no_grad():
        logits = torch.cat([model((images[i:i + 256].float() / 255 - 0.286) / 0.353) for i in range(0, 512, 256)])
    assert out['error'] == pytest.approx(100.0 * int((logits.argmax(1) != labels).sum()) / 512, abs=1e-9)
    assert out['top5'] > out['top1'] > 80.0


# ------------------------------------------------------------------------------------------------------------
# Stand-in files in the real formats
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100', 'svhn'])
def test_tensor_datasets_match_a_direct_computation(dataset, tmp_path, train_data_writers):
    from sd_zoo.datasets import load_cifar, load_svhn
    if dataset == 'svhn':
        root = train_data_writers.svhn(tmp_path / 'data', train_per_class=1, extra_per_class=1, n_test=24)
        images, labels = load_svhn(root, False, splits=('test',))['test']
    else:
        classes = 100 if dataset == 'cifar100' else 10
        root = train_data_writers.cifar(tmp_path / 'data', num_classes=classes, n_train=10, n_test=24)
        images, labels = load_cifar(root, classes, False, splits=('test',))['test']
    export = small_export(tmp_path / 'export', num_classes=100 if dataset == 'cifar100' else 10)
    code, out = run_eval(tmp_path, str(export), '--dataset', dataset, '--data-dir', str(root))
    assert code == 0 and out['images'] == 24 and out['split'] == 'test' and out['source']['kind'] == 'folder'
    assert out['error'] == pytest.approx(direct_error(export, images, labels), abs=1e-9)
    assert out['error'] == pytest.approx(100.0 - out['top1'])


def test_image_folder_goes_through_the_weights_data_config(tmp_path, train_data_writers):
    root = train_data_writers.image_folder(tmp_path / 'data') / 'val'
    export = small_export(tmp_path / 'export')
    code, out = run_eval(tmp_path, str(export), '--dataset', 'imagefolder', '--data-dir', str(root), '--batch-size', '4')
    assert code == 0 and out['images'] == 6 and out['data_config']['input_size'] == [3, 32, 32]
    assert out['split'] == 'validation' and out['dataset_id'] is None and out['card_comparison'] == []


# ------------------------------------------------------------------------------------------------------------
# Sources and the card comparison
# ------------------------------------------------------------------------------------------------------------
def card_with_error(error: float) -> str:
    weight = PublishedWeight(
        model='sd_resnet20_cifar', tag='unit', hub_repo='unit', trained_by='a test', dataset='CIFAR-10',
        dataset_id='cifar10', data_cfg=dict(num_classes=10, input_size=(3, 32, 32), mean=MEAN, std=STD),
        recipe=('none',), train_command='none', stochastic_depth='linear', provenance='a test',
        results=(Result('error', error, 'CIFAR-10', 'test', 32, 'made up'),
                 Result('error', 1.0, 'CIFAR-10', 'test', 64, 'another size: not compared')))
    return render_card(weight)


def test_card_comparison_passes_and_fails_with_the_difference(tmp_path, train_data_writers, capsys):
    root = train_data_writers.cifar(tmp_path / 'data', n_train=10, n_test=24)
    _, plain = run_eval(tmp_path, str(small_export(tmp_path / 'plain')), '--dataset', 'cifar10', '--data-dir', str(root))
    exact = small_export(tmp_path / 'exact', card=card_with_error(round(plain['error'], 2)))
    code, out = run_eval(tmp_path, str(exact), '--dataset', 'cifar10', '--data-dir', str(root))
    assert code == 0 and out['passed'] is True and len(out['card_comparison']) == 1
    off = small_export(tmp_path / 'off', card=card_with_error(round(plain['error'] + 5.0, 2)))
    code, out = run_eval(tmp_path, str(off), '--dataset', 'cifar10', '--data-dir', str(root), '--tolerance', '1')
    (row,) = out['card_comparison']
    assert code == 1 and out['passed'] is False and row['difference'] == pytest.approx(-5.0, abs=0.01)
    assert 'difference -5.00 pp, tolerance 1 -> FAIL' in capsys.readouterr().out


def test_hf_hub_id_from_an_offline_cache(tmp_path, monkeypatch, train_data_writers):
    from huggingface_hub import constants
    root = train_data_writers.cifar(tmp_path / 'data', n_train=10, n_test=24)
    export = small_export(tmp_path / 'export', card=card_with_error(50.0))
    oid = publishing.publish(export, 'sd-zoo-test/eval-unit', api=publishing.LocalHubCache(tmp_path / 'cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    code, out = run_eval(tmp_path, 'hf-hub:sd-zoo-test/eval-unit', '--dataset', 'cifar10', '--data-dir', str(root),
                         '--tolerance', '100')
    assert code == 0 and out['source']['revision'] == oid and out['source']['hub_id'] == 'sd-zoo-test/eval-unit'
    assert out['card_comparison'][0]['source'].endswith(f'snapshots/{oid}/README.md')


# ------------------------------------------------------------------------------------------------------------
# Random depth: the paper's ensemble view
# ------------------------------------------------------------------------------------------------------------
def test_depth_samples_are_the_networks_their_gates_say(tmp_path, train_data_writers):
    from sd_zoo.datasets import load_cifar
    root = train_data_writers.cifar(tmp_path / 'data', n_train=10, n_test=24)
    images, labels = load_cifar(root, 10, False, splits=('test',))['test']
    export = small_export(tmp_path / 'export')
    code, out = run_eval(tmp_path, str(export), '--dataset', 'cifar10', '--data-dir', str(root),
                         '--depth-samples', '3', '--seed', '5')
    ds = out['depth_samples']
    assert code == 0 and ds['samples'] == 3 and ds['num_blocks'] == 9 and len(ds['member_active']) == 3
    assert ds['ensemble_error_by_members'][0] == ds['member_errors'][0] and ds['ensemble_error'] == \
        ds['ensemble_error_by_members'][-1]
    assert len({tuple(a) for a in ds['member_active']}) > 1  # different networks
    model = load_pretrained(str(export))[0]
    survival = model.stochastic_depth.survival
    x = (images.float() / 255 - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    probs = torch.zeros(len(labels), 10)
    with torch.no_grad():
        for active, error in zip(ds['member_active'], ds['member_errors']):
            h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
            for block, keep, p in zip(model.sd_blocks(), active, survival):  # the gates, applied by hand
                h = block.combine(h, 1.0 / p if keep else 0.0)
            member = model.forward_head(h).softmax(1)
            probs += member
            assert error == pytest.approx(100.0 * int((member.argmax(1) != labels).sum()) / len(labels), abs=1e-9)
    assert ds['ensemble_error'] == pytest.approx(100.0 * int((probs.argmax(1) != labels).sum()) / len(labels), abs=1e-9)
    _, again = run_eval(tmp_path, str(export), '--dataset', 'cifar10', '--data-dir', str(root),
                        '--depth-samples', '3', '--seed', '5')
    assert again['depth_samples']['member_active'] == ds['member_active']  # seeded


# ------------------------------------------------------------------------------------------------------------
# Clear errors, and the command forms
# ------------------------------------------------------------------------------------------------------------
def test_errors_name_the_problem(tmp_path, train_data_writers, capsys):
    root = train_data_writers.cifar(tmp_path / 'data', num_classes=100, n_train=10, n_test=24)
    assert run_eval(tmp_path, 'sd_resnet20_cifar.nope', '--dataset', 'cifar10')[0] == 2
    assert 'sd_resnet20_cifar.fashion_mnist' in capsys.readouterr().err  # what is published instead
    assert run_eval(tmp_path, str(tmp_path / 'none.safetensors'), '--dataset', 'cifar10')[0] == 2
    assert 'no such file or folder' in capsys.readouterr().err
    export = small_export(tmp_path / 'export')
    assert run_eval(tmp_path, str(export), '--dataset', 'cifar100', '--data-dir', str(root))[0] == 2
    assert 'has 10 classes but cifar100 has 100' in capsys.readouterr().err
    constant = small_export(tmp_path / 'constant', drop_path_rate=0.0)
    code, _ = run_eval(tmp_path, str(constant), '--dataset', 'cifar100', '--data-dir', str(root), '--depth-samples', '2')
    assert code == 2


def test_module_form_runs():
    proc = subprocess.run([sys.executable, '-m', 'sd_zoo.evaluate', '--help'], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and '--depth-samples' in proc.stdout and 'sd-zoo-eval' in proc.stdout


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize('export, error', [('export', 20.25), ('export_constant_depth', 16.84)])
def test_resnet110_exports_reproduce_their_cards(tmp_path, export, error):
    """Both arms of the pre-registered ResNet-110 experiment, evaluated from their committed exports."""
    folder = ROOT / 'results' / 'fashion_mnist_resnet110' / export
    code, out = run_eval(tmp_path, str(folder), '--dataset', 'fashion_mnist')
    assert code == 0 and out['passed'] is True and out['images'] == 10000
    (row,) = out['card_comparison']
    assert row['value'] == error and abs(out['error'] - error) < 1e-9
