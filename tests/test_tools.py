"""Repository tooling (tools/): the records of weights trained here agree with the committed runs they name, a
record that drifts from its run is reported, and the committed cards are up to date."""
import dataclasses

from sd_zoo import pretrained
from sd_zoo.pretrained import Result
from tools import cards

FMNIST = 'sd_resnet20_cifar.fashion_mnist'


def test_every_record_agrees_with_its_committed_runs():
    trained_here = [w for w in pretrained.published_weights() if w.run_dir]
    assert trained_here  # the Fashion-MNIST weight at least
    assert [line for w in trained_here for line in cards.record_mismatches(w)] == []


def test_a_record_that_drifts_from_its_run_is_reported():
    weight = pretrained.find_weight(FMNIST)
    wrong_figure = dataclasses.replace(weight, results=(Result('error', 11.7, 'Fashion-MNIST', 'test', 28, 'x'),
                                                        *weight.results[1:]))
    assert [line.split(':')[0] for line in cards.record_mismatches(wrong_figure)] == [f'{FMNIST}.results']
    slower = dataclasses.replace(weight.comparison[1], wall_time_s=weight.comparison[1].wall_time_s + 1)
    wrong_time = dataclasses.replace(weight, comparison=(weight.comparison[0], slower), recipe=weight.recipe[1:])
    assert [line.split(':')[0] for line in cards.record_mismatches(wrong_time)] == \
        [f'{FMNIST}.recipe', f'{FMNIST}.comparison']


def test_committed_cards_and_records_pass_the_check(capsys):
    assert cards.main(['--check']) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == 'stale: none'


def test_recommendation_keeps_the_default_unless_another_way_is_clearly_faster():
    import random

    from tools.readme import _recommended
    rng = random.Random(0)
    default = [1.0 + rng.gauss(0, 0.1) for _ in range(31)]
    times = {'default': default,
             'within noise': [t * 0.98 + rng.gauss(0, 0.1) for t in default],  # 2% faster, 10% noise per step
             'clearly': [t * 0.7 for t in default],
             'slower': [t * 1.3 for t in default]}
    assert _recommended(times, 'default', ['within noise', 'slower']) == 'default'
    assert _recommended(times, 'default', ['within noise', 'clearly', 'slower']) == 'clearly'


def _resnet110_report():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'results' / 'fashion_mnist_resnet110' / 'report.py'
    spec = importlib.util.spec_from_file_location('resnet110_report', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet110_summary_is_rendered_from_its_run_folders():
    report = _resnet110_report()
    runs = {seed: {arm: report.load(arm, seed) for arm, _ in report.ARMS} for seed in report.seeds_present()}
    assert sorted(runs) == [0, 1]
    assert report.markdown(report.summary(runs)) == (report.HERE / 'SUMMARY.md').read_text(), \
        'results/fashion_mnist_resnet110/SUMMARY.md is stale: run its report.py, then `python -m tools.readme`'


def test_resnet110_seeds_differ_only_in_the_seed():
    """What the experiment's README.md ("Deviations") says of seed 1: the same recipe and data as seed 0."""
    report = _resnet110_report()
    allowed = {'seed', 'output_dir', 'progress', 'compile', 'compile_blocks'}  # compile: options added later, off
    for arm, _ in report.ARMS:
        first, second = (report.load(arm, seed)['results'] for seed in (0, 1))
        changed = {k for k in first['settings'].keys() | second['settings'].keys()
                   if first['settings'].get(k) != second['settings'].get(k)}
        assert changed <= allowed and second['settings']['seed'] == 1, (arm, changed)
        assert second['settings'].get('compile') is False
        assert first['data'] == second['data'] and second['status'] == 'completed'
