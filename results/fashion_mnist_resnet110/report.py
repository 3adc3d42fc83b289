"""Render this experiment's README section and figures from the runs' committed files (run from a checkout).

    python results/fashion_mnist_resnet110/report.py            # rewrites SUMMARY.md and the PNGs here

Reads ``<arm><suffix>/metrics.json`` and ``results.json`` of the stochastic (``stochastic``) and constant-depth
(``constant``) runs of each seed present (seed 0: no suffix; seed 1: ``_seed1``, run in a later session: see
``README.md`` here, "Deviations"), applies the decision rule of ``PROTOCOL.md`` to the primary figure (with two
seeds, to the mean difference over seeds, as the protocol says) and writes ``SUMMARY.md`` (the table and verdict
the README quotes), ``summary.json``, ``test_error.png`` (all runs, paper Fig. 3 style), ``val_error.png`` and
``first_conv_grad.png`` (paper Fig. 7 style).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from training.plots import plot_first_conv_grad, plot_test_error  # noqa: E402

ARMS = (('stochastic', 'S: stochastic depth, p_L = 0.5'), ('constant', 'C: constant depth'))
SEEDS = ((0, ''), (1, '_seed1'))  # seed, folder suffix
THRESHOLD = 0.5  # percentage points, PROTOCOL.md
PAPER_NO_AUG = {'CIFAR-10': (13.63, 11.66), 'CIFAR-100': (44.74, 37.8)}


def seeds_present() -> List[int]:
    """The seeds whose two arms both have results here."""
    return [seed for seed, suffix in SEEDS if all((HERE / f'{arm}{suffix}' / 'results.json').exists() for arm, _ in ARMS)]


def load(arm: str, seed: int = 0) -> Dict[str, Any]:
    folder = HERE / f'{arm}{dict(SEEDS)[seed]}'
    return dict(metrics=json.loads((folder / 'metrics.json').read_text()),
                results=json.loads((folder / 'results.json').read_text()))


def verdict(d: float) -> str:
    if d <= -THRESHOLD:
        return 'stochastic depth helped'
    if d >= THRESHOLD:
        return 'stochastic depth hurt'
    return 'no difference detectable with this design'


def seed_summary(runs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One seed: both arms' rows, the difference S - C on the primary figure and the training-time ratio."""
    rows = {}
    for arm, _ in ARMS:
        res, epochs = runs[arm]['results'], runs[arm]['metrics']['epochs']
        rows[arm] = dict(
            status=res['status'], epochs=res['epochs_completed'], best_epoch=res['best_epoch'],
            val_error=100 * res['best_val_error'], test_error=100 * res['test_error_at_best_val'],
            final_test_error=100 * res['final_test_error'], min_test_error=100 * min(r['test_error'] for r in epochs),
            active=res['mean_active_depth'], blocks=res['run']['num_blocks'], train_time_s=res['train_time_s'],
            eval_time_s=sum(r['eval_time'] for r in epochs))
    d = rows['stochastic']['test_error'] - rows['constant']['test_error']
    return dict(rows=rows, difference=d,
                time_ratio=rows['stochastic']['train_time_s'] / rows['constant']['train_time_s'])


def summary(runs: Dict[int, Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """Every seed's summary and the decision: on the one seed, or on the mean difference over seeds."""
    seeds = {seed: seed_summary(by_arm) for seed, by_arm in sorted(runs.items())}
    mean_d = sum(s['difference'] for s in seeds.values()) / len(seeds)
    return dict(seeds=seeds, mean_difference=mean_d, verdict=verdict(mean_d),
                mean_time_ratio=sum(s['time_ratio'] for s in seeds.values()) / len(seeds))


def markdown(s: Dict[str, Any]) -> str:
    seeds = s['seeds']
    lines: List[str] = [
        '| arm | seed | epochs | best-validation epoch | validation error | **test error at best validation** | '
        'final test error | active blocks per step (mean) | training time |',
        '|---|---|---|---|---|---|---|---|---|']
    for arm, label in ARMS:
        for seed, one in seeds.items():
            x = one['rows'][arm]
            lines.append(
                f"| {label} | {seed} | {x['epochs']} ({x['status']}) | {x['best_epoch']} | {x['val_error']:.2f}% | "
                f"**{x['test_error']:.2f}%** | {x['final_test_error']:.2f}% | {x['active']:.2f} of {x['blocks']} | "
                f"{x['train_time_s'] / 60:.1f} min |")
    per_seed = ', '.join(f"seed {seed}: {one['difference']:+.2f}" for seed, one in seeds.items())
    ratios = ', '.join(f"seed {seed}: {one['time_ratio']:.3f}" for seed, one in seeds.items())
    if len(seeds) == 1:
        decision = (f"Difference S - C on the primary figure: **{s['mean_difference']:+.2f} points**, so by the "
                    f"pre-registered rule (+-{THRESHOLD} points): **{s['verdict']}** (one seed per arm).")
    else:
        decision = (f"Difference S - C on the primary figure ({per_seed} points); mean over the {len(seeds)} seeds "
                    f"**{s['mean_difference']:+.2f} points**, so by the pre-registered rule (+-{THRESHOLD} points, on "
                    f"the mean over seeds): **{s['verdict']}**.")
    cifar10, cifar100 = PAPER_NO_AUG['CIFAR-10'], PAPER_NO_AUG['CIFAR-100']
    lines += [
        '',
        decision,
        '',
        f"Training-time ratio S / C, summed over all epochs inside the runs (evaluation excluded; the two arms of a "
        f"seed ran at the same time on the same 2-core CPU, one thread each): **{ratios}**. The expected depth "
        f"40.25 of 54 blocks bounds the block compute at 0.745; the paper measured 0.73-0.76 on a GPU.",
        '',
        f"The paper, 110 layers without augmentation, 500 epochs on 45,000 images: CIFAR-10 {cifar10[0]}% -> "
        f"{cifar10[1]}% ({cifar10[1] - cifar10[0]:+.2f}), CIFAR-100 {cifar100[0]}% -> {cifar100[1]}% "
        f"({cifar100[1] - cifar100[0]:+.2f}).",
    ]
    return '\n'.join(lines) + '\n'


def main() -> Dict[str, Any]:
    runs = {seed: {arm: load(arm, seed) for arm, _ in ARMS} for seed in seeds_present()}
    if not runs:
        raise SystemExit(f'no seed has both run folders with a results.json in {HERE} (stochastic/, constant/): '
                         'run the two arms of PROTOCOL.md first')
    s = summary(runs)
    (HERE / 'SUMMARY.md').write_text(markdown(s))
    (HERE / 'summary.json').write_text(json.dumps(s, indent=1) + '\n')
    every = [by_arm[arm]['metrics'] for by_arm in runs.values() for arm, _ in ARMS]
    title = 'Fashion-MNIST, 5,000 training images, no augmentation, ResNet-110'
    plot_test_error(every, HERE / 'test_error.png', title=title)
    val_only = [dict(m, epochs=[{**e, 'test_error': None} for e in m['epochs']]) for m in every]
    plot_test_error(val_only, HERE / 'val_error.png', title=title)
    plot_first_conv_grad(every, HERE / 'first_conv_grad.png')
    print(markdown(s))
    return s


if __name__ == '__main__':
    main()
