"""Fine-tuning from the zoo (issue 14): ``--pretrained`` in the training scripts starts from a local export or an
offline Hub cache, adapts the head and the first convolution as timm does and says so, records the starting point
in results.json, the exported weights and the card, resumes exactly, and fails clearly on bad sources."""
import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import sd_zoo  # noqa: F401
from sd_zoo import hub, publishing
from sd_zoo.sources import create_from_pretrained, load_pretrained
from training import cifar, imagenet

SYNTHETIC = ['--preset', 'finetune_small', '--dataset', 'synthetic', '--limit', '64', '--val-size', '32',
             '--batch-size', '16', '--epochs', '1', '--no-progress', '--log-with', 'none']
ORG = 'sd-zoo-test'


def pretrained_like(in_chans: int = 1, num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """sd_resnet20_cifar with non-trivial BatchNorm state, as if trained (so a wrong transfer shows)."""
    torch.manual_seed(1)
    model = timm.create_model('sd_resnet20_cifar', in_chans=in_chans, num_classes=num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_export(path: Path, in_chans: int = 1, num_classes: int = 10, **kwargs) -> Path:
    model = pretrained_like(in_chans, num_classes, **kwargs)
    size = (in_chans, 28, 28) if in_chans == 1 else (in_chans, 32, 32)
    return hub.export_model(model, path, '# test export\n', tag='src',
                            data_config=dict(input_size=size, mean=(0.5,) * in_chans, std=(0.25,) * in_chans))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp('src') / 'export')


# ------------------------------------------------------------------------------------------------------------
# The transfer itself
# ------------------------------------------------------------------------------------------------------------
def test_new_head_and_channels_are_adapted_like_timm(export):
    source, _ = load_pretrained(str(export))
    torch.manual_seed(7)
    model, start = create_from_pretrained(str(export), num_classes=5, in_chans=3)
    torch.manual_seed(7)
    scratch = timm.create_model('sd_resnet20_cifar', num_classes=5, in_chans=3)
    src, new = source.state_dict(), model.state_dict()
    assert set(src) == set(new)
    for key in src:
        if key.startswith(('fc.', 'conv1.')):
            continue
        assert torch.equal(src[key], new[key]), key
    torch.testing.assert_close(new['conv1.weight'], src['conv1.weight'].repeat(1, 3, 1, 1) / 3)
    # the head keeps the initialisation a run from scratch with the same seed draws (loading used no global RNG)
    assert torch.equal(new['fc.weight'], scratch.state_dict()['fc.weight']) and new['fc.weight'].shape == (5, 64)
    assert any('head re-initialised: fc has 10 classes' in c for c in start.changes)
    assert any('first convolution adapted: conv1 takes 1 input channel(s)' in c and '3 here' in c
               for c in start.changes)
    x = torch.rand(2, 1, 28, 28)  # a grey image given as three equal channels: the same features
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x.repeat(1, 3, 1, 1)), source.forward_features(x))


def test_rgb_weights_into_a_grey_network_sum_the_channels(tmp_path):
    rgb = make_export(tmp_path / 'rgb', in_chans=3)
    source, _ = load_pretrained(str(rgb))
    model, start = create_from_pretrained(str(rgb), in_chans=1)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert start.changes == [c for c in start.changes if 'summed over the input channels' in c] and start.changes


# ------------------------------------------------------------------------------------------------------------
# The training scripts
# ------------------------------------------------------------------------------------------------------------
def test_finetune_from_local_export_records_where_it_started(export, tmp_path, capsys):
    out = tmp_path / 'run'
    res = cifar.main(SYNTHETIC + ['--pretrained', str(export), '--output-dir', str(out)])
    printed = capsys.readouterr().out
    assert 'starting from sd_resnet20_cifar.src' in printed and 'first convolution adapted' in printed
    start = res['run']['pretrained']
    assert start['kind'] == 'folder' and start['sha256'] == sha256(export / 'model.safetensors')
    assert res['settings']['model'] == 'sd_resnet20_cifar' and res['settings']['drop_path_rate'] == 0.1
    assert res['settings']['lr'] == 0.003 and res['settings']['weight_decay'] == 0.0  # BiT-HyperRule
    assert json.loads((out / 'results.json').read_text())['run']['pretrained'] == start
    config = json.loads((out / 'best_model' / 'config.json').read_text())
    assert config['sd_zoo']['training']['pretrained']['sha256'] == start['sha256']
    card = (publishing.export_run(out, tmp_path / 'final', tag='ft', suggest_entry=False) / 'README.md').read_text()
    assert f'sha256 `{start["sha256"]}`' in card and 'fine-tuned from: `sd_resnet20_cifar.src`' in card
    assert f'--pretrained {export}' in card  # the rebuilt training command


