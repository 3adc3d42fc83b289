"""Attempt 14 of issue 13 (benchmarks/README.md, "torch.compile"): runs of kept blocks as one region, in the package.

Through attempt 13 the package compiled each kept block as its own region: a step of ResNet-110 made about 40
compiled calls, each with its fixed costs (AOTAutograd's runtime wrappers forward and backward, dynamo's cache
lookup and guards, the Python around it), which the DDP profiles put at about 23 ms a step. Attempt 9 showed
that running consecutive kept blocks as one call saves part of it, at the price of a graph per run length. The
package now runs kept identity blocks of one signature in a row as one call, cut into runs of
``sd_resnet.REGION_RUN_LENGTHS`` blocks: first (4, 2, 1) with a dropped block ending a run, at most three regions
per signature (11 for a CIFAR ResNet instead of 5) and about 18 calls a step for ResNet-110 instead of 40
(simulated on the linear rule); then (8, 4, 2, 1) with runs going on past a dropped identity block (it is the
identity), at most four regions per signature (14) and about 9 calls a step.

This runs both on one set of weights: the package's path, and one block per region rebuilt here (the package's
own single-block path, ``sd_resnet._regional_forward``, called block by block as before attempt 14), with block
mode eager and constant depth compiled alongside. The block-mode models have the same gate seed and step in
lock-step, so in each round they run the same draw and their ratio per round is paired. Nothing here changes the
package: the experiment swaps ``sd_zoo.sd_resnet.compiled_gated_blocks`` for a dispatcher that reads the model's
``one_block_regions`` attribute.

    python -m benchmarks.attempts.region_runs --channels-last --config sd_resnet56_cifar:64 --reps 15
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

import torch

import sd_zoo.sd_resnet as sd_resnet
from benchmarks.common import (
    TrainStep,
    alternate,
    apply_device_args,
    attempt_parser,
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
from benchmarks.train_step import format_ratio, paired_ratio, target_check

BASELINE = 'constant depth, compiled'
RUNS = 'block compiled, runs of kept blocks a region (the package)'
SINGLE = 'block compiled, one block a region (before attempt 14)'
EAGER = 'block eager'


@sd_resnet._skipped_frame  # like the package's loop: this frame runs eagerly, the regions it calls are compiled
def one_block_regions(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The package's block loop as it was before attempt 14: a compiled call for every kept block."""
    x = sd_resnet._eager_stem_out(model, x)
    for block in model.sd_blocks():
        x = sd_resnet._regional_forward(block, x)
    return x


_PACKAGE_BLOCKS = sd_resnet.compiled_gated_blocks


def _dispatch(model: Any, x: torch.Tensor) -> torch.Tensor:
    if getattr(model, 'one_block_regions', False):
        return one_block_regions(model, x)
    return _PACKAGE_BLOCKS(model, x)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_attempt_args(attempt_parser(__doc__), argv, reps=15)


def build_steps(args: argparse.Namespace, device: torch.device, x: torch.Tensor,
                y: torch.Tensor) -> Dict[str, TrainStep]:
    """The four variants on one set of weights; the block-mode ones share the gate seed (the same draws)."""
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()

    def block(one_block: bool) -> torch.nn.Module:
        model = prepare(create_sd(args.model, 'block', weights, seed=1, num_classes=10), device, args.channels_last)
        model.one_block_regions = one_block
        return model

    constant = prepare(create_sd(args.model, 'off', weights, num_classes=10), device, args.channels_last)
    models = {RUNS: compile_isolated(block(False)), SINGLE: compile_isolated(block(True)), EAGER: block(False),
              BASELINE: compile_isolated(constant)}
    return {name: TrainStep(model, x, y, device, args.bf16) for name, model in models.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    sd_resnet.compiled_gated_blocks = _dispatch
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    steps = build_steps(args, device, x, y)
    # warm-up: a region compiles the first time a run of its length and signature is kept
    times = alternate(steps, args.reps, warmup=6, device=device)[args.clock]
    rows: List[List[str]] = []
    per_variant: Dict[str, Any] = {}
    for name in steps:
        entry = {'median_s': median(times[name]),
                 'vs_constant': target_check(times, name, BASELINE, 0.80, args.bootstrap)}
        if name in (SINGLE, EAGER):
            entry['paired_runs_vs_this'] = paired_ratio(times, RUNS, name, args.bootstrap)
        per_variant[name] = entry
        vs_c, pr = entry['vs_constant'], entry.get('paired_runs_vs_this')
        rows.append([name, format_ratio(vs_c), format_ratio(pr) if pr else '-', f"{entry['median_s']:.3f}"])
    payload = {'machine': machine_info(device), 'command': reproduce_command('attempts.region_runs', argv),
               'model': args.model, 'batch': args.batch, 'reps': args.reps, 'clock': args.clock,
               'channels_last': args.channels_last, 'times_s': times, 'per_variant': per_variant,
               'regions': sorted(f'{r.fn.__name__}' for r in sd_resnet._REGIONS.values())}
    markdown = '\n'.join([
        f"Measured on {machine_line(payload['machine'])}.", '',
        f"Reproduce: `{payload['command']}`", '',
        f'**Attempt 14: runs of kept blocks a region, in the package**, {args.model}, batch {args.batch}, '
        f'{args.reps} rounds, {args.clock} time, 95% bootstrap intervals; {len(payload["regions"])} regions '
        'compiled in all (both block-compiled variants)', '',
        markdown_table(['variant', 'vs constant depth compiled (ratio of medians)',
                        'runs / this variant (paired, same draws)', f'median {args.clock} s'], rows), ''])
    write_results(args.out, f'attempt_region_runs_{args.tag or device.type}_{args.model}_b{args.batch}',
                  payload, markdown)
    return payload


if __name__ == '__main__':
    main()
