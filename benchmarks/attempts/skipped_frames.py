"""Attempt 13 of issue 13 (benchmarks/README.md, "torch.compile"): what dynamo's callback cost per block.

Until attempt 13 the frames that run the gated blocks under ``torch.compile`` (``sd_resnet._regional_blocks`` and
``_regional_forward``, one call a block) were wrapped in ``torch.compiler.disable(recursive=False)``. Such a frame
cannot be marked skipped once for all (the same function may be reached without the wrapper), so dynamo's Python
frame callback runs at every call to find the wrapper on the stack: a cProfile of ResNet-56 at batch 2 gave 28
calls a step at about 0.6 ms each. The package now marks their code skipped in dynamo's C frame evaluation
(``sd_resnet._skipped_frame``), which costs nothing per call.

This runs both on one set of weights: the package's path, and the previous one rebuilt here (the same functions'
code, copied so that the copies are not marked skipped, behind ``disable(recursive=False)``), with block mode eager
and constant depth compiled alongside. The block-mode models have the same gate seed and step in lock-step, so in
each round they run the same draw and their ratio per round is paired. Nothing here changes the package: the
experiment swaps ``sd_zoo.sd_resnet.compiled_gated_blocks`` for a dispatcher that reads the model's
``callback_frames`` attribute. Since attempt 14 the package's path also runs kept blocks several to a region, so a
rerun of this script compares that too, not the frames alone; its committed results were taken before.

    python -m benchmarks.attempts.skipped_frames --channels-last --config sd_resnet56_cifar:64 --reps 15
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
    code_copy,
    compile_isolated,
    create_sd,
    parse_attempt_args,
    prepare,
)

BASELINE = 'constant depth, compiled'
SKIPPED = 'block compiled, skipped frames (the package)'
CALLBACK = 'block compiled, frames behind disable(recursive=False) (before attempt 13)'
EAGER = 'block eager'


# a code object of its own: the package's is marked skipped, and a mark is per code object
_forward_before = torch.compiler.disable(code_copy(sd_resnet._regional_forward, '_regional_forward_before'),
                                         recursive=False)


@torch.compiler.disable(recursive=False)
def blocks_before(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``sd_resnet._regional_blocks`` as it was before attempt 13."""
    x = sd_resnet._eager_stem_out(model, x)
    for block in model.sd_blocks():
        x = _forward_before(block, x)
    return x


_PACKAGE_BLOCKS = sd_resnet.compiled_gated_blocks


def _dispatch(model: Any, x: torch.Tensor) -> torch.Tensor:
    if getattr(model, 'callback_frames', False):
        return blocks_before(model, x)
    return _PACKAGE_BLOCKS(model, x)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_attempt_args(attempt_parser(__doc__), argv, reps=15)


def build_steps(args: argparse.Namespace, device: torch.device, x: torch.Tensor,
                y: torch.Tensor) -> Dict[str, TrainStep]:
    """The four variants on one set of weights; the block-mode ones share the gate seed (the same draws)."""
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()

    def block(callback_frames: bool) -> torch.nn.Module:
        model = prepare(create_sd(args.model, 'block', weights, seed=1, num_classes=10), device, args.channels_last)
        model.callback_frames = callback_frames
        return model

    constant = prepare(create_sd(args.model, 'off', weights, num_classes=10), device, args.channels_last)
    models = {SKIPPED: compile_isolated(block(False)), CALLBACK: compile_isolated(block(True)), EAGER: block(False),
              BASELINE: compile_isolated(constant)}
    return {name: TrainStep(model, x, y, device, args.bf16) for name, model in models.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    sd_resnet.compiled_gated_blocks = _dispatch
    x, y = cifar_batch(args, device)
    steps = build_steps(args, device, x, y)
    times = alternate(steps, args.reps, warmup=3, device=device)[args.clock]
    return write_paired_attempt(
        args, argv, device, times, script='skipped_frames',
        title='Attempt 13: skipped frames instead of a callback per block', baseline=BASELINE, reference=SKIPPED,
        compared=(CALLBACK, EAGER), key='paired_skipped_vs_this',
        paired_header='skipped frames / this variant (paired, same draws)')


if __name__ == '__main__':
    main()
