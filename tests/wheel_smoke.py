"""Every public function of sd_zoo, called once from an installed wheel (run by tests/test_packaging.py).

The test runs this file with the python of a virtual environment that holds the built wheel, from a folder
outside the checkout, offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` in the work folder). It writes what the
checkout compares (the rendered cards, the weights table) into the work folder and prints one JSON line: the
public names of every sd_zoo module (``__all__``, functions and classes), those called here, and where each
module was imported from.
"""
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch

import sd_zoo
from sd_zoo import cards, cli, hub, load_errors, pretrained, publishing, sd_resnet, stochastic_depth

MODULES = (sd_zoo, stochastic_depth, load_errors, sd_resnet, pretrained, hub, cards, publishing, cli)
ARGS = json.loads(sys.argv[1])
WORK = Path(ARGS['work'])
RUN, BASELINE, EXPORT, BIN = Path(ARGS['run']), Path(ARGS['baseline']), Path(ARGS['export']), Path(ARGS['bin'])
FMNIST = 'sd_resnet20_cifar.fashion_mnist'
used = set()


def use(module, *names: str) -> None:
    used.update(f'{module.__name__}.{name}' for name in names)


def raises(error: type, call) -> str:
    try:
        call()
    except error as e:
        return str(e)
    raise AssertionError(f'{call} did not raise {error.__name__}')


def rule() -> None:
    probs = sd_zoo.survival_probabilities(54, 0.5, 'linear')
    assert abs(sum(probs) - 40.25) < 1e-9 and probs[-1] == 0.5
    controller = sd_zoo.StochasticDepth(54, 0.5, 'linear', 'block', 'train', seed=0)
    assert abs(controller.expected_depth - 40.25) < 1e-9
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20_cifar', drop_path_scaling='test', zero_init_last=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        after = sd_zoo.fold_test_scaling(copy.deepcopy(model))(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert stochastic_depth.SCALING_KEY in model.state_dict()  # timm.create_model tracks the scaling
    plain = stochastic_depth.track_scaling(timm.create_model('sd_resnet20_cifar'))
    assert stochastic_depth.SCALING_KEY not in plain.state_dict()  # train scaling: the state dict is unchanged
    for module in (sd_zoo, stochastic_depth):
        use(module, 'survival_probabilities', 'StochasticDepth', 'fold_test_scaling')
    use(stochastic_depth, 'track_scaling')
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.ones(2, requires_grad=True)
    stochastic_depth.zero_grads_for(x, [w]).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(x.grad, torch.ones(2))  # zero, not None
    use(stochastic_depth, 'zero_grads_for')


def models() -> None:
    entrypoints = [name for name in sd_resnet.__all__ if name.startswith('sd_')]
    assert len(entrypoints) == 10 and sorted(entrypoints) == sorted(timm.list_models('sd_*'))
    for name in entrypoints:
        with torch.device('meta'):
            model = getattr(sd_resnet, name)()
        block = sd_resnet.SDBottleneck if model.fc.in_features == 2048 else sd_resnet.SDBasicBlock
        assert isinstance(model, sd_resnet.SDResNet) and all(isinstance(b, block) for b in model.sd_blocks())
    use(sd_resnet, 'SDResNet', 'SDBasicBlock', 'SDBottleneck', *entrypoints)
    use(sd_zoo, 'SDResNet', 'SDBasicBlock', 'SDBottleneck')


