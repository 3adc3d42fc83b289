"""Attempt 10 of issue 13 (benchmarks/README.md, "torch.compile"): how fast could compiled block mode be at best?

The issue's target asks compiled block mode for at most 0.80x compiled constant depth. This measures the bound
that any compiled stochastic depth meets on this machine, on one draw: the expected number of blocks per stage
kept (the accounting's fixed draw, ``benchmarks.train_step.fixed_draw``), the same blocks every step, and

* ``pruned, compiled``: a constant-depth copy of the model with the draw's dropped blocks taken out (an identity
  block becomes ``nn.Identity``, a downsampling one its shortcut and activation), compiled as one graph. It runs
  exactly the kept blocks, with all of inductor's fusion across them and no per-block call: what compiled
  stochastic depth would cost if every draw had its own whole-model graph (2^L graphs, not a usable design);
* ``block mode, compiled``: the package's path (``torch.compile(model)``, regions) on a model whose schedule keeps
  exactly that draw (survival 1 or 1e-9 per block), and the same with the regions' batch dimension dynamic (how
  the regions compiled before attempt 11: one graph for every batch size, slower kernels);
* both eager, and constant depth compiled and eager.

So ``pruned, compiled`` / ``constant depth, compiled`` is the compute limit of the linear rule with compiled
kernels on this CPU, and ``block mode, compiled`` / ``pruned, compiled`` what the regions cost against it. All
variants run the same draw in every round, so their ratios are paired. Nothing here changes the package (the
dynamic-batch variant wraps ``sd_zoo.sd_resnet._region_for`` and has regions of its own).

    python -m benchmarks.attempts.compiled_bound --channels-last --config sd_resnet56_cifar:64 --reps 21
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import sd_zoo.sd_resnet as sd_resnet
from benchmarks.attempts import cifar_batch
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
from benchmarks.train_step import (
    FIXED_DRAW,
    accounting_schedules,
    paired_ratio,
    per_stage,
    stage_sizes,
    target_check,
)

BASELINE = 'constant depth, compiled'
CONSTANT_EAGER = 'constant depth, eager'
BLOCK = 'block mode (the draw), compiled'
BLOCK_DYNAMIC = 'block mode (the draw), compiled, regions with a dynamic batch'
BLOCK_EAGER = 'block mode (the draw), eager'
PRUNED = 'pruned to the draw, compiled (the bound)'
PRUNED_EAGER = 'pruned to the draw, eager'


class DroppedDownsample(nn.Module):
    """A dropped downsampling block: its shortcut and its activation (what block mode runs for it)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.downsample, self.act = block.downsample, block.act_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.downsample(x))


_package_region_for = sd_resnet._region_for
_DYNAMIC_REGIONS: Dict[Any, Callable[..., torch.Tensor]] = {}


@torch.compiler.disable
def _region_for(block: nn.Module, x: torch.Tensor, length: int = 1) -> Callable[..., torch.Tensor]:
    """The package's region for a run of ``length`` blocks like ``block``; for models marked
    ``dynamic_batch_regions``, a region of their own with a dynamic batch, as before attempt 11. Their own: dynamo
    keeps compiled graphs per code object, and a dynamic graph's guards accept any batch, so with shared code each
    variant could run the other's graphs."""
    if not getattr(block.stochastic_depth, 'dynamic_batch_regions', False):
        return _package_region_for(block, x, length)
    key = (sd_resnet.region_key(block), length)
    if key not in _DYNAMIC_REGIONS:
        name = f'kept_run_{length}_dynamic_region_{len(_DYNAMIC_REGIONS)}'
        _DYNAMIC_REGIONS[key] = sd_resnet._Region(sd_resnet._kept_run, name).fn
    torch._dynamo.maybe_mark_dynamic(x, 0)
    return _DYNAMIC_REGIONS[key]


def prune_to(model: nn.Module, kept: Sequence[bool]) -> nn.Module:
    """A constant-depth ``model`` with the blocks the draw drops taken out (in place)."""
    stages = [getattr(model, name) for name in model.stage_names]
    if sum(map(len, stages)) != len(kept):
        raise ValueError(f'the model has {sum(map(len, stages))} blocks, the draw {len(kept)}')
    flags = iter(kept)
    for stage in stages:
        for i, block in enumerate(list(stage)):
            if not next(flags):
                stage[i] = nn.Identity() if block.downsample is None else DroppedDownsample(block)
    return model


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_attempt_args(attempt_parser(__doc__), argv, reps=21)


