"""The README's main job (training/demo.py) end to end, in its quick form, on real Fashion-MNIST files."""
from pathlib import Path

import pytest

from training import demo
from training.data import DEFAULT_DATA_DIRS
from training.hub_server import olah_available

pytestmark = [
    pytest.mark.skipif(not Path(DEFAULT_DATA_DIRS['fashion_mnist']).is_dir(),
                       reason='needs the Debian package dataset-fashion-mnist (make data)'),
    pytest.mark.skipif(olah_available() is not None, reason=f'local Hub server unavailable: {olah_available()}'),
]


def test_demo_serves_the_zoo_times_interleaved_and_round_trips(tmp_path, capsys):
    out = demo.main(['--quick', '--output-dir', str(tmp_path / 'demo')])
    printed = capsys.readouterr().out
    if (demo.ZOO_EXPORT / 'model.safetensors').is_file():
        assert 'downloaded over HTTP' in printed
        assert out['zoo']['card'] is not None and 0 <= out['zoo']['measured'] < 50
        assert 'zoo weights missing' not in out['failed']
    else:  # the demo must say what is missing, and fail, rather than fall back silently
        assert 'MISSING' in printed and out['failed'] == ['zoo weights missing']
    timing = out['timing']
    assert timing['reps'] == 3 and 0 < timing['interval'][0] <= timing['interval'][1]  # no timing claim here
    small = out['small']
    assert small['identical'] and small['run']['status'] == 'completed'
    assert small['reloaded_test_error'] == small['run']['test_error_at_best_val']
    assert 'bit-identical' in printed


def test_card_test_error_reads_the_model_index():
    card = Path(__file__).resolve().parents[1] / 'hub_cards' / 'sd_resnet20_cifar.fashion_mnist.md'
    assert demo.card_test_error(card) == 11.8