def test_finetune_from_offline_hub_cache_with_new_class_count(export, tmp_path, monkeypatch, train_data_writers):
    from huggingface_hub import constants
    oid = publishing.publish(export, f'{ORG}/ft-src', api=publishing.LocalHubCache(tmp_path / 'cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    data = train_data_writers.cifar(tmp_path / 'cifar100', num_classes=100, n_train=300, n_test=16)
    res = cifar.main(SYNTHETIC + ['--dataset', 'cifar100', '--data-dir', str(data), '--max-steps', '2',
                                  '--pretrained', f'hf-hub:{ORG}/ft-src', '--output-dir', str(tmp_path / 'run')])
    start = res['run']['pretrained']
    assert (start['kind'], start['hub_id'], start['revision']) == ('hf-hub', f'{ORG}/ft-src', oid)
    assert start['sha256'] == sha256(export / 'model.safetensors')
    assert any('fc has 10 classes' in c and '100 here' in c for c in start['changes'])
    assert any('first convolution adapted' in c for c in start['changes'])
    state = load_file(str(tmp_path / 'run' / 'checkpoints' / 'step_00000002' / 'model.safetensors'))
    assert state['fc.weight'].shape == (100, 64) and state['conv1.weight'].shape[1] == 3


def test_imagenet_script_finetunes_on_your_image_folder(tmp_path, train_data_writers):
    rgb = make_export(tmp_path / 'rgb', in_chans=3)
    images = train_data_writers.image_folder(tmp_path / 'images')  # train/ and val/, two classes
    res = imagenet.main(['--preset', 'finetune_imagenet', '--pretrained', str(rgb), '--data-dir', str(images),
                         '--batch-size', '2', '--eval-batch-size', '3', '--workers', '0', '--max-steps', '1',
                         '--no-progress', '--log-with', 'none', '--output-dir', str(tmp_path / 'run')])
    assert res['status'] == 'max_steps' and res['settings']['dataset'] == 'imagenet'
    (change,) = res['run']['pretrained']['changes']
    assert 'fc has 10 classes' in change and '2 here' in change


def _checkpoint(out: Path, step: int):
    return load_file(str(out / 'checkpoints' / f'step_{step:08d}' / 'model.safetensors'))


def test_resumed_finetuning_equals_uninterrupted(export, tmp_path):
    args = SYNTHETIC + ['--pretrained', str(export), '--checkpoint-every', '1', '--eval-batch-size', '64']
    cifar.main(args + ['--output-dir', str(tmp_path / 'full')])  # one epoch: 4 steps
    first = cifar.main(args + ['--max-steps', '2', '--output-dir', str(tmp_path / 'part')])
    assert first['status'] == 'max_steps'
    second = cifar.main(args + ['--resume', 'latest', '--output-dir', str(tmp_path / 'part')])
    assert second['resumed_from'].endswith('step_00000002') and second['global_step'] == 4
    assert second['run']['pretrained']['sha256'] == first['run']['pretrained']['sha256']
    full, part = _checkpoint(tmp_path / 'full', 4), _checkpoint(tmp_path / 'part', 4)
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    start = load_pretrained(str(export))[0].state_dict()
    assert not torch.equal(full['layer3.2.conv2.weight'], start['layer3.2.conv2.weight'])  # it did train


def test_resume_with_another_starting_point_is_refused(export, tmp_path, capsys):
    args = SYNTHETIC + ['--max-steps', '1', '--checkpoint-every', '1', '--output-dir', str(tmp_path)]
    cifar.main(args + ['--pretrained', str(export)])
    with pytest.raises(SystemExit) as info:
        cifar.main(args + ['--pretrained', str(export / 'model.safetensors'), '--resume', 'latest'])
    err = capsys.readouterr().err  # a refused setting is a usage error (exit 2, message on stderr)
    assert info.value.code == 2 and 'other settings' in err and '--pretrained' in err


# ------------------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------------------
def _error(capsys, out: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as info:  # out: the test's own folder (a shared path collides across runs)
        cifar.main(SYNTHETIC + ['--output-dir', str(out), *extra])
    assert info.value.code not in (0, None)
    return capsys.readouterr().err + str(info.value.code)


def test_unknown_tag_missing_file_and_wrong_architecture_are_named(export, tmp_path, capsys):
    out = tmp_path / 'never-written'
    err = _error(capsys, out, '--pretrained', 'sd_resnet20_cifar.no_such_tag')
    assert 'no_such_tag' in err and 'sd_resnet20_cifar.fashion_mnist' in err  # what exists instead
    err = _error(capsys, out, '--pretrained', 'no_such_model_or_tag')
    assert 'neither a registered model or tag' in err
    err = _error(capsys, out, '--pretrained', str(tmp_path / 'missing' / 'model.safetensors'))
    assert 'no such file or folder' in err and str(tmp_path / 'missing') in err
    err = _error(capsys, out, '--pretrained', str(export), '--model', 'sd_resnet32_cifar')
    assert 'holds sd_resnet20_cifar weights, not sd_resnet32_cifar' in err
    save_file(timm.create_model('sd_resnet32_cifar').state_dict(), str(tmp_path / 'r32.safetensors'))
    err = _error(capsys, out, '--pretrained', str(tmp_path / 'r32.safetensors'), '--model', 'sd_resnet20_cifar')
    assert 'do not match sd_resnet20_cifar' in err and 'unexpected keys' in err
    err = _error(capsys, out, '--pretrained', str(tmp_path / 'r32.safetensors'))
    assert 'pass --model' in err
    assert 'give --pretrained' in _error(capsys, out)  # a fine-tuning preset without weights
