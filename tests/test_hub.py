"""Hub export, publishing, offline loading through timm, safe loading errors, and the model cards."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from timm.models import PretrainedCfg

import sd_zoo
from sd_zoo import cli, hub, pretrained, publishing
from sd_zoo.cards import CARD_TAGS, card_filename, render_card
from sd_zoo.pretrained import PublishedWeight, Result

ROOT = Path(__file__).resolve().parents[1]
ORG = 'sd-zoo-test'
TAG = 'unit'
NAME = f'sd_resnet20_cifar.{TAG}'
REPO = f'{ORG}/{NAME}'


def unit_weight(**overrides) -> PublishedWeight:
    fields = dict(
        model='sd_resnet20_cifar', tag=TAG, hub_repo=NAME, trained_by='the test suite', dataset='CIFAR-10',
        dataset_id='cifar10', data_cfg=dict(num_classes=10, input_size=(3, 32, 32)), recipe=('a few random steps',),
        train_command='pytest tests/test_hub.py', stochastic_depth='linear, p_L = 0.7', provenance='made by a test',
        results=(Result('error', 90.0, 'CIFAR-10', 'test', 32, 'not measured'),))
    fields.update(overrides)
    return PublishedWeight(**fields)


@contextlib.contextmanager
def registered(weight: PublishedWeight):
    """Register ``weight`` with timm for the block only, so other tests see the shipped registry."""
    pretrained.register_weight(weight)
    try:
        yield weight
    finally:
        pretrained.unregister_weight(weight.name)


def trained_like_model() -> torch.nn.Module:
    """sd_resnet20_cifar in the paper's test scaling with non-trivial BatchNorm state (so folding matters)."""
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.3, drop_path_scaling='test')
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """One export + one publish into a stand-in Hub cache, shared by the round-trip tests."""
    tmp = tmp_path_factory.mktemp('hub')
    model = trained_like_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    out = hub.export_model(model, tmp / 'export', render_card(unit_weight()), tag=TAG)
    oid = publishing.publish(out, REPO, api=publishing.LocalHubCache(tmp / 'cache'))
    torch.save({'x': x, 'y': y}, tmp / 'io.pt')
    return dict(tmp=tmp, out=out, oid=oid, model=model, x=x, y=y)


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------
def test_export_writes_safetensors_timm_config_and_card(exported):
    out = exported['out']
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'sd_resnet20_cifar' and config['num_classes'] == 10
    PretrainedCfg(**config['pretrained_cfg'])  # timm rejects unknown keys here: ours sit at the top level
    assert config['pretrained_cfg']['tag'] == TAG
    assert config['pretrained_cfg']['hf_hub_filename'] == 'model.safetensors'
    args = config['model_args']
    assert (args['drop_path_rate'], args['drop_path_schedule'], args['drop_path_mode'], args['drop_path_scaling']) == \
        (pytest.approx(0.3), 'linear', 'block', 'train')
    assert config['sd_zoo']['survival_probabilities'] == pytest.approx(exported['model'].stochastic_depth.survival)


def test_export_folds_to_train_scaling_without_changing_outputs(exported):
    model = exported['model']
    assert model.stochastic_depth.scaling == 'test'  # the export worked on a copy
    rebuilt = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.3).eval()
    rebuilt.load_state_dict(load_file(str(exported['out'] / 'model.safetensors')), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(exported['x']), exported['y'], rtol=1e-5, atol=1e-5)
    norm = next(iter(model.sd_blocks())).bn2.weight
    assert not torch.equal(rebuilt.layer1[0].bn2.weight, norm)  # p_l was folded into the last BatchNorm


def test_train_scaled_export_loads_into_timms_plain_resnet(tmp_path):
    model = timm.create_model('sd_resnet50', drop_path_scaling='test', zero_init_last=False).eval()
    out = hub.export_model(model, tmp_path / 'r50', '# card\n', tag='x')
    plain = timm.create_model('resnet50').eval()
    plain.load_state_dict(load_file(str(out / 'model.safetensors')), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-4)


