"""torch.compile benchmark: graph counts and compiled training steps of the three modes.

* Graphs: ``torch._dynamo.explain`` of a training forward of the whole model. Sample mode must be one graph
  (inside a compiled graph its masks come from torch's RNG); block mode breaks where the gates are drawn
  and branched on in Python.
* Timing (inductor): constant depth compiled whole; sample mode compiled whole; block mode with each
  block's residual branch compiled on its own and the Python gate left outside (a dropped block still skips
  its branch), against the eager versions. Compile times are reported too.

Compiling on a 2-core CPU is slow, so the default is a small model. Run from the repository root::

    python -m benchmarks.compile                       # sd_resnet20_cifar, batch 64
    python -m benchmarks.compile --quick               # graph counts plus a short timing
    python -m benchmarks.compile --device cuda --bf16 --channels-last --model sd_resnet110_cifar --batch 128
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch._dynamo
from torch import nn

from benchmarks.common import (
    TrainStep,
    add_device_args,
    alternate,
    apply_device_args,
    create_sd,
    machine_info,
    machine_line,
    markdown_table,
    prepare,
    ratio_table,
    reproduce_command,
    synchronize,
    write_results,
)

BASELINE = 'constant depth, eager'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--model', default='sd_resnet20_cifar')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--no-timing', action='store_true', help='graph counts only')
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = min(args.batch, 16)
    args.reps = args.reps or (3 if args.quick else 7)
    return args


def explain_graphs(model: nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Graph and graph-break count of one training forward under dynamo (no code generation)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.train())(x)
    reasons = [str(getattr(b, 'reason', b)).split('\n')[0][:160] for b in explanation.break_reasons]
    return {'graphs': explanation.graph_count, 'graph_breaks': explanation.graph_break_count,
            'break_reasons': sorted(set(reasons))[:5]}


def compile_branches(model: nn.Module) -> nn.Module:
    """Compile every block's residual branch on its own; the gate (and the skip) stay in Python."""
    for block in model.sd_blocks():
        block.branch = torch.compile(block.branch)
    return model


def _raise_recompile_limit(limit: int) -> None:
    # every block instance is its own compiled frame; the default limit (8) would send the rest to eager
    for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def build_steps(args: argparse.Namespace, device: torch.device, x: torch.Tensor,
                y: torch.Tensor) -> Dict[str, TrainStep]:
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()

    def make(mode: str) -> nn.Module:
        return prepare(create_sd(args.model, mode, weights, num_classes=10), device, args.channels_last)

    models = {
        BASELINE: make('off'),
        'constant depth, compiled': torch.compile(make('off')),
        'sd_zoo block, eager': make('block'),
        'sd_zoo block, branches compiled': compile_branches(make('block')),
        'sd_zoo sample, eager': make('sample'),
        'sd_zoo sample, compiled': torch.compile(make('sample')),
    }
    return {label: TrainStep(m, x, y, device, args.bf16) for label, m in models.items()}


def first_steps(steps: Dict[str, TrainStep], device: torch.device, calls: int) -> Dict[str, float]:
    """Wall seconds of the first ``calls`` steps of each variant (compilation, and block-mode recompiles)."""
    seconds = {}
    for label, step in steps.items():
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize(device)
        seconds[label] = time.perf_counter() - start
    return seconds


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    info = machine_info(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    graphs = {mode: explain_graphs(prepare(create_sd(args.model, mode, num_classes=10), device,
                                           args.channels_last), x)
              for mode in ('off', 'sample', 'block')}
    payload: Dict[str, Any] = {'machine': info, 'command': reproduce_command('compile', argv), 'model': args.model,
                               'batch': args.batch, 'clock': args.clock, 'flush_denormal': args.flush_denormal,
                               'graphs': graphs}
    rows = [[mode, g['graphs'], g['graph_breaks'], '; '.join(g['break_reasons'])[:200] or '-']
            for mode, g in graphs.items()]
    markdown = (f"Measured on {machine_line(info)}.\n\nReproduce: `{payload['command']}`\n\n"
                f"**torch.compile graphs** (`torch._dynamo.explain`, training forward of {args.model})\n\n"
                + markdown_table(['drop_path_mode', 'graphs', 'graph breaks', 'break reasons'], rows))
    if not args.no_timing:
        torch._dynamo.reset()
        _raise_recompile_limit(64)
        steps = build_steps(args, device, x, y)
        payload['first_steps_s'] = first_steps(steps, device, calls=3)
        times = alternate(steps, args.reps, warmup=0, device=device)
        payload['variants'], payload['times_s'] = ratio_table(times, BASELINE), times
        payload['reps'] = args.reps
        markdown += '\n' + timing_markdown(payload, args)
    write_results(args.out, f"compile_{args.tag or device.type}", payload, markdown)
    return payload


def timing_markdown(payload: Dict[str, Any], args: argparse.Namespace) -> str:
    clock, other = args.clock, ('wall' if args.clock == 'cpu' else 'cpu')
    rows = [[label, f"**{v[f'{clock}_ratio']:.3f}x**", f"{v[f'{other}_ratio']:.3f}x",
             f"{v[f'{clock}_median_s']:.3f}", f"{payload['first_steps_s'][label]:.1f}"]
            for label, v in payload['variants'].items()]
    return (f"**Compiled training step** (inductor), {args.model}, batch {args.batch}, median of {args.reps} "
            f"after 3 warm-up steps\n\n"
            + markdown_table(['variant', f'step vs constant depth, eager ({clock} time)', f'({other} time)',
                              f'median {clock} s (this machine)', 'first 3 steps, wall s (compile)'], rows))


if __name__ == '__main__':
    main()
