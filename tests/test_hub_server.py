"""Downloads over real HTTP: the real huggingface_hub client and timm against a local olah Hub server."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import sd_zoo  # noqa: F401  (registers the sd_ models)
from training.hub_server import HubServerError, LocalHubServer, olah_available

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_EXPORT = REPO_ROOT / 'results' / 'fashion_mnist' / 'export'


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    reason = olah_available()
    if reason:
        pytest.skip(f'local Hub server unavailable: {reason}')
    server = LocalHubServer(tmp_path_factory.mktemp('hub'))
    try:
        server.start()
    except HubServerError as e:
        pytest.skip(f'local Hub server did not start: {e}')
    yield server
    server.stop()
    assert server.process.poll() is not None, 'olah is still running after stop()'


def _assert_same_weights(model: torch.nn.Module, file: Path) -> None:
    expected, loaded = load_file(str(file)), model.state_dict()
    assert expected.keys() == loaded.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key].to(value.dtype), value), key


def test_registered_tag_downloads_over_http(hub, tmp_path):
    weight = timm.models.get_pretrained_cfg('sd_resnet20_cifar.fashion_mnist')
    commit = hub.add_repo(weight.hf_hub_id.split('@')[0], FASHION_EXPORT)
    cache = tmp_path / 'cache'
    with hub.client(cache):
        model = timm.create_model('sd_resnet20_cifar.fashion_mnist', pretrained=True)
    _assert_same_weights(model, FASHION_EXPORT / 'model.safetensors')
    repo_dir = cache / ('models--' + weight.hf_hub_id.split('@')[0].replace('/', '--'))
    assert (repo_dir / 'snapshots' / commit / 'model.safetensors').is_file()  # came through the HTTP client
    assert (repo_dir / 'refs' / 'main').read_text().strip() == commit
    assert 'resolve/main/model.safetensors' in (hub.root / 'olah.log').read_text()


def test_hf_hub_id_and_missing_file_fall_back_like_the_hub(hub, tmp_path):
    """Only a pickle in the repository: timm asks for model.safetensors first (404), then pytorch_model.bin."""
    model = timm.create_model('sd_resnet20_cifar', num_classes=10, in_chans=1)
    torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
    config = json.loads((FASHION_EXPORT / 'config.json').read_text())
    config['pretrained_cfg'].pop('hf_hub_filename', None)  # no file named: timm's own order applies
    (tmp_path / 'config.json').write_text(json.dumps(config))
    hub.add_repo('someone/pickled-fashion', {'pytorch_model.bin': tmp_path / 'pytorch_model.bin',
                                             'config.json': tmp_path / 'config.json'})
    with hub.client(tmp_path / 'cache'):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        with pytest.raises(EntryNotFoundError):
            hf_hub_download('someone/pickled-fashion', 'model.safetensors')
        loaded = timm.create_model('hf-hub:someone/pickled-fashion', pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_repository_is_a_clear_error(hub, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError
    with hub.client(tmp_path / 'cache'), pytest.raises(RepositoryNotFoundError):
        timm.create_model('hf-hub:sd-zoo/does-not-exist', pretrained=True)


@pytest.mark.slow
def test_sd_resnet152_default_tag_downloads_under_timms_repo_id(hub, tmp_path):
    """The default tag points at timm's own repository: served with weights of the right shapes (seeded, fp16 to
    keep the file at 120 MB), it loads strictly into sd_resnet152."""
    cfg = timm.models.get_pretrained_cfg('sd_resnet152')
    repo_id = cfg.hf_hub_id.split('@')[0]
    assert repo_id.startswith('timm/resnet152.')
    torch.manual_seed(0)
    reference = timm.create_model('resnet152')  # timm's own ResNet: the keys and shapes timm publishes
    weights = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    save_file(weights, str(tmp_path / 'model.safetensors'))
    hub.add_repo(repo_id, {'model.safetensors': tmp_path / 'model.safetensors'})
    with hub.client(tmp_path / 'cache'):
        model = timm.create_model('sd_resnet152', pretrained=True)
    _assert_same_weights(model, tmp_path / 'model.safetensors')


def test_add_repo_rejects_bad_ids(tmp_path):
    server = LocalHubServer(tmp_path)
    with pytest.raises(HubServerError, match='expected "org/name"'):
        server.add_repo('no-org', {'a.txt': b'x'})
    with pytest.raises(HubServerError, match='no files'):
        server.add_repo('org/empty', {})


def test_a_relative_root_works_from_the_server_cwd(tmp_path, monkeypatch):
    """`make demo` passes runs/demo/hub: olah runs with its cwd in the root, so every path must be absolute."""
    monkeypatch.chdir(tmp_path)
    server = LocalHubServer('runs/demo/hub')
    assert server.root == tmp_path / 'runs' / 'demo' / 'hub'
    server.root.mkdir(parents=True)
    config = server._write_config()
    assert config.is_absolute() and f'repos-path = "{tmp_path}' in config.read_text()
