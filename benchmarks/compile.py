"""torch.compile benchmark: compiled stochastic depth against compiled constant depth and the compiled
per-sample mask, on the same weights, timed side by side in one process.

* Graphs: ``torch._dynamo.explain`` of a training forward of the whole model, per mode.
* Variants (inductor): constant depth eager and compiled; block mode eager; block mode compiled with
  ``torch.compile(model)`` as a user writes it (``compile_blocks='regions'``, the default: stem and head compiled,
  runs of kept blocks compiled as regions shared by the runs of their length and shape, the gates in Python
  behind one graph break) and with ``compile_blocks='eager'`` (the gated blocks run eagerly); the per-sample mask (sample mode,
  timm DropPath-like) compiled whole.
* Warm-up: wall seconds of the first three steps of each variant, inductor's on-disk cache emptied first
  (``--warm-cache`` keeps it); compiled graphs and recompiles counted per variant, in one untimed round of all
  variants after the warm-ups (see :func:`settle`) and while timed.
* Targets (issue 13): block compiled at most 0.80x compiled constant depth, and at least 20% faster than the
  compiled per-sample mask (ratio at most 0.80), judged on 95% bootstrap intervals of the ratio of medians
  (the unit resampled is one round of all variants). A missed target gets profiler tables of both steps.

Run from the repository root (each configuration compiles six models; about 15 minutes on 2 CPU cores)::

    python -m benchmarks.compile                        # sd_resnet56_cifar b64 and sd_resnet110_cifar b128
    python -m benchmarks.compile --quick                # sd_resnet20_cifar, batch 8, 3 repetitions
    python -m benchmarks.compile --device cuda --bf16 --channels-last --tag gpu
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch._dynamo
from torch import nn

from benchmarks.common import (
    TrainStep,
    add_device_args,
    alternate,
    apply_device_args,
    clear_compile_events,
    compile_events,
    compile_isolated,
    create_sd,
    machine_info,
    machine_line,
    markdown_table,
    prepare,
    profile_table,
    ratio_table,
    reproduce_command,
    synchronize,
    write_results,
)
from benchmarks.train_step import target_check, targets_markdown
from sd_zoo.sd_resnet import reset_compiled_regions

BASELINE = 'constant depth, compiled'
BLOCK = 'sd_zoo block, compiled'  # torch.compile(model): the default compile_blocks='regions'
EAGER_BLOCKS = 'sd_zoo block, compiled, eager blocks'
SAMPLE = 'sd_zoo sample (per-sample mask), compiled'
VARIANTS: Dict[str, Tuple[str, bool, str]] = {  # label -> (drop_path_mode, compiled, compile_blocks)
    'constant depth, eager': ('off', False, 'eager'),
    BASELINE: ('off', True, 'eager'),
    'sd_zoo block, eager': ('block', False, 'eager'),
    BLOCK: ('block', True, 'regions'),
    EAGER_BLOCKS: ('block', True, 'eager'),
    SAMPLE: ('sample', True, 'eager'),
}
TARGETS = (  # (name, numerator, denominator, at most)
    ('block compiled vs constant depth compiled', BLOCK, BASELINE, 0.80),
    ('block compiled vs per-sample mask compiled', BLOCK, SAMPLE, 0.80),
)
CONFIGS = (('sd_resnet56_cifar', 64), ('sd_resnet110_cifar', 128))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--config', action='append', metavar='MODEL:BATCH',
                        help='model and batch to measure (repeatable); default: the two of issue 13')
    parser.add_argument('--warm-cache', action='store_true', help="keep inductor's on-disk cache (warm-up shorter)")
    parser.add_argument('--bootstrap', type=int, default=2000, help='bootstrap resamples for the 95%% intervals')
    parser.add_argument('--no-timing', action='store_true', help='graph counts only')
    args = parser.parse_args(argv)
    if args.config:
        args.configs = [(c.split(':')[0], int(c.split(':')[1])) for c in args.config]
    else:
        args.configs = [('sd_resnet20_cifar', 8)] if args.quick else list(CONFIGS)
    args.reps = args.reps or (3 if args.quick else 9)
    return args


def explain_graphs(model: nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Graph and graph-break count of one training forward under dynamo (no code generation)."""
    torch._dynamo.reset()
    reset_compiled_regions()
    explanation = torch._dynamo.explain(model.train())(x)
    reasons = [str(getattr(b, 'reason', b)).split('\n')[0][:160] for b in explanation.break_reasons]
    return {'graphs': explanation.graph_count, 'graph_breaks': explanation.graph_break_count,
            'break_reasons': sorted(set(reasons))[:5]}


def build_model(model_name: str, variant: str, weights: Dict[str, torch.Tensor], device: torch.device,
                channels_last: bool, backend: str = 'inductor', isolate: bool = True) -> nn.Module:
    mode, compiled, compile_blocks = VARIANTS[variant]
    model = prepare(create_sd(model_name, mode, weights, num_classes=10), device, channels_last)
    model.stochastic_depth.compile_blocks = compile_blocks
    return compile_isolated(model, backend, isolate) if compiled else model


def warm_up(step: TrainStep, device: torch.device, calls: int = 3) -> Dict[str, Any]:
    """Wall seconds of the first ``calls`` steps, and the graphs compiled and recompiles made meanwhile."""
    graphs_before = clear_compile_events()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return {'first_steps_s': time.perf_counter() - start, **compile_events(graphs_before)}