def build_steps(args: argparse.Namespace, device: torch.device, x: torch.Tensor,
                y: torch.Tensor) -> Dict[str, Any]:
    """The seven variants on one set of weights, and the draw they run."""
    base = create_sd(args.model, 'off', num_classes=10)
    weights, sizes = base.state_dict(), stage_sizes(base)
    linear = create_sd(args.model, 'block', weights, num_classes=10).stochastic_depth.survival
    schedule = accounting_schedules(sizes, linear)[FIXED_DRAW]  # survival 1 (kept) or 1e-9 (dropped)
    kept = [p == 1.0 for p in schedule]

    def model(kind: str) -> nn.Module:
        if kind.startswith('block'):
            m = create_sd(args.model, 'block', weights, drop_path_schedule=schedule, num_classes=10)
            m.stochastic_depth.dynamic_batch_regions = kind == 'block, dynamic'
        else:
            m = create_sd(args.model, 'off', weights, num_classes=10)
            if kind == 'pruned':
                prune_to(m, kept)
        return prepare(m, device, args.channels_last)

    models = {BASELINE: compile_isolated(model('off')), CONSTANT_EAGER: model('off'),
              BLOCK: compile_isolated(model('block')), BLOCK_DYNAMIC: compile_isolated(model('block, dynamic')),
              BLOCK_EAGER: model('block'),
              PRUNED: compile_isolated(model('pruned')), PRUNED_EAGER: model('pruned')}
    steps = {name: TrainStep(m, x, y, device, args.bf16) for name, m in models.items()}
    return {'steps': steps, 'kept': kept, 'sizes': sizes}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    x, y = cifar_batch(args, device)
    sd_resnet._region_for = _region_for
    built = build_steps(args, device, x, y)
    steps, kept = built['steps'], built['kept']
    times = alternate(steps, args.reps, warmup=3, device=device)[args.clock]
    pairs = [(PRUNED, BASELINE), (BLOCK, BASELINE), (BLOCK, PRUNED), (BLOCK_DYNAMIC, BASELINE),
             (BLOCK_DYNAMIC, PRUNED), (BLOCK, BLOCK_DYNAMIC), (PRUNED_EAGER, CONSTANT_EAGER),
             (BLOCK_EAGER, CONSTANT_EAGER), (BLOCK_EAGER, PRUNED_EAGER), (BASELINE, CONSTANT_EAGER),
             (PRUNED, PRUNED_EAGER), (BLOCK, BLOCK_EAGER)]
    ratios = {f'{a} / {b}': target_check(times, a, b, 0.80, args.bootstrap) for a, b in pairs}
    paired = {f'{a} / {b}': paired_ratio(times, a, b, args.bootstrap)
              for a, b in [(BLOCK, PRUNED), (BLOCK, BLOCK_DYNAMIC), (BLOCK_DYNAMIC, PRUNED)]}
    kept_per_stage = [round(k) for k in per_stage(built['sizes'], kept)]
    payload = {'machine': machine_info(device), 'command': reproduce_command('attempts.compiled_bound', argv),
               'model': args.model, 'batch': args.batch, 'reps': args.reps, 'clock': args.clock,
               'channels_last': args.channels_last, 'kept': kept, 'kept_per_stage': kept_per_stage,
               'stage_sizes': built['sizes'], 'times_s': times,
               'medians_s': {name: median(t) for name, t in times.items()}, 'ratios': ratios, 'paired': paired}
    rows: List[List[str]] = []
    for name, check in ratios.items():
        low, high = check['interval_95']
        pair = paired.get(name)
        rows.append([name, f"{check['ratio']:.3f}x [{low:.3f}, {high:.3f}]",
                     f"{pair['ratio']:.3f}x [{pair['interval_95'][0]:.3f}, {pair['interval_95'][1]:.3f}]"
                     if pair else '-'])
    markdown = '\n'.join([
        f"Measured on {machine_line(payload['machine'])}.", '',
        f"Reproduce: `{payload['command']}`", '',
        f'**Attempt 10: the bound for compiled block mode**, {args.model}, batch {args.batch}, one draw keeping '
        f"{', '.join(map(str, kept_per_stage))} of {', '.join(map(str, built['sizes']))} blocks per stage, "
        f'{args.reps} rounds, {args.clock} time, ratios of medians with 95% bootstrap intervals', '',
        markdown_table(['ratio', 'ratio of medians', 'median of per-round ratios (paired)'], rows), ''])
    write_results(args.out, f"attempt_compiled_bound_{args.tag or device.type}_{args.model}_b{args.batch}",
                  payload, markdown)
    return payload


if __name__ == '__main__':
    main()
