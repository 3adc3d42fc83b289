"""Nothing lost, nothing mixed up on the Hub side: the export guard, sha256 of weight files recorded at export and
checked on load (local files, the Hub cache's copies, LFS blob names), and best_model/ agreeing with results.json."""
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sd_zoo  # noqa: F401
from sd_zoo import cli, hub, publishing

REPO = 'sd-zoo-test/sd_resnet20_cifar.integrity'


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    """Flip one byte of ``path`` near its end: tensor data, not the safetensors header."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def small_export(tmp_path):
    model = timm.create_model('sd_resnet20_cifar').eval()
    return hub.export_model(model, tmp_path / 'export', '# card\n')


# ------------------------------------------------------------------------------------------------------------
# Export guard
# ------------------------------------------------------------------------------------------------------------
def make_run_folder(run: Path) -> dict:
    (run / 'checkpoints' / 'step_00000004').mkdir(parents=True)
    (run / 'checkpoints' / 'step_00000004' / 'model.safetensors').write_bytes(b'x' * 1000)
    (run / 'results.json').write_text('{"status": "completed"}')
    (run / 'metrics.csv').write_text('epoch\n1\n')
    return {p: p.read_bytes() for p in run.rglob('*') if p.is_file()}


def test_export_never_replaces_a_run_folder(tmp_path, capsys):
    run = tmp_path / 'run'
    before = make_run_folder(run)
    model = timm.create_model('sd_resnet20_cifar')
    for overwrite in (False, True):
        with pytest.raises(hub.ExportTargetError, match='holds a training run'):
            hub.export_model(model, run, '# card\n', overwrite=overwrite)
    # the parent of runs is protected as well
    with pytest.raises(hub.ExportTargetError, match='run/results.json'):
        hub.export_model(model, tmp_path, '# card\n', overwrite=True)
    assert cli.main(['export', '--run', str(run), '--out', str(run), '--overwrite']) == 2
    assert 'holds a training run' in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob('*') if p.is_file()} == before


def test_export_refuses_a_folder_of_other_files_unless_overwrite(tmp_path):
    notes = tmp_path / 'notes'
    notes.mkdir()
    (notes / 'ideas.txt').write_text('keep me')
    model = timm.create_model('sd_resnet20_cifar')
    with pytest.raises(hub.ExportTargetError, match=r"ideas.txt.*--overwrite"):
        hub.export_model(model, notes, '# card\n')
    assert (notes / 'ideas.txt').read_text() == 'keep me'
    hub.export_model(model, notes, '# card\n', overwrite=True)
    assert sorted(p.name for p in notes.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_export_replaces_a_previous_export_and_an_empty_folder(tmp_path, small_export):
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.2)
    hub.export_model(model, small_export, '# second\n')  # a previous export: no flag needed
    assert (small_export / 'README.md').read_text().startswith('# second')
    (tmp_path / 'empty').mkdir()
    hub.export_model(model, tmp_path / 'empty', '# card\n')
    # a previous export with a stray file is no longer recognised
    (small_export / 'notes.txt').write_text('mine')
    with pytest.raises(hub.ExportTargetError, match='notes.txt'):
        hub.export_model(model, small_export, '# third\n')


# ------------------------------------------------------------------------------------------------------------
# sha256 recorded at export, checked on load
# ------------------------------------------------------------------------------------------------------------
def test_export_records_sha256_in_config_and_card(small_export):
    weights = small_export / 'model.safetensors'
    digest = hub.file_sha256(weights)
    config = json.loads((small_export / 'config.json').read_text())
    assert config['sd_zoo']['files']['model.safetensors'] == {'sha256': digest, 'bytes': weights.stat().st_size}
    assert digest in (small_export / 'README.md').read_text()
    assert hub.verify_file(weights) is True


def test_flipped_byte_in_exported_weights_is_refused(small_export):
    weights = small_export / 'model.safetensors'
    flip_byte(weights)
    model = timm.create_model('sd_resnet20_cifar')
    with pytest.raises(hub.IntegrityError, match=r'model.safetensors is corrupted: its sha256 is [0-9a-f]{64}'):
        hub.load_weights(model, weights)


def test_export_without_records_loads_unverified(small_export):
    """Exports written before sha256 records existed still load (unverified, accepted)."""
    config = json.loads((small_export / 'config.json').read_text())
    del config['sd_zoo']['files']
    (small_export / 'config.json').write_text(json.dumps(config))
    assert hub.expected_sha256(small_export / 'model.safetensors') is None
    assert hub.verify_file(small_export / 'model.safetensors') is False
    hub.load_weights(timm.create_model('sd_resnet20_cifar'), small_export / 'model.safetensors')


def offline(monkeypatch, cache: Path) -> None:
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)


def test_flipped_byte_in_hub_cache_is_refused(tmp_path, small_export, monkeypatch):
    cache = tmp_path / 'cache'
    oid = publishing.publish(small_export, REPO, api=publishing.LocalHubCache(cache))
    offline(monkeypatch, cache)
    model = hub.create_model(f'hf-hub:{REPO}', pretrained=True)
    cached = cache / f'models--{REPO.replace("/", "--")}' / 'snapshots' / oid / 'model.safetensors'
    assert hub.verify_loaded_weights(model) == cached
    flip_byte(cached)
    with pytest.raises(hub.IntegrityError, match='corrupted'):
        hub.create_model(f'hf-hub:{REPO}', pretrained=True)


def test_plain_timm_create_model_checks_the_sha256_too(tmp_path, small_export, monkeypatch):
    """timm.create_model itself (no sd_zoo loader around it) refuses weights whose bytes changed: the sd_
    entrypoint checks the file it loaded."""
    cache = tmp_path / 'cache'
    oid = publishing.publish(small_export, REPO, api=publishing.LocalHubCache(cache))
    offline(monkeypatch, cache)
    cached = cache / f'models--{REPO.replace("/", "--")}' / 'snapshots' / oid / 'model.safetensors'
    reference = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    flip_byte(cached)
    with pytest.raises(hub.IntegrityError, match=r'model.safetensors is corrupted: its sha256 is [0-9a-f]{64}'):
        timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    with pytest.raises(hub.IntegrityError, match='corrupted'):
        timm.create_model(f'hf-hub:{REPO}', pretrained=True, features_only=True)
    # the check is on the bytes: the same file, still readable, loads different weights without it
    changed = load_file(str(cached))
    assert any(not torch.equal(changed[k], v) for k, v in reference.state_dict().items() if k in changed)


def test_lfs_blob_name_is_the_sha256_checked(tmp_path, small_export, monkeypatch):
    """A real Hub cache keeps LFS files as blobs/<sha256> with snapshot symlinks: that name is checked too
    (here the config.json carries no record, as for weights exported by other tools)."""
    cache = tmp_path / 'cache'
    oid = publishing.publish(small_export, REPO, api=publishing.LocalHubCache(cache))
    repo = cache / f'models--{REPO.replace("/", "--")}'
    snapshot = repo / 'snapshots' / oid
    config = json.loads((snapshot / 'config.json').read_text())
    del config['sd_zoo']['files']
    (snapshot / 'config.json').write_text(json.dumps(config))
    digest = hub.file_sha256(snapshot / 'model.safetensors')
    (repo / 'blobs').mkdir()
    shutil.move(snapshot / 'model.safetensors', repo / 'blobs' / digest)
    os.symlink(f'../../blobs/{digest}', snapshot / 'model.safetensors')
    offline(monkeypatch, cache)
    model = hub.create_model(f'hf-hub:{REPO}', pretrained=True)
    assert hub.verify_loaded_weights(model) is not None
    flip_byte(repo / 'blobs' / digest)
    with pytest.raises(hub.IntegrityError, match=digest):
        hub.create_model(f'hf-hub:{REPO}', pretrained=True)


def test_unknown_architecture_in_hub_config_is_named(tmp_path, small_export, monkeypatch):
    config = json.loads((small_export / 'config.json').read_text())
    config['architecture'] = 'sd_resnet_nonexistent'
    (small_export / 'config.json').write_text(json.dumps(config))
    cache = tmp_path / 'cache'
    publishing.publish(small_export, REPO, api=publishing.LocalHubCache(cache))
    offline(monkeypatch, cache)
    with pytest.raises(hub.PretrainedWeightsError, match=r"sd_resnet_nonexistent.*architecture.*config.json"):
        hub.create_model(f'hf-hub:{REPO}', pretrained=True)


# ------------------------------------------------------------------------------------------------------------
# A run's best_model/ must be the best epoch of its results.json
# ------------------------------------------------------------------------------------------------------------
def test_export_run_refuses_best_weights_of_another_epoch(tmp_path):
    run = tmp_path / 'run'
    model = timm.create_model('sd_resnet20_cifar', in_chans=1)
    hub.export_model(model, run / 'best_model', '# best\n', metadata=dict(training=dict(epoch=1)))
    (run / 'results.json').write_text(json.dumps(dict(
        status='completed', best_epoch=2, run=dict(model='sd_resnet20_cifar', dataset='fashion_mnist'),
        settings=dict(model='sd_resnet20_cifar', dataset='fashion_mnist', drop_path_rate=0.5))))
    with pytest.raises(ValueError, match=r'epoch 1, results.json reports epoch 2.*--resume latest'):
        publishing.export_run(run, tmp_path / 'out', tag='t', suggest_entry=False)
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------------------
# Scaling travels with the weights
# ------------------------------------------------------------------------------------------------------------
def test_test_scaled_state_dict_is_refused_by_a_train_scaled_or_timm_model():
    from sd_zoo.stochastic_depth import SCALING_KEY
    test_scaled = timm.create_model('sd_resnet20_cifar', drop_path_scaling='test', drop_path_rate=0.5)
    state = test_scaled.state_dict()
    assert SCALING_KEY in state
    with pytest.raises(ValueError, match=r"drop_path_scaling='test' model.*fold_test_scaling"):
        timm.create_model('sd_resnet20_cifar', drop_path_rate=0.5).load_state_dict(state)
    with pytest.raises(RuntimeError, match=SCALING_KEY):  # timm's plain ResNet: an unexpected key
        timm.create_model('resnet18').load_state_dict(state)
    twin = timm.create_model('sd_resnet20_cifar', drop_path_scaling='test', drop_path_rate=0.5)
    twin.load_state_dict(state)  # the same scaling loads strictly, the key consumed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), test_scaled.eval()(x))


def test_train_scaled_state_dict_is_unchanged_and_loads_into_timm():
    from sd_zoo.stochastic_depth import SCALING_KEY
    model = timm.create_model('sd_resnet50')
    state = model.state_dict()
    assert SCALING_KEY not in state
    timm.create_model('resnet50').load_state_dict(state, strict=True)
    folded = timm.create_model('sd_resnet20_cifar', drop_path_scaling='test')
    from sd_zoo.stochastic_depth import fold_test_scaling
    assert SCALING_KEY not in fold_test_scaling(folded).state_dict()
