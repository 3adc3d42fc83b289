"""The README's main job (training/demo.py) end to end on a small real Fashion-MNIST subset."""
from pathlib import Path

import pytest

from training import demo
from training.data import DEFAULT_DATA_DIRS

pytestmark = pytest.mark.skipif(not Path(DEFAULT_DATA_DIRS['fashion_mnist']).is_dir(),
                                reason='needs the Debian package dataset-fashion-mnist (make data)')


def test_demo_trains_both_depths_exports_and_reloads(tmp_path, capsys):
    out = demo.main(['--limit', '256', '--epochs', '1', '--batch-size', '64', '--output-dir', str(tmp_path / 'demo')])
    stochastic, constant = out['runs']['stochastic'], out['runs']['constant']
    assert stochastic['status'] == constant['status'] == 'completed'
    assert stochastic['mean_active_depth'] < 9.0 == constant['mean_active_depth']
    assert out['time_ratio'] == pytest.approx(stochastic['train_time_s'] / constant['train_time_s'])
    # the reloaded best weights reproduce the run's own test error exactly
    assert out['reloaded_test_error'] == stochastic['test_error_at_best_val']
    printed = capsys.readouterr().out
    assert 'weights bit-identical' in printed and 'training-time ratio' in printed
    assert (tmp_path / 'demo' / 'export' / 'model.safetensors').is_file()
