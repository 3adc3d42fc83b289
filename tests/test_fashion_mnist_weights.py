"""The project's own trained weights (issue: first real results): the committed Fashion-MNIST export loads
offline through ``timm.create_model('sd_resnet20_cifar.fashion_mnist', pretrained=True)`` and is really trained."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from sd_zoo import publishing
from sd_zoo.pretrained import find_weight

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / 'results' / 'fashion_mnist' / 'export'
NAME = 'sd_resnet20_cifar.fashion_mnist'
FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture
def seeded_offline_cache(monkeypatch, tmp_path):
    """A Hub cache holding the committed export under the registered repo id, with the network off."""
    from huggingface_hub import constants
    weight = find_weight(NAME)
    publishing.publish(EXPORT, weight.repo_id, api=publishing.LocalHubCache(tmp_path / 'cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    return weight


def test_registered_tag_loads_the_committed_export_bit_identically(seeded_offline_cache):
    model = timm.create_model(NAME, pretrained=True)
    exported = load_file(str(EXPORT / 'model.safetensors'))
    state = model.state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    assert model.in_chans == 1 and model.num_classes == 10
    assert timm.create_model('sd_resnet20_cifar').pretrained_cfg['input_size'] == (3, 32, 32)  # default untouched


def test_export_records_the_run_it_came_from():
    config = json.loads((EXPORT / 'config.json').read_text())
    results = json.loads((ROOT / find_weight(NAME).run_dir / 'results.json').read_text())
    assert config['architecture'] == 'sd_resnet20_cifar'
    assert config['model_args']['drop_path_rate'] == pytest.approx(0.5)
    assert config['sd_zoo']['results']['test_error_at_best_val'] == results['test_error_at_best_val']


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason='needs the Debian package dataset-fashion-mnist')
def test_loaded_weights_classify_real_fashion_mnist(seeded_offline_cache):
    from training.data import read_idx
    images = read_idx(FASHION_MNIST / 't10k-images-idx3-ubyte.gz')[:1000].float().div(255).unsqueeze(1)
    labels = read_idx(FASHION_MNIST / 't10k-labels-idx1-ubyte.gz')[:1000].long()
    model = timm.create_model(NAME, pretrained=True).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        error = (model((images - cfg['mean'][0]) / cfg['std'][0]).argmax(1) != labels).float().mean().item()
    results = json.loads((ROOT / find_weight(NAME).run_dir / 'results.json').read_text())
    assert error == pytest.approx(results['test_error_at_best_val'], abs=0.03)  # 1,000 of the 10,000 test images