def test_failed_export_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    model = timm.create_model('sd_resnet20_cifar')
    out = hub.export_model(model, tmp_path / 'export', 'first card\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_writer(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr('timm.models._hub.save_config_for_hf', broken_writer)
    with pytest.raises(OSError, match='disk full'):
        hub.export_model(model, out, 'second card\n')
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']  # no temp folder left behind


# ------------------------------------------------------------------------------------------------------------
# Publish (a stand-in API object that writes the Hub cache layout)
# ------------------------------------------------------------------------------------------------------------
def test_publish_writes_hub_cache_layout(exported):
    repo = exported['tmp'] / 'cache' / f'models--{ORG}--{NAME}'
    oid = exported['oid']
    assert len(oid) == 40 and (repo / 'refs' / 'main').read_text() == oid
    for name in ('model.safetensors', 'config.json', 'README.md'):
        assert (repo / 'snapshots' / oid / name).read_bytes() == (exported['out'] / name).read_bytes()


def test_publish_branch_pr_and_dry_run(tmp_path, capsys):
    out = hub.export_model(timm.create_model('sd_resnet20_cifar'), tmp_path / 'export', '# card\n')
    api = publishing.LocalHubCache(tmp_path / 'cache')
    main = publishing.publish(out, REPO, api=api)
    (out / 'README.md').write_text('# card v2\n')
    branch = publishing.publish(out, REPO, revision='v2', api=api)
    pr = publishing.publish(out, REPO, create_pr=True, api=api)
    refs = tmp_path / 'cache' / f'models--{ORG}--{NAME}' / 'refs'
    assert (refs / 'main').read_text() == main and (refs / 'v2').read_text() == branch
    assert (refs / 'pr' / '1').read_text() == pr and len({main, branch, pr}) == 3
    assert f'{REPO}@{branch}' in capsys.readouterr().out  # the id to pin is printed

    assert publishing.publish(out, REPO, dry_run=True) is None  # no api given: nothing may touch the network
    listing = capsys.readouterr().out
    assert 'model.safetensors' in listing and 'config.json' in listing and 'README.md' in listing


def test_publish_refuses_pickles_and_incomplete_folders(tmp_path):
    out = hub.export_model(timm.create_model('sd_resnet20_cifar'), tmp_path / 'export', '# card\n')
    (out / 'pytorch_model.bin').write_bytes(b'pickle')
    with pytest.raises(ValueError, match='pickle'):
        publishing.publish(out, REPO, dry_run=True)
    (out / 'pytorch_model.bin').unlink()
    (out / 'README.md').unlink()
    with pytest.raises(FileNotFoundError, match='README.md'):
        publishing.publish(out, REPO, dry_run=True)


# ------------------------------------------------------------------------------------------------------------
# Offline loading through all three create_model forms
# ------------------------------------------------------------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent('''
    import json, sys, torch, timm, sd_zoo
    from safetensors.torch import load_file
    sys.path.insert(0, {tests!r})
    from test_hub import unit_weight
    from sd_zoo.pretrained import register_weight
    register_weight(unit_weight())
    expected = load_file({weights!r})
    io = torch.load({io!r})
    report = {{}}
    for name in ({name!r}, 'sd_resnet20_cifar', 'hf-hub:{repo}'):
        model = timm.create_model(name, pretrained=True).eval()
        state = model.state_dict()
        with torch.no_grad():
            err = (model(io['x']) - io['y']).abs().max().item()
        report[name] = dict(
            identical=state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state),
            max_err=err, hub_id=model.pretrained_cfg.get('hf_hub_id'))
    print(json.dumps(report))
