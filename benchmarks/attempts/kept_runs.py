"""Attempt 9 of issue 13 (benchmarks/README.md, "torch.compile"): runs of consecutive kept blocks as one region.

The package's regions compiled each kept block alone (``_SDBlock.kept_sum``, before attempt 12) and ran its last
ReLU eagerly, so a step paid one compiled call and one eager ReLU pass per kept block. Here up to ``G``
consecutive kept identity blocks (same shape, no downsampling) run as one compiled call: the ReLUs between them
are inside the graph, where the next convolution saves their output (no bool mask), and the call's fixed costs
are shared. A run of ``k`` blocks is its own code object, so each (run length, block shape) pair is one
compiled graph: ``G`` times as many graphs as the package's regions. ``G = 1`` is the package's path as it was
then (before attempt 12 put the block's last ReLU into its region), rebuilt here as the reference.

Every block-mode variant has the same weights and the same gate seed and all step in lock-step, so in each round
they run the same draw: their ratio per round is paired (median of per-round ratios, 95% bootstrap interval).
Constant depth compiled is timed alongside. Nothing here changes the package: the experiment swaps
``sd_zoo.sd_resnet.compiled_gated_blocks`` for a dispatcher that reads the model's ``kept_run_max`` attribute.

    python -m benchmarks.attempts.kept_runs --channels-last --config sd_resnet56_cifar:64 --runs 1,2,3,4 --reps 15
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch._dynamo import maybe_mark_dynamic

import sd_zoo.sd_resnet as sd_resnet
from benchmarks.attempts import cifar_batch
from benchmarks.common import (
    TrainStep,
    alternate,
    apply_device_args,
    attempt_parser,
    code_copy,
    compile_isolated,
    create_sd,
    machine_info,
    machine_line,
    markdown_table,
    median,
    parse_attempt_args,
    prepare,
    reproduce_command,
    write_results,
)
from benchmarks.train_step import paired_ratio, target_check

BASELINE = 'constant depth, compiled'


def _kept_run(blocks: Tuple[Any, ...], x: torch.Tensor, scales: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``len(blocks)`` kept blocks in a row, up to the last one's final activation (compiled as one frame)."""
    for block, scale in zip(blocks[:-1], scales[:-1]):
        x = block.act_out(block.kept_sum(x, scale))
    return blocks[-1].kept_sum(x, scales[-1])


RUN_FNS = {k: code_copy(_kept_run, f'kept_run_{k}') for k in range(1, 33)}
RUN_LENGTHS: Counter = Counter()  # how many regions of each length ran (a check for the tests)


@torch.compiler.disable
def _eager_act(block: Any, x: torch.Tensor) -> torch.Tensor:
    return block.act_out(x)


@torch.compiler.disable(recursive=False)
def _flush(run: List[Tuple[Any, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    blocks, scales = tuple(b for b, _ in run), tuple(s for _, s in run)
    RUN_LENGTHS[len(blocks)] += 1
    maybe_mark_dynamic(x, 0)
    return _eager_act(blocks[-1], RUN_FNS[len(blocks)](blocks, x, scales))


@torch.compiler.disable(recursive=False)
def run_grouped_blocks(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The package's ``_regional_blocks`` with runs of up to ``model.kept_run_max`` kept identity blocks."""
    longest = model.kept_run_max
    x = sd_resnet._eager_stem_out(model, x)
    run: List[Tuple[Any, torch.Tensor]] = []
    for block in model.sd_blocks():
        scale = sd_resnet._eager_gate(block, x)
        dropped = sd_resnet._is_dropped(scale)
        if run and (dropped or block.downsample is not None or len(run) == longest):
            x, run = _flush(run, x), []
        if dropped:
            x = sd_resnet._eager_skip(block, x)
        elif block.downsample is not None:
            x = _flush([(block, scale)], x)
        else:
            run.append((block, scale))
    return _flush(run, x) if run else x


_PACKAGE_BLOCKS = sd_resnet.compiled_gated_blocks


def _dispatch(model: Any, x: torch.Tensor) -> torch.Tensor:
    if getattr(model, 'kept_run_max', 0):
        return run_grouped_blocks(model, x)
    return _PACKAGE_BLOCKS(model, x)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = attempt_parser(__doc__)
    parser.add_argument('--runs', default='1,2,4', help='longest runs to compare (1 = the package regions)')
    args = parse_attempt_args(parser, argv, reps=15)
    args.runs = [int(g) for g in args.runs.split(',')]
    if 1 not in args.runs:
        parser.error('--runs must include 1 (the package regions, the reference of the paired ratios)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    sd_resnet.compiled_gated_blocks = _dispatch
    x, y = cifar_batch(args, device)
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()
    steps: Dict[str, TrainStep] = {}
    for g in args.runs:
        model = prepare(create_sd(args.model, 'block', weights, seed=1, num_classes=10), device, args.channels_last)
        model.kept_run_max = g
        steps[f'runs of up to {g}'] = TrainStep(compile_isolated(model), x, y, device, args.bf16)
    constant = prepare(create_sd(args.model, 'off', weights, num_classes=10), device, args.channels_last)
    steps[BASELINE] = TrainStep(compile_isolated(constant), x, y, device, args.bf16)
    # warm-up: every (run length, shape) graph compiles the first time it occurs; the block variants stay in
    # lock-step (same number of draws), so later rounds still give them the same draws
    times = alternate(steps, args.reps, warmup=6, device=device)[args.clock]
    reference = f'runs of up to {1}'
    rows, result = [], {'per_variant': {}}
    for name in steps:
        entry = {'median_s': median(times[name]),
                 'vs_constant': target_check(times, name, BASELINE, 0.80, args.bootstrap)}
        if name not in (BASELINE, reference):
            entry['paired_vs_regions'] = paired_ratio(times, name, reference, args.bootstrap)
        result['per_variant'][name] = entry
        vs_c = entry['vs_constant']
        pr = entry.get('paired_vs_regions')
        rows.append([name, f"{vs_c['ratio']:.3f}x [{vs_c['interval_95'][0]:.3f}, {vs_c['interval_95'][1]:.3f}]",
                     f"{pr['ratio']:.3f}x [{pr['interval_95'][0]:.3f}, {pr['interval_95'][1]:.3f}]" if pr else '-',
                     f"{entry['median_s']:.3f}"])
    payload = {'machine': machine_info(device), 'command': reproduce_command('attempts.kept_runs', argv),
               'model': args.model, 'batch': args.batch, 'reps': args.reps, 'clock': args.clock,
               'channels_last': args.channels_last, 'times_s': times, **result}
    markdown = '\n'.join([
        f"Measured on {machine_line(payload['machine'])}.", '',
        f"Reproduce: `{payload['command']}`", '',
        f'**Attempt 9: runs of kept blocks as one region**, {args.model}, batch {args.batch}, {args.reps} rounds, '
        f'{args.clock} time, 95% bootstrap intervals', '',
        markdown_table(['variant', 'vs constant depth compiled (ratio of medians)',
                        'vs runs of up to 1 (paired, same draws)', f'median {args.clock} s'], rows), ''])
    tag = f"{args.model}_b{args.batch}"
    write_results(args.out, f'attempt_kept_runs_{args.tag or device.type}_{tag}', payload, markdown)
    return payload


if __name__ == '__main__':
    main()