def weights_table() -> None:
    assert pretrained.hub_org() == 'sd-zoo'
    weights = pretrained.published_weights()
    assert pretrained.names() == [w.name for w in weights] and FMNIST in pretrained.names()
    fmnist = pretrained.find_weight(FMNIST)
    assert isinstance(fmnist.results[0], pretrained.Result) and isinstance(fmnist.comparison[0], pretrained.RunResult)
    cfgs = pretrained.with_published_weights(
        {'sd_resnet20_cifar': {'num_classes': 10}, 'sd_resnet110_cifar': {}, 'sd_resnet152': {}})
    assert cfgs[FMNIST]['hf_hub_id'] == fmnist.hf_hub_id and cfgs['sd_resnet20_cifar.*'] == {'num_classes': 10}
    assert 'sd_resnet152' not in cfgs and cfgs['sd_resnet152.a1h_in1k']['hf_hub_id'] == 'timm/resnet152.a1h_in1k'
    extra = pretrained.PublishedWeight(
        model='sd_resnet20_cifar', tag='wheel', hub_repo='x', trained_by='t', dataset='d', dataset_id='d',
        data_cfg={'num_classes': 10}, recipe=(), train_command='', stochastic_depth='', provenance='')
    pretrained.register_weight(extra)
    assert timm.models.get_pretrained_cfg('sd_resnet20_cifar.wheel').hf_hub_id == 'sd-zoo/x'
    pretrained.unregister_weight('sd_resnet20_cifar.wheel')
    assert 'sd_resnet20_cifar.wheel' not in timm.list_pretrained('sd_resnet20_cifar.*')
    use(pretrained, 'hub_org', 'published_weights', 'names', 'find_weight', 'Result', 'RunResult',
        'with_published_weights', 'PublishedWeight', 'register_weight', 'unregister_weight')


def card_functions(results: dict, baseline: dict) -> None:
    assert publishing.render_all_cards(WORK / 'cards')  # every card written (compared with the checkout's)
    assert publishing.render_all_cards(WORK / 'cards', check=True) == []
    fmnist = pretrained.find_weight(FMNIST)
    card = (WORK / 'cards' / cards.card_filename(fmnist)).read_text(encoding='utf-8')
    assert cards.render_card(fmnist) == card and cards.comparison_table(fmnist) in card
    assert cards.comparison_table(fmnist).count('| 0.5 |') == 1
    (WORK / 'table.md').write_text(cards.readme_table())
    stats = cards.model_stats('sd_resnet20_cifar', fmnist.data_config())
    assert stats['num_features'] == 64 and 0.25 < stats['params_m'] < 0.3
    weight = dataclasses.replace(fmnist, run_dir=str(RUN))
    assert [r.value for r in cards.run_figures(weight, results)] == [8.73, 8.1]
    assert '--drop-path-rate 0.5' in cards.run_command(results) and 'lr: 0.1' in cards.recipe_from_run(results)
    assert cards.run_result('b', baseline).test_error == 9.12
    assert cards.started_from(results) == []  # trained from scratch
    start = {'tag': 'sd_resnet20_cifar.fashion_mnist', 'hub_id': 'sd-zoo/x', 'changes': ['new head: 2 classes']}
    assert cards.started_from({'run': {'pretrained': start}})[1:] == ['new head: 2 classes']
    use(cards, 'render_card', 'card_filename', 'readme_table', 'comparison_table', 'model_stats', 'run_figures',
        'run_command', 'recipe_from_run', 'run_result', 'read_results', 'started_from')


def loading_and_export() -> None:
    model = timm.create_model('sd_resnet20_cifar').eval()
    out = hub.export_model(model, WORK / 'export', '# card\n', tag='wheel')
    loaded = hub.load_weights(timm.create_model('sd_resnet20_cifar'), out / 'model.safetensors')
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    message = raises(hub.PretrainedWeightsError, lambda: hub.check_keys(
        timm.create_model('sd_resnet32_cifar'), dict(model.state_dict()), 'a file'))
    assert 'missing keys' in message
    assert 'a1h_in1k' in raises(hub.PretrainedWeightsError,
                                lambda: hub.create_model('sd_resnet20_cifar.nope', pretrained=True))
    assert 'a1h_in1k' in raises(load_errors.PretrainedWeightsError,
                                lambda: timm.create_model('sd_resnet110_cifar', pretrained=True))

    def unknown_tag():
        with hub.explain_load_errors('sd_resnet50.x'):
            raise RuntimeError('Invalid pretrained tag (x) for sd_resnet50.')
    assert 'sd_resnet50 has no published weights' in raises(hub.PretrainedWeightsError, unknown_tag)
    assert 'a1h_in1k' in load_errors.available_weights('sd_resnet152')
    hub.write_text_atomic(WORK / 'atomic' / 'a.txt', 'text')
    assert (WORK / 'atomic' / 'a.txt').read_text() == 'text'
    weights = out / 'model.safetensors'
    assert hub.expected_sha256(weights) == hub.file_sha256(weights) and hub.verify_file(weights) is True
    assert 'corrupted' in raises(hub.IntegrityError, lambda: hub.verify_file(weights, '0' * 64))
    assert load_errors.expected_sha256(weights) == load_errors.file_sha256(weights) and load_errors.verify_file(weights)
    assert 'corrupted' in raises(load_errors.IntegrityError, lambda: load_errors.verify_file(weights, '0' * 64))
    hub.check_export_target(out)  # a previous export may be replaced
    assert '--overwrite' in raises(hub.ExportTargetError, lambda: hub.check_export_target(WORK / 'atomic'))
    use(hub, 'export_model', 'load_weights', 'check_keys', 'PretrainedWeightsError', 'create_model',
        'explain_load_errors', 'write_text_atomic', 'ExportTargetError', 'check_export_target', 'IntegrityError',
        'file_sha256', 'verify_file', 'expected_sha256')
    use(load_errors, 'PretrainedWeightsError', 'explain_load_errors', 'available_weights', 'IntegrityError',
        'file_sha256', 'verify_file', 'expected_sha256')