''')


def test_offline_round_trip_through_all_create_model_forms(exported):
    tmp = exported['tmp']
    script = LOAD_SCRIPT.format(tests=str(ROOT / 'tests'), weights=str(exported['out'] / 'model.safetensors'),
                                io=str(tmp / 'io.pt'), name=NAME, repo=REPO)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp / 'cache'), SD_ZOO_HUB_ORG=ORG,
               PYTHONPATH=str(ROOT), SD_ZOO_NO_AUTOIMPORT='1')
    proc = subprocess.run([sys.executable, '-c', script], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {NAME, 'sd_resnet20_cifar', f'hf-hub:{REPO}'}
    for name, result in report.items():
        assert result['identical'], f'{name}: weights differ from the exported file'
        assert result['max_err'] < 1e-5, name
    assert report[NAME]['hub_id'] == REPO  # SD_ZOO_HUB_ORG picked the mirror's organisation


# ------------------------------------------------------------------------------------------------------------
# Clear errors and no pickles
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_unknown_tag_and_untrained_model_name_the_available_weights():
    with pytest.raises(hub.PretrainedWeightsError, match=r"no published weights.*sd_resnet152\.a1h_in1k"):
        hub.create_model('sd_resnet20_cifar.nope', pretrained=True)
    with pytest.raises(hub.PretrainedWeightsError, match='sd_resnet110_cifar has no published weights'):
        hub.create_model('sd_resnet110_cifar', pretrained=True)


def test_file_missing_from_offline_cache_names_repo_and_cache(offline):
    with registered(unit_weight(hub_org=ORG)):
        with pytest.raises(hub.PretrainedWeightsError) as info:
            hub.create_model(NAME, pretrained=True, cache_dir=str(offline))
    message = str(info.value)
    assert REPO in message and 'nothing' in message and 'HF_HUB_OFFLINE' in message


def _cache_with(cache: Path, state: dict) -> None:
    export = cache.parent / 'export'
    export.mkdir(parents=True, exist_ok=True)
    for name, text in (('config.json', '{}'), ('README.md', '# x\n')):
        (export / name).write_text(text)
    save_file(state, str(export / 'model.safetensors'))
    publishing.publish(export, REPO, api=publishing.LocalHubCache(cache))


def test_corrupted_safetensors_in_cache_is_reported(offline):
    _cache_with(offline, timm.create_model('sd_resnet20_cifar').state_dict())
    snapshot = next((offline / f'models--{ORG}--{NAME}' / 'snapshots').iterdir())
    (snapshot / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"broken":')
    with registered(unit_weight(hub_org=ORG)):
        with pytest.raises(hub.PretrainedWeightsError, match='corrupted'):
            hub.create_model(NAME, pretrained=True, cache_dir=str(offline))


def test_mismatched_keys_are_reported(offline, tmp_path):
    wrong = timm.create_model('sd_resnet32_cifar').state_dict()
    _cache_with(offline, wrong)
    with registered(unit_weight(hub_org=ORG)):
        with pytest.raises(hub.PretrainedWeightsError, match='do not match'):
            hub.create_model(NAME, pretrained=True, cache_dir=str(offline))
    save_file(wrong, str(tmp_path / 'wrong.safetensors'))
    with pytest.raises(hub.PretrainedWeightsError, match=r'unexpected keys \[.layer1\.3'):
        hub.load_weights(timm.create_model('sd_resnet20_cifar'), tmp_path / 'wrong.safetensors')


def test_pickles_load_only_when_asked_and_then_weights_only(tmp_path):
    model = timm.create_model('sd_resnet20_cifar')
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    with pytest.raises(hub.PretrainedWeightsError, match='allow_pickle=True'):
        hub.load_weights(timm.create_model('sd_resnet20_cifar'), tmp_path / 'w.pth')
    loaded = hub.load_weights(timm.create_model('sd_resnet20_cifar'), tmp_path / 'w.pth', allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({'w': torch.zeros(1), 'f': print}, tmp_path / 'evil.pth')  # arbitrary objects: refused
    with pytest.raises(Exception, match='(?i)weights_only|unsupported|global'):
        hub.load_weights(timm.create_model('sd_resnet20_cifar'), tmp_path / 'evil.pth', allow_pickle=True)


# ------------------------------------------------------------------------------------------------------------
# Registry and cards
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('weight', pretrained.published_weights(), ids=lambda w: w.name)
def test_registry_holds_each_published_weight(weight):
    cfg = timm.models.get_pretrained_cfg(weight.name)
    assert cfg.hf_hub_id == weight.hf_hub_id and '/' in cfg.hf_hub_id.split('@')[0]
    assert cfg.hf_hub_filename == 'model.safetensors' and cfg.has_weights
    assert weight.revision is None or (len(weight.revision) == 40 and int(weight.revision, 16) >= 0)
    for key, value in weight.data_cfg.items():
        assert getattr(cfg, key) == value, key


def test_defaults_and_untrained_names():
    assert timm.models.get_pretrained_cfg('sd_resnet152').tag == 'a1h_in1k'
    assert timm.models.get_pretrained_cfg('sd_resnet110_cifar').hf_hub_id is None
    assert isinstance(timm.create_model('sd_resnet110_cifar', pretrained=False), sd_zoo.SDResNet)


def test_hub_org_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv('SD_ZOO_HUB_ORG', 'mirror-org')
    assert unit_weight().hf_hub_id == f'mirror-org/{NAME}'
    assert unit_weight(revision='a' * 40).hf_hub_id == f'mirror-org/{NAME}@{"a" * 40}'
    monkeypatch.delenv('SD_ZOO_HUB_ORG')
    assert unit_weight().repo_id == f'sd-zoo/{NAME}'
    assert pretrained.find_weight('sd_resnet152.a1h_in1k').repo_id == 'timm/resnet152.a1h_in1k'


def test_timm_resnet152_keys_match_sd_resnet152():
    with torch.device('meta'):
        ours = timm.create_model('sd_resnet152', drop_path_seed=0).state_dict()
        theirs = timm.create_model('resnet152').state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


CARDS = sorted((ROOT / 'hub_cards').glob('*.md'))


def test_every_published_weight_has_a_card():
    assert {p.name for p in CARDS} == {card_filename(w) for w in pretrained.published_weights()}


@pytest.mark.parametrize('path', CARDS, ids=lambda p: p.stem)
def test_card_parses_and_agrees_with_the_registry(path):
    card = ModelCard(path.read_text(encoding='utf-8'))
    weight = pretrained.find_weight(path.stem)
    meta = card.data.to_dict()
    cfg = timm.models.get_pretrained_cfg(path.stem)
    assert meta['library_name'] == 'timm' and meta['license'] == cfg.license
    assert set(CARD_TAGS) <= set(meta['tags']) and meta['datasets'] == [weight.dataset_id]
    (entry,) = meta['model-index']
    assert entry['name'] == weight.name
    values = [m['value'] for r in entry['results'] for m in r['metrics']]
    assert values == [r.value for r in weight.results] or weight.run_dir
    assert f"'{weight.name}'" in card.text and cfg.hf_hub_id in card.text


def test_committed_cards_match_their_sources():
    assert publishing.render_all_cards(ROOT / 'hub_cards', check=True) == [], \
        'hub_cards/ is stale: run `python -m tools.cards`'


def test_card_is_honest_about_timms_weights():
    text = (ROOT / 'hub_cards' / 'sd_resnet152.a1h_in1k.md').read_text()
    assert "timm's weights, not trained by sd_zoo" in text and 'not published' in text
    assert 'per-sample' in text and 'timm/resnet152.a1h_in1k' in text


# ------------------------------------------------------------------------------------------------------------
# Export of a training run (the layout training/engine.py writes)
# ------------------------------------------------------------------------------------------------------------
def fake_run(run: Path, drop_path_rate: float = 0.5, test_error: float = 0.0873, wall: float = 600.0) -> None:
    from timm.models import save_for_hf
    model = timm.create_model('sd_resnet20_cifar', in_chans=1, drop_path_rate=drop_path_rate)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(1, 32, 32), mean=(0.286,), std=(0.353,))
    save_for_hf(model, str(run / 'best_model'), safe_serialization=True,
                model_config=dict(pretrained_cfg=dict(input_size=(1, 32, 32), mean=(0.286,), std=(0.353,))),
                model_args=dict(drop_path_scaling='train'))
    results = dict(status='finished', run=dict(model='sd_resnet20_cifar', dataset='fashion_mnist'), best_epoch=3,
                   best_val_error=0.081, test_error_at_best_val=test_error, wall_time_s=wall,
                   settings=dict(preset='', model='sd_resnet20_cifar', dataset='fashion_mnist', epochs=3, lr=0.1,
                                 drop_path_rate=drop_path_rate, seed=0, output_dir=str(run)))
    (run / 'results.json').write_text(json.dumps(results))


def test_export_run_is_one_command(tmp_path, capsys):
    run, baseline = tmp_path / 'results' / 'run1', tmp_path / 'results' / 'run0'
    fake_run(run)
    fake_run(baseline, drop_path_rate=0.0, test_error=0.0912, wall=800.0)
    code = cli.main(['export', '--run', str(run), '--tag', 'fmnist', '--out', str(tmp_path / 'out'),
                     '--card-dir', str(tmp_path / 'cards'), '--baseline-run', str(baseline)])
    assert code == 0
    printed = capsys.readouterr().out
    entry = eval(printed[printed.index('PublishedWeight('):printed.rindex('),') + 1], vars(pretrained))
    assert entry.name == 'sd_resnet20_cifar.fmnist' and entry.data_cfg['input_size'] == (1, 32, 32)
    card = ModelCard((tmp_path / 'cards' / 'sd_resnet20_cifar.fmnist.md').read_text())
    assert card.data.to_dict()['model-index'][0]['results'][0]['metrics'][0]['value'] == 8.73
    assert '--drop-path-rate 0.5' in card.text  # the training command, rebuilt from results.json
    assert '| 8.73 |' in card.text and '| 9.12 |' in card.text and 'stochastic / constant: 0.750' in card.text
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [1, 32, 32] and config['pretrained_cfg']['tag'] == 'fmnist'
    assert config['model_args']['in_chans'] == 1


@pytest.mark.network
def test_sd_resnet152_default_weights_from_the_real_hub():
    ours = timm.create_model('sd_resnet152', pretrained=True).eval()
    theirs = timm.create_model('resnet152.a1h_in1k', pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
