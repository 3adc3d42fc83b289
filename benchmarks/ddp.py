"""DDP benchmark: two CPU processes (gloo), block mode against constant depth, eager and compiled.

The default ``drop_path_grad='zero'`` gives a dropped block's parameters a zero gradient, so block mode works under
plain DistributedDataParallel; with ``drop_path_grad='none'`` they get none and DDP needs
``find_unused_parameters=True``, a search that costs time every step. The variants, all on one set of weights,
timed round-robin inside the same two processes:

* ``constant depth`` (plain DDP, the baseline), and with ``find_unused_parameters`` (the price of the search);
* ``sd_zoo block`` (plain DDP), and ``sd_zoo block, find_unused_parameters`` (``drop_path_grad='none'``);
* ``sd_zoo sample`` (plain DDP: every branch computed);
* ``constant depth, compiled`` and ``sd_zoo block, compiled``: ``torch.compile(DDP(model))``;
* with ``--without-ddp``, also ``constant depth, no DDP`` and ``sd_zoo block, no DDP``: the same models stepping in
  the same two processes, not wrapped (gradients not synchronized). They separate what DDP itself costs from what
  two processes sharing the machine cost, and give block mode's ratio under the same sharing without DDP.

Each rank seeds its gate generator differently (as timm's ``train.py`` seeds ``seed + rank``); the first draw
broadcasts rank 0's generator state, and the script checks that both ranks dropped the same blocks in every
step. Targets (issue 13): block mode at most 0.80x constant depth, eager and compiled, on 95% bootstrap
intervals of the ratio of medians.

Run from the repository root::

    python -m benchmarks.ddp                      # sd_resnet110_cifar, 32 images per rank
    python -m benchmarks.ddp --batch-per-rank 64  # the paper's recipe on two ranks (global batch 128)
    python -m benchmarks.ddp --batch-per-rank 64 --without-ddp  # and where the DDP step's time goes
    python -m benchmarks.ddp --quick
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

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
    write_results,
)
from benchmarks.train_step import format_ratio, ratio_check, target_check, targets_markdown

BASELINE = 'constant depth'
COMPILED_BASELINE = 'constant depth, compiled'
VARIANTS = {  # label -> (drop_path_mode, drop_path_grad, find_unused_parameters, compiled)
    BASELINE: ('off', 'zero', False, False),
    'constant depth, find_unused_parameters': ('off', 'zero', True, False),
    'sd_zoo block': ('block', 'zero', False, False),
    'sd_zoo block, find_unused_parameters': ('block', 'none', True, False),
    'sd_zoo sample': ('sample', 'zero', False, False),
    COMPILED_BASELINE: ('off', 'zero', False, True),
    'sd_zoo block, compiled': ('block', 'zero', False, True),
}
UNSYNCED = {  # --without-ddp: not wrapped in DDP, stepping in the same processes as the others
    'constant depth, no DDP': ('off', 'zero', False, False),
    'sd_zoo block, no DDP': ('block', 'zero', False, False),
}
GATE_SEED = 1234  # rank r seeds its gates GATE_SEED + r; rank 0's state is broadcast at the first draw
WARMUP_ROUNDS = 3  # untimed rounds: a compiled block shape is compiled the first time one of its blocks is kept
PROFILED = (BASELINE, 'sd_zoo block', COMPILED_BASELINE, 'sd_zoo block, compiled')
TARGETS = (  # (name, numerator, denominator, at most): issue 13, point 3
    ('block vs constant depth, eager (plain DDP)', 'sd_zoo block', BASELINE, 0.80),
    ('block vs constant depth, both compiled', 'sd_zoo block, compiled', COMPILED_BASELINE, 0.80),
)
DIAGNOSTICS = (  # (name, numerator, denominator): --without-ddp, where a DDP step's time goes
    ('block vs constant depth, both without DDP (same two processes)', 'sd_zoo block, no DDP',
     'constant depth, no DDP'),
    ("DDP's own cost in a constant-depth step (with / without DDP)", BASELINE, 'constant depth, no DDP'),
    ("DDP's own cost in a block-mode step (with / without DDP)", 'sd_zoo block', 'sd_zoo block, no DDP'),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--model', default='sd_resnet110_cifar')
    parser.add_argument('--batch-per-rank', type=int, default=32)
    parser.add_argument('--world-size', type=int, default=2)
    parser.add_argument('--without-ddp', action='store_true',
                        help='also time constant depth and block mode not wrapped in DDP, in the same processes')
    args = parser.parse_args(argv)
    if args.quick:
        args.model = 'sd_resnet20_cifar' if args.model == 'sd_resnet110_cifar' else args.model
        args.batch_per_rank = min(args.batch_per_rank, 16)
    args.reps = args.reps or (3 if args.quick else 7)
    if args.device != 'cpu':
        raise SystemExit('benchmarks.ddp measures CPU processes (gloo): use --device cpu')
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, args: argparse.Namespace, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=args.world_size)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
        torch.set_flush_denormal(args.flush_denormal)
        result = _measure(rank, args)
        if rank == 0:
            with open(out_path, 'w') as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, args: argparse.Namespace) -> Dict[str, Any]:
    torch.manual_seed(0)  # same weights and batch shapes everywhere; each rank gets its own data below
    weights = create_sd(args.model, 'off', num_classes=10).state_dict()
    steps, sds = {}, {}
    variants = variants_of(args)
    for label, (mode, dropped_grad, find_unused, compiled) in variants.items():
        # each rank seeds its gates differently (as timm's train.py does): the first draw broadcasts rank 0's
        model = create_sd(args.model, mode, weights, seed=GATE_SEED + rank, num_classes=10, drop_path_grad=dropped_grad)
        prepare(model, torch.device('cpu'), args.channels_last)
        sds[label] = model.stochastic_depth
        wrapped = model if label in UNSYNCED else DistributedDataParallel(model, find_unused_parameters=find_unused)
        steps[label] = TrainStep(compile_isolated(wrapped) if compiled else wrapped, torch.empty(0), torch.empty(0),
                                 torch.device('cpu'), False)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_per_rank, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_per_rank,), generator=gen)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for step in steps.values():
        step.x, step.y = x, y
    mismatches: List[int] = []
    kept: Dict[str, List[int]] = {label: [] for label, v in variants.items() if v[0] == 'block'}

    def after_each(label: str, rep: int) -> None:
        if label in kept:
            gathered: List[Any] = [None] * args.world_size
            dist.all_gather_object(gathered, sds[label].last_active)
            mismatches.append(sum(g != gathered[0] for g in gathered))
            kept[label].append(sum(gathered[0]))
        dist.barrier()  # every timed step starts with the ranks aligned

    alternate(steps, 0, warmup=WARMUP_ROUNDS)
    graphs_before = clear_compile_events()
    times = alternate(steps, args.reps, warmup=0, after_each=after_each)
    per_rank: List[Any] = [None] * args.world_size
    dist.all_gather_object(per_rank, compile_events(graphs_before))
    compiled_while_timed = {'graphs': sum(e['graphs'] for e in per_rank),
                            'recompiles': sum(e['recompiles'] for e in per_rank),
                            'recompile_reasons': sorted({r for e in per_rank for r in e['recompile_reasons']})}
    slowest = {}
    for clock, by_name in times.items():  # a DDP step lasts as long as its slowest rank
        slowest[clock] = {}
        for label, values in by_name.items():
            t = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            slowest[clock][label] = t.tolist()
    # which variants' weights stayed identical on every rank (DDP's do; the unwrapped ones' drift apart)
    checksums: List[Any] = [None] * args.world_size
    sums = {label: [float(p.detach().double().sum()) for p in step.model.parameters()] for label, step in steps.items()}
    dist.all_gather_object(checksums, sums)
    synchronized = {label: all(c[label] == checksums[0][label] for c in checksums) for label in steps}
    # one profiled step of each variant a target names (both ranks step, rank 0's table is kept): where the time
    # goes, shown in the results when a target is missed
    profiles = {label: profile_table(steps[label]) for label in PROFILED}
    block_sd = sds[next(iter(kept))]
    realized = {'expected': block_sd.expected_depth, 'of': block_sd.num_blocks, 'per_variant': {
        label: sum(counts) / len(counts) for label, counts in kept.items() if counts}}
    return {'times_s': slowest, 'rank_gate_mismatches': sum(mismatches), 'kept_blocks': realized,
            'compiled_while_timed': compiled_while_timed, 'synchronized': synchronized, 'profiles': profiles}


def variants_of(args: argparse.Namespace) -> Dict[str, Any]:
    return {**VARIANTS, **(UNSYNCED if args.without_ddp else {})}


def kept_blocks_text(kept: Dict[str, Any]) -> str:
    """', kept 41.23 of 54 blocks a step on average (expected 40.25)': what the timed block-mode steps ran (the
    variants share one gate seed, so one draw sequence); a ratio reads high or low by as much as this differs."""
    means = sorted(set(round(m, 2) for m in kept['per_variant'].values()))
    return (f", kept {' / '.join(f'{m:.2f}' for m in means)} of {kept['of']} blocks a step on average "
            f"(expected {kept['expected']:.2f})") if means else ''


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    info = machine_info(device)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, 'ddp.json')
        mp.spawn(_worker, args=(args, _free_port(), out_path), nprocs=args.world_size, join=True)
        with open(out_path) as f:
            measured = json.load(f)
    if measured['rank_gate_mismatches']:
        raise RuntimeError(f"ranks dropped different blocks in {measured['rank_gate_mismatches']} steps")
    drifted = [label for label, same in measured['synchronized'].items() if not same and label not in UNSYNCED]
    if drifted:
        raise RuntimeError(f'the weights of {drifted} differ between ranks after the timed steps: not synchronized')
    table = ratio_table(measured['times_s'], BASELINE)
    times = measured['times_s'][args.clock]
    targets = {name: target_check(times, num, den, target) for name, num, den, target in TARGETS}
    diagnostics = {name: ratio_check(times, num, den) for name, num, den in DIAGNOSTICS if args.without_ddp}
    payload = {'machine': info, 'command': reproduce_command('ddp', argv), 'model': args.model,
               'batch_per_rank': args.batch_per_rank, 'world_size': args.world_size, 'reps': args.reps,
               'clock': args.clock, 'flush_denormal': args.flush_denormal, 'channels_last': args.channels_last,
               'threads_per_rank': max(1, (os.cpu_count() or 1) // args.world_size), 'variants': table,
               'targets': targets, 'diagnostics': diagnostics, **measured}
    other = 'wall' if args.clock == 'cpu' else 'cpu'
    rows = [[label, f"**{v[f'{args.clock}_ratio']:.3f}x**", f"{v[f'{other}_ratio']:.3f}x",
             f"{v[f'{args.clock}_median_s']:.3f}"] for label, v in table.items()]
    markdown = (f"Measured on {machine_line(info)}.\n\nReproduce: `{payload['command']}`\n\n"
                f"**DDP, {args.world_size} CPU processes (gloo)**, {args.model}, {args.batch_per_rank} images "
                f"per rank{', channels_last' if args.channels_last else ''}, {payload['threads_per_rank']} torch thread(s) "
                f"per rank, median of {args.reps} "
                f"(slowest rank per step); both ranks dropped the same blocks in every block-mode step"
                f"{kept_blocks_text(measured['kept_blocks'])}; "
                f"compiled while timed (all ranks): "
                f"{payload['compiled_while_timed']['graphs']} graphs, "
                f"{payload['compiled_while_timed']['recompiles']} recompiles\n\n"
                + markdown_table(['variant', f'step vs constant depth ({args.clock} time, per rank)',
                                  f'({other} time)', f'median {args.clock} s (this machine)'], rows)
                + '\n\n' + targets_markdown(targets, 'target (issue 13)'))
    if diagnostics:
        markdown += '\n\n' + markdown_table(
            ['where the DDP step\'s time goes (--without-ddp)', 'ratio of medians [95% interval]'],
            [[name, format_ratio(d)] for name, d in diagnostics.items()])
    if any(t['verdict'] != 'met' for t in targets.values()):
        markdown += ''.join(f"\n\nProfile of one step, {label}, rank 0 (a target was missed):\n\n```\n{table}\n```"
                            for label, table in measured['profiles'].items())
    write_results(args.out, f"ddp_{args.tag or 'cpu'}", payload, markdown)
    return payload


if __name__ == '__main__':
    main()
