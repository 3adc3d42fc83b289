"""Headline table from the results of train_step, ddp and compile (the table the project README shows).

Run from the repository root after the benchmarks::

    python -m benchmarks.report                 # reads and writes benchmarks/results/*_cpu.*
    python -m benchmarks.report --tag cuda
    python -m benchmarks.report --more-compile cpu_r110_b128_241   # adds a further compile run's rows
    python -m benchmarks.report --more-ddp cpu_b64                 # adds a further DDP run's rows
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.common import RESULTS_DIR, machine_line, markdown_table
from benchmarks.train_step import format_ratio, with_interval
from sd_zoo.hub import write_text_atomic

PEER_ROWS = ('sd_zoo block', 'sd_zoo sample', 'timm DropPath', 'torchvision SD batch', 'torchvision SD row')


def _load(out: str, name: str, tag: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(out, f'{name}_{tag}.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ratio(entry: Dict[str, Any], clock: str) -> str:
    return f"{entry[f'{clock}_ratio']:.3f}x"


def train_rows(train: Dict[str, Any]) -> List[List[str]]:
    parts = [train[k] for k in ('cifar', 'imagenet') if k in train]
    clock = train['settings']['clock']
    rows = [[label] + [_ratio(p['variants'][label], clock) for p in parts] for label in PEER_ROWS]
    rows.append(['limit: sum(p_l) / L (block compute only)'] + [f"{p['limit_block_fraction']:.3f}x" for p in parts])
    if 'accounting' in parts[0]:
        acc = parts[0]['accounting']
        rows.append(['block mode at the expected depth (accounting; 95% interval)',
                     with_interval(acc, 'block_ratio_at_expected_depth')] + ['-'] * (len(parts) - 1))
        rows.append(['limit with the measured per-stage block costs',
                     with_interval(acc, 'limit_measured_block_costs')] + ['-'] * (len(parts) - 1))
        if 'target' in acc:
            label = f"target: block mode at most {acc['target']:.2f}x (at the expected depth)"
            rows.append([label, acc['target_verdict']] + ['-'] * (len(parts) - 1))
    return rows


def compile_rows(comp: Dict[str, Any]) -> List[List[str]]:
    return [[f"compiled training step, {res['model']} b{res['batch']} ({res['reps']} rounds): {name}", format_ratio(t)]
            for res in comp.get('configs', []) for name, t in res['targets'].items()]


def ddp_rows(ddp: Dict[str, Any]) -> List[List[str]]:
    return [[f"DDP, {ddp['world_size']} CPU ranks, {ddp['model']}, {ddp['batch_per_rank']} images a rank "
             f"({ddp['reps']} rounds): {name}", format_ratio(t)] for name, t in ddp.get('targets', {}).items()]


def headline(train: Dict[str, Any], ddp: Optional[Dict[str, Any]], comp: Optional[Dict[str, Any]],
             more_compile: Sequence[Dict[str, Any]] = (), more_ddp: Sequence[Dict[str, Any]] = ()) -> str:
    """The headline tables; ``more_compile`` and ``more_ddp``: further compile and DDP runs (say, longer runs of one
    config, or another batch), listed after ``comp``'s and ``ddp``'s rows, each row naming its run's rounds."""
    parts = [train[k] for k in ('cifar', 'imagenet') if k in train]
    clock = train['settings']['clock']
    head = ['training step vs constant depth'] + [
        f"{p['model']} (batch {p['batch']}, {p['input_size']}px)" for p in parts]
    text = markdown_table(head, train_rows(train))
    extra = []
    if 'eval' in train:
        ev = train['eval']
        extra.append([f"eval forward, {ev['model']} vs {ev['peer']} (batch {ev['batch']})",
                      _ratio(ev['variants'][ev['model']], clock)])
    if ddp:
        for label in ('constant depth, find_unused_parameters', 'sd_zoo block, find_unused_parameters'):
            extra.append([f"DDP, 2 CPU ranks, {ddp['model']}: {label}", _ratio(ddp['variants'][label], ddp['clock'])])
        extra.extend(ddp_rows(ddp))
    for run in more_ddp:
        extra.extend(ddp_rows(run))
    if comp:
        extra.append([f"torch.compile graphs of a training forward, {comp['graphs_model']}: off / sample / block",
                      ' / '.join(str(comp['graphs'][m]['graphs']) for m in ('off', 'sample', 'block'))])
        extra.extend(compile_rows(comp))
    for run in more_compile:
        extra.extend(compile_rows(run))
    if extra:
        text += '\n' + markdown_table(['other measurements', 'value'], extra)
    return text


