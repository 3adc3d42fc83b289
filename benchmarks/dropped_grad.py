"""Per-step cost of the DDP-safe block mode: dropped blocks' parameters get a zero gradient (``drop_path_grad='zero'``,
the default) against the block mode before it, where their ``grad`` stayed ``None`` (``drop_path_grad='none'``).

The zero gradients tie each dropped block's parameters into autograd without running its branch (one zero tensor
per parameter in backward), and the optimizer then applies weight decay and momentum to them, as the authors'
code did. Variants on the same weights and the same gate seed, so every repetition drops the same blocks in all
of them; timed round-robin in one process, order rotated each repetition:

* ``grad None (before)``: the baseline of the ratios, and a second copy of it whose ratio shows the noise;
* ``zero grads (default)``.

Run from the repository root::

    python -m benchmarks.dropped_grad --threads 1    # sd_resnet110_cifar, batch 128, CPU
    python -m benchmarks.dropped_grad --quick
"""
import argparse
import statistics
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.common import (
    TrainStep,
    add_device_args,
    alternate,
    apply_device_args,
    create_sd,
    machine_info,
    machine_line,
    markdown_table,
    ratio_table,
    reproduce_command,
    write_results,
)

BASELINE = "grad None (before: drop_path_grad='none')"
CONTROL = 'grad None, 2nd copy (noise control)'
ZERO = "zero grads (drop_path_grad='zero', the default)"
GRADS = {BASELINE: 'none', CONTROL: 'none', ZERO: 'zero'}
LIMIT = 1.02  # the zero gradients may cost at most 2% of a block-mode step


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--model', default='sd_resnet110_cifar')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--drop-path-rate', type=float, default=0.5, help='1 - p_L (default 0.5)')
    args = parser.parse_args(argv)
    if args.quick:
        args.model = 'sd_resnet20_cifar' if args.model == 'sd_resnet110_cifar' else args.model
        args.batch = min(args.batch, 16)
    args.reps = args.reps or (3 if args.quick else 25)
    return args


def paired_ratios(times: Dict[str, List[float]], name: str) -> List[float]:
    """Per repetition, ``name``'s time over the baseline's (both ran in the same round)."""
    return [t / b for t, b in zip(times[name], times[BASELINE])]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    torch.manual_seed(0)
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    steps = {}
    for label, grads in GRADS.items():
        model = create_sd(args.model, 'block', weights, num_classes=10, drop_path_rate=args.drop_path_rate,
                          drop_path_grad=grads).to(device)
        steps[label] = TrainStep(model, x, y, device, args.bf16)
    draws: Dict[str, List[List[bool]]] = {label: [] for label in steps}
    def record_draw(label: str, rep: int) -> None:
        draws[label].append(steps[label].model.stochastic_depth.last_active)

    times = alternate(steps, args.reps, warmup=1, device=device, after_each=record_draw)
    same_draws = all(draws[label] == draws[BASELINE] for label in draws)
    if not same_draws:
        raise RuntimeError('the variants dropped different blocks: their times are not comparable')
    table = ratio_table(times, BASELINE)
    for label in steps:
        for clock in times:
            table[label][f'{clock}_paired_ratio_median'] = statistics.median(paired_ratios(times[clock], label))
    ratio = table[ZERO][f'{args.clock}_ratio']
    payload = {
        'machine': machine_info(device), 'command': reproduce_command('dropped_grad', argv), 'model': args.model,
        'batch': args.batch, 'reps': args.reps, 'clock': args.clock, 'same_draws_in_every_variant': same_draws,
        'mean_active_blocks': statistics.mean(sum(d) for d in draws[BASELINE]), 'variants': table,
        'limit': LIMIT, 'within_limit': ratio <= LIMIT, 'times': times,
    }
    write_results(args.out, f"dropped_grad_{args.tag or device.type}", payload, markdown(payload))
    return payload


def markdown(res: Dict[str, Any]) -> str:
    clock, other = res['clock'], 'wall' if res['clock'] == 'cpu' else 'cpu'
    rows = [[label, f"**{v[f'{clock}_ratio']:.3f}x**", f"{v[f'{clock}_paired_ratio_median']:.3f}x",
             f"{v[f'{other}_ratio']:.3f}x", f"{v[f'{clock}_median_s']:.3f}"] for label, v in res['variants'].items()]
    header = ['variant', f'ratio of medians ({clock})', f'median of paired ratios ({clock})',
              f'ratio of medians ({other})', f'median s ({clock})']
    verdict = 'within' if res['within_limit'] else 'NOT within'
    return (f"# Dropped blocks' zero gradients: cost per block-mode step\n\n"
            f"Reproduce: `{res['command']}`\n\n{res['model']}, batch {res['batch']}, {res['reps']} repetitions, "
            f"{res['mean_active_blocks']:.2f} blocks active on average, the same draw in every variant: "
            f"{res['same_draws_in_every_variant']}. {machine_line(res['machine'])}.\n\n"
            + markdown_table(header, rows)
            + f"\nZero gradients vs grad None: {res['variants'][ZERO][f'{clock}_ratio']:.3f}x, {verdict} the "
              f"{res['limit']:.2f}x limit.\n")


if __name__ == '__main__':
    main()