def publishing_and_cli() -> None:
    fmnist = pretrained.find_weight(FMNIST)
    commit = publishing.publish(EXPORT, fmnist.repo_id, api=publishing.LocalHubCache(ARGS['cache']))
    model = timm.create_model(FMNIST, pretrained=True)  # offline, from the cache just written
    from safetensors.torch import load_file
    expected = load_file(str(EXPORT / 'model.safetensors'))
    assert len(commit) == 40 and all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    # this export predates recorded sha256s and the local cache keeps no blobs: accepted, unverified (None)
    assert hub.verify_loaded_weights(model) is None and load_errors.verify_loaded_weights(model) is None
    use(hub, 'verify_loaded_weights')
    use(load_errors, 'verify_loaded_weights')
    upload = publishing.LocalHubCache(WORK / 'other').upload_folder('o/n', str(EXPORT), create_pr=True)
    assert isinstance(upload, publishing.LocalCommit) and upload.pr_revision == 'refs/pr/1'

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        publishing.export_run(RUN, WORK / 'run_export', tag='wheel', baseline_run=BASELINE)
    text = printed.getvalue()
    entry = eval(text[text.index('PublishedWeight('):text.rindex('),') + 1], vars(pretrained))
    assert entry.name == 'sd_resnet20_cifar.wheel' and entry.comparison[1].test_error == 9.12
    derived = publishing.weight_from_run(RUN, publishing._model_from_run(RUN), 'wheel', cards.read_results(RUN))
    assert publishing.entry_source(derived).startswith('PublishedWeight(\n    model=')
    use(publishing, 'publish', 'LocalHubCache', 'LocalCommit', 'export_run', 'weight_from_run', 'entry_source',
        'render_all_cards')

    with contextlib.redirect_stdout(io.StringIO()) as table:
        assert cli.main(['table']) == 0
    assert table.getvalue() == cards.readme_table()
    for command in ([BIN / 'sd-zoo-publish', EXPORT, '--repo-id', 'o/n', '--dry-run'],
                    [BIN / 'sd-zoo-export', '--run', RUN, '--tag', 'cli', '--out', WORK / 'cli_export']):
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=300)
    assert (WORK / 'cli_export' / 'model.safetensors').is_file()
    use(cli, 'main', 'publish_main', 'export_main')


def main() -> None:
    results, baseline = cards.read_results(RUN), cards.read_results(BASELINE)
    rule()
    models()
    weights_table()
    card_functions(results, baseline)
    loading_and_export()
    publishing_and_cli()
    public = {f'{m.__name__}.{name}' for m in MODULES for name in m.__all__
              if inspect.isfunction(getattr(m, name)) or inspect.isclass(getattr(m, name))}
    print(json.dumps({'public': sorted(public), 'used': sorted(used),
                      'files': {m.__name__: m.__file__ for m in MODULES}}))


if __name__ == '__main__':
    main()
