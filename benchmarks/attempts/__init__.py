"""The compile attempts of issue 13 (benchmarks/README.md, "torch.compile"), and what their scripts share."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import machine_info, machine_line, markdown_table, median, reproduce_command, write_results
from benchmarks.train_step import format_ratio, paired_ratio, target_check


def cifar_batch(args: argparse.Namespace, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attempts' fixed batch: ``args.batch`` CIFAR-sized images (channels_last if asked) and labels, seed 0."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return x, y


def write_paired_attempt(args: argparse.Namespace, argv: Optional[Sequence[str]], device: torch.device,
                         times: Dict[str, List[float]], *, script: str, title: str, baseline: str, reference: str,
                         compared: Sequence[str], key: str, paired_header: str, note: str = '',
                         extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Results of an attempt whose variants ran the same draws: each variant against ``baseline`` (ratio of
    medians), and ``reference`` / each of ``compared`` paired per round (stored under ``key``); writes
    ``attempt_<script>_<tag>_<model>_b<batch>`` (.json, .md), ``note`` ending the table's caption, and returns the
    payload (``extra`` added to it)."""
    rows: List[List[str]] = []
    per_variant: Dict[str, Any] = {}
    for name in times:
        entry = {'median_s': median(times[name]),
                 'vs_constant': target_check(times, name, baseline, 0.80, args.bootstrap)}
        if name in compared:
            entry[key] = paired_ratio(times, reference, name, args.bootstrap)
        per_variant[name] = entry
        vs_c, pr = entry['vs_constant'], entry.get(key)
        rows.append([name, format_ratio(vs_c), format_ratio(pr) if pr else '-', f"{entry['median_s']:.3f}"])
    payload = {'machine': machine_info(device), 'command': reproduce_command(f'attempts.{script}', argv),
               'model': args.model, 'batch': args.batch, 'reps': args.reps, 'clock': args.clock,
               'channels_last': args.channels_last, 'times_s': times, 'per_variant': per_variant, **(extra or {})}
    markdown = '\n'.join([
        f"Measured on {machine_line(payload['machine'])}.", '',
        f"Reproduce: `{payload['command']}`", '',
        f'**{title}**, {args.model}, batch {args.batch}, {args.reps} rounds, {args.clock} time, 95% bootstrap '
        f'intervals{note}', '',
        markdown_table(['variant', 'vs constant depth compiled (ratio of medians)', paired_header,
                        f'median {args.clock} s'], rows), ''])
    write_results(args.out, f'attempt_{script}_{args.tag or device.type}_{args.model}_b{args.batch}',
                  payload, markdown)
    return payload
