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
from typing import Any, Dict, Optional, Sequence

import torch

import sd_zoo.sd_resnet as sd_resnet
from benchmarks.attempts import cifar_batch, write_paired_attempt
from benchmarks.common import (
    TrainStep,
    alternate,
    apply_device_args,
    attempt_parser,
    compile_isolated,
    create_sd,
    parse_attempt_args,
    prepare,
)

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
    x, y = cifar_batch(args, device)
    steps = build_steps(args, device, x, y)
    # warm-up: a region compiles the first time a run of its length and signature is kept
    times = alternate(steps, args.reps, warmup=6, device=device)[args.clock]
    regions = sorted(f'{r.fn.__name__}' for r in sd_resnet._REGIONS.values())
    return write_paired_attempt(
        args, argv, device, times, script='region_runs',
        title='Attempt 14: runs of kept blocks a region, in the package',
        note=f'; {len(regions)} regions compiled in all (both block-compiled variants)',
        baseline=BASELINE, reference=RUNS, compared=(SINGLE, EAGER), key='paired_runs_vs_this',
        paired_header='runs / this variant (paired, same draws)', extra={'regions': regions})


if __name__ == '__main__':
    main()