def settle(steps: Dict[str, TrainStep], device: torch.device) -> Dict[str, Any]:
    """One untimed step of every variant, in the timed rounds' order, after all the warm-ups. The variants share
    the package's code; compiled in isolation (:func:`benchmarks.common.compile_isolated`) none of them compiles
    anything here, and what this round counts shows it (the runs before isolation had a recompile, and a 25-66 s
    step, in their first timed round)."""
    graphs_before = clear_compile_events()
    for step in steps.values():
        step()
    synchronize(device)
    return compile_events(graphs_before)


def measure_config(model_name: str, batch: int, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    weights = create_sd(model_name, 'off', num_classes=10).state_dict()
    torch._dynamo.reset()
    reset_compiled_regions()
    steps, warm = {}, {}
    for variant in VARIANTS:
        steps[variant] = TrainStep(build_model(model_name, variant, weights, device, args.channels_last), x, y,
                                   device, args.bf16)
        warm[variant] = warm_up(steps[variant], device)
        print(f'  {model_name} b{batch}: {variant}: first 3 steps {warm[variant]["first_steps_s"]:.1f}s', flush=True)
    settled = settle(steps, device)
    graphs_before = clear_compile_events()
    times = alternate(steps, args.reps, warmup=0, device=device)
    result: Dict[str, Any] = {'model': model_name, 'batch': batch, 'reps': args.reps, 'warm_up': warm,
                              'variants': ratio_table(times, BASELINE), 'times_s': times,
                              'untimed_round': settled, 'while_timed': compile_events(graphs_before),
                              'profiles': {}}
    result['targets'] = {name: target_check(times[args.clock], num, den, target, args.bootstrap)
                         for name, num, den, target in TARGETS}
    if any(t['verdict'] != 'met' for t in result['targets'].values()):
        result['profiles'] = {v: profile_table(steps[v]) for v in (BLOCK, BASELINE)}
    base = warm[BASELINE]['first_steps_s']
    result['warm_up_vs_constant_compiled'] = {v: w['first_steps_s'] / base for v, w in warm.items()
                                              if VARIANTS[v][1]}
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    info = machine_info(device)
    payload: Dict[str, Any] = {'machine': info, 'command': reproduce_command('compile', argv), 'clock': args.clock,
                               'flush_denormal': args.flush_denormal, 'bf16': args.bf16,
                               'channels_last': args.channels_last, 'torch': torch.__version__, 'configs': []}
    model_name = args.configs[0][0]
    x = torch.randn(2, 3, 32, 32, device=device)
    payload['graphs'] = {mode: explain_graphs(prepare(create_sd(model_name, mode, num_classes=10), device,
                                                      args.channels_last), x)
                         for mode in ('off', 'sample', 'block')}
    payload['graphs_model'] = model_name
    if not args.no_timing:
        with tempfile.TemporaryDirectory() as cache:
            if not args.warm_cache:  # a cold start, as a user's first run
                os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache
            for model_name, batch in args.configs:
                payload['configs'].append(measure_config(model_name, batch, args, device))
    write_results(args.out, f"compile_{args.tag or device.type}", payload, to_markdown(payload, args))
    return payload


def to_markdown(payload: Dict[str, Any], args: argparse.Namespace) -> str:
    rows = [[mode, g['graphs'], g['graph_breaks'], '; '.join(g['break_reasons'])[:200] or '-']
            for mode, g in payload['graphs'].items()]
    md = (f"Measured on {machine_line(payload['machine'])}.\n\n"
          f"Reproduce: `{payload['command']}`\n\n"
          f"**torch.compile graphs** (`torch._dynamo.explain`, training forward of {payload['graphs_model']})\n\n"
          + markdown_table(['drop_path_mode', 'graphs', 'graph breaks', 'break reasons'], rows))
    clock, other = args.clock, ('wall' if args.clock == 'cpu' else 'cpu')
    for res in payload['configs']:
        warm = res['warm_up']
        rows = [[label, f"**{v[f'{clock}_ratio']:.3f}x**", f"{v[f'{other}_ratio']:.3f}x",
                 f"{v[f'{clock}_median_s']:.3f}", f"{warm[label]['first_steps_s']:.1f}",
                 warm[label]['graphs'], warm[label]['recompiles']]
                for label, v in res['variants'].items()]
        settled, timed = res['untimed_round'], res['while_timed']
        md += (f"\n\n**Training step, {res['model']}, batch {res['batch']}** (inductor; median of {res['reps']} "
               f"interleaved rounds after 3 warm-up steps per variant and one untimed round; while timed: "
               f"{timed['graphs']} graphs compiled, {timed['recompiles']} recompiles; in the untimed round after all "
               f"warm-ups, each variant's cache entries isolated: {settled['graphs']} graphs, "
               f"{settled['recompiles']} recompiles{_reasons(settled)})\n\n"
               + markdown_table(['variant', f'step vs constant depth, compiled ({clock} time)', f'({other} time)',
                                 f'median {clock} s (this machine)', 'first 3 steps, wall s',
                                 'graphs compiled', 'recompiles'], rows))
        md += '\n\n' + targets_markdown(res['targets'])
        for variant, table in res['profiles'].items():
            md += f"\n\nProfile of one step, {variant} (a target was missed):\n\n```\n{table}\n```"
    return md


def _reasons(events: Dict[str, Any]) -> str:
    return f" ({'; '.join(f'`{r}`' for r in events['recompile_reasons'])})" if events['recompile_reasons'] else ''


if __name__ == '__main__':
    main()
