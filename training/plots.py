"""PNG figures of a run, read from its ``metrics.json``: test error per epoch (paper Fig. 3 style, stochastic vs
constant depth when a second run is given) and the first convolution's mean gradient magnitude (paper Fig. 7)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['load_metrics', 'plot_test_error', 'plot_first_conv_grad', 'run_label']


def load_metrics(path: os.PathLike) -> Dict:
    """A run's ``metrics.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / 'metrics.json'
    with open(path) as f:
        return json.load(f)


def run_label(metrics: Dict) -> str:
    run = metrics.get('run', {})
    rate = run.get('drop_path_rate', 0.0)
    kind = 'constant depth' if not rate or run.get('drop_path_mode') == 'off' else f'stochastic depth (p_L={1 - rate:g})'
    seed = f", seed {run['seed']}" if 'seed' in run else ''
    return f"{run.get('model', '?')}, {kind}{seed}"


def _save(fig, out_png: os.PathLike) -> None:
    tmp = f'{out_png}.tmp.png'
    fig.savefig(tmp, dpi=120, bbox_inches='tight')
    os.replace(tmp, out_png)


def _curves(runs: Sequence[Dict], key: str) -> List[Tuple[str, List[int], List[float]]]:
    curves = []
    for metrics in runs:
        rows = [r for r in metrics.get('epochs', []) if r.get(key) is not None]
        curves.append((run_label(metrics), [r['epoch'] for r in rows], [r[key] for r in rows]))
    return curves


def plot_test_error(runs: Sequence[Dict], out_png: os.PathLike, title: Optional[str] = None) -> None:
    """Test error (%) per epoch of one or more runs on shared axes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    key = 'test_error' if any(r.get('test_error') is not None for m in runs for r in m.get('epochs', [])) \
        else 'val_error'
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, epochs, values in _curves(runs, key):
        ax.plot(epochs, [100 * v for v in values], label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title(title or runs[0].get('run', {}).get('dataset', ''))
    ax.grid(alpha=0.3)
    ax.legend(loc='upper right', fontsize='small')  # error curves fall: their upper right is empty
    _save(fig, out_png)
    plt.close(fig)


def plot_first_conv_grad(runs: Sequence[Dict], out_png: os.PathLike) -> None:
    """Mean absolute gradient of the first convolution's weight per epoch (log scale)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, epochs, values in _curves(runs, 'first_conv_grad'):
        ax.plot(epochs, values, label=label)
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_ylabel('mean |grad| of the first conv layer')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    _save(fig, out_png)
    plt.close(fig)