def target_check(long: Dict[str, Any]) -> str:
    """The accounting of a long CIFAR-only run (many repetitions), which decides the target if anything does."""
    part, acc = long['cifar'], long['cifar']['accounting']
    rows = [
        ['block mode, corrected to the expected depth', with_interval(acc, 'block_ratio_at_expected_depth')],
        ['limit with the measured per-stage block costs', with_interval(acc, 'limit_measured_block_costs')],
        ['block mode at the expected depth minus that limit', with_interval(acc, 'gap_to_limit', '')],
    ]
    if 'fixed_draw_gap' in acc:
        rows.append(['one fixed draw at the expected depth: measured minus the sum of its parts',
                     with_interval(acc, 'fixed_draw_gap', '')])
    rows.append([f"target: block mode at most {acc['target']:.2f}x (at the expected depth)", acc['target_verdict']])
    return (f"\nTarget check, {part['model']}, {part['reps']} repetitions ({machine_line(long['machine'])}; "
            f"in brackets the 95% bootstrap interval):\n\n" + markdown_table(['quantity', 'value'], rows))


def report_command(args: argparse.Namespace) -> str:
    return ' '.join(['python -m benchmarks.report --tag', args.tag] + [f'--more-compile {t}' for t in args.more_compile]
                    + [f'--more-ddp {t}' for t in args.more_ddp])


def _load_more(out: str, name: str, tags: Sequence[str]) -> List[Dict[str, Any]]:
    """The further runs ``--more-{name} TAG`` names; a missing one is an error that names the command making it."""
    runs = []
    for tag in tags:
        run = _load(out, name, tag)
        if run is None:
            raise SystemExit(f'--more-{name} {tag}: no {name}_{tag}.json in {out}; run `python -m '
                             f'benchmarks.{name} --tag {tag}` first, or drop the option')
        runs.append(run)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=RESULTS_DIR)
    parser.add_argument('--tag', default='cpu')
    parser.add_argument('--more-compile', action='append', default=[], metavar='TAG',
                        help='also list the targets of compile_TAG.json, a further compile run (repeatable)')
    parser.add_argument('--more-ddp', action='append', default=[], metavar='TAG',
                        help='also list the targets of ddp_TAG.json, a further DDP run (repeatable)')
    args = parser.parse_args(argv)
    train = _load(args.out, 'train_step', args.tag)
    if train is None:
        raise SystemExit(f'no train_step_{args.tag}.json in {args.out}: run `python -m benchmarks.train_step` first')
    ddp, comp = _load(args.out, 'ddp', args.tag), _load(args.out, 'compile', args.tag)
    long = _load(args.out, 'train_step', f'{args.tag}_long')
    more_compile = _load_more(args.out, 'compile', args.more_compile)
    more_ddp = _load_more(args.out, 'ddp', args.more_ddp)
    commands = [r['command'] for r in (train, ddp, *more_ddp, comp, *more_compile, long) if r]
    clock = train['settings']['clock']
    text = (f"Ratios of medians ({clock} time) on {machine_line(train['machine'])}.\n\n"
            + headline(train, ddp, comp, more_compile, more_ddp)
            + (target_check(long) if long and 'accounting' in long['cifar'] else '')
            + '\nReproduce:\n\n```\n' + '\n'.join(commands + [report_command(args)])
            + '\n```\n')
    write_text_atomic(os.path.join(args.out, f'summary_{args.tag}.md'), text)
    print(text)
    return text


if __name__ == '__main__':
    main()
