"""Attempt 8 of issue 13 (benchmarks/README.md, "torch.compile"): the gates as ``torch.cond``, one graph per model.

A stand-alone stage of basic blocks (16 channels, 3x3 convolutions, BatchNorm, ReLU, identity shortcut: the first
stage of a CIFAR ResNet), not the package's model, compiled whole four ways:

* ``constant depth``: every block runs (the baseline).
* ``regions``: the package's approach rebuilt for this stage (each kept block's branch and add compiled as one
  region shared by all blocks, its ReLU eager and in place, the gates in Python).
* ``cond``: each block is ``torch.cond(keep, kept, dropped, ...)`` on a 0-d bool tensor gate. BatchNorm runs
  on batch statistics without touching its buffers inside the branch (higher-order ops refuse input mutation);
  the branch returns the statistics and the running averages are updated after the ``cond`` with
  ``torch.where(keep, ...)``. torch's autograd for ``cond`` saves only the branch's inputs and runs the branch
  again in the backward.
* ``cond, saved intermediates``: an ``autograd.Function`` whose forward is a ``cond`` that also returns what the
  backward needs (empty placeholders from the dropped side) and whose backward is a second ``cond`` over aten's
  backward ops, written out for this block.

Checks: gradients and running statistics of both ``cond`` variants against eager for one draw (float64), and
the step time with every block kept and with none. Timing: all variants on the same weights and, per round,
the same draw (survival p_l linear from 1 to ``--p-last`` over the stage), round-robin, CPU time.

    python -m benchmarks.attempts.cond_gates --channels-last --reps 16
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    add_device_args,
    alternate,
    apply_device_args,
    machine_info,
    machine_line,
    markdown_table,
    median,
    reproduce_command,
    write_results,
)
from benchmarks.train_step import paired_ratio

aten = torch.ops.aten
EPS = 1e-5
CONV = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1)


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Training BatchNorm on batch statistics, buffers untouched: (y, mean, invstd)."""
    return aten._native_batch_norm_legit.no_stats(x, weight, bias, True, 0.0, EPS)


def _kept_forward(x, w1, g1, b1, w2, g2, b2, scale):
    a1 = F.conv2d(x, w1, padding=1)
    y1, m1, s1 = _norm(a1, g1, b1)
    r1 = torch.relu(y1)
    a2 = F.conv2d(r1, w2, padding=1)
    y2, m2, s2 = _norm(a2, g2 * scale, b2 * scale)
    return torch.relu(y2 + x), a1, m1, s1, r1, a2, m2, s2


def _dropped_forward(x, w1, g1, b1, w2, g2, b2, scale):
    def act():
        return torch.empty_like(x)

    def stat():
        return x.new_zeros(w1.shape[0])
    return x.clone(), act(), stat(), stat(), act(), act(), stat(), stat()


def _kept_plain(x, w1, g1, b1, w2, g2, b2, scale):
    """What plain ``cond`` needs: the sum before the block's ReLU (applied after the ``cond``: its gradient
    then keeps one layout on both sides) and the statistics. Its autograd runs this again in the backward."""
    y1, m1, s1 = _norm(F.conv2d(x, w1, padding=1), g1, b1)
    y2, m2, s2 = _norm(F.conv2d(torch.relu(y1), w2, padding=1), g2 * scale, b2 * scale)
    return y2 + x, m1, s1, m2, s2


def _dropped_plain(x, w1, *unused):
    return (x.clone(), *(x.new_zeros(w1.shape[0]) for _ in range(4)))


def _kept_backward(g, out, x, w1, g1, b1, w2, g2, b2, scale, a1, m1, s1, r1, a2, m2, s2):
    g = aten.threshold_backward(g, out, 0)
    ga2, gg2, gb2 = aten.native_batch_norm_backward(g, a2, g2 * scale, None, None, m2, s2, True, EPS,
                                                    [True, True, True])
    gr1, gw2, _ = aten.convolution_backward(ga2, r1, w2, None, **CONV, output_mask=[True, True, False])
    gy1 = aten.threshold_backward(gr1, r1, 0)
    ga1, gg1, gb1 = aten.native_batch_norm_backward(gy1, a1, g1, None, None, m1, s1, True, EPS, [True, True, True])
    gx, gw1, _ = aten.convolution_backward(ga1, x, w1, None, **CONV, output_mask=[True, True, False])
    return gx + g, gw1, gg1, gb1, gw2, gg2 * scale, gb2 * scale


def _dropped_backward(g, out, x, w1, g1, b1, w2, g2, b2, scale, a1, m1, s1, r1, a2, m2, s2):
    zeros = [torch.zeros_like(t) for t in (w1, g1, b1, w2, g2, b2)]
    return (torch.empty_like(x).copy_(g), *zeros)  # empty_like: the strides of the kept side's gradient


class SavedCondBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keep, x, w1, g1, b1, w2, g2, b2, scale):
        out, *saved = torch.cond(keep, _kept_forward, _dropped_forward, (x, w1, g1, b1, w2, g2, b2, scale))
        ctx.save_for_backward(keep, out, x, w1, g1, b1, w2, g2, b2, scale, *saved)
        return out, saved[1], saved[2], saved[5], saved[6]

    @staticmethod
    def backward(ctx, grad, *unused):
        keep, *rest = ctx.saved_tensors
        return (None, *torch.cond(keep, _kept_backward, _dropped_backward, (grad, *rest)), None)


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def params(self) -> Tuple[torch.Tensor, ...]:
        return (self.conv1.weight, self.bn1.weight, self.bn1.bias, self.conv2.weight, self.bn2.weight, self.bn2.bias)

    def kept_sum(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        z = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        z = F.batch_norm(z, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight * scale,
                         self.bn2.bias * scale, True, self.bn2.momentum, EPS)
        self.bn2.num_batches_tracked.add_(1)
        return z.add_(x)

    def update_stats(self, keep: torch.Tensor, n: int, stats: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for bn, mean, invstd in ((self.bn1, stats[0], stats[1]), (self.bn2, stats[2], stats[3])):
                var = (invstd.pow(-2) - EPS) * (n / (n - 1))
                bn.running_mean.copy_(torch.where(keep, torch.lerp(bn.running_mean, mean, bn.momentum),
                                                  bn.running_mean))
                bn.running_var.copy_(torch.where(keep, torch.lerp(bn.running_var, var, bn.momentum), bn.running_var))
                bn.num_batches_tracked.add_(keep.long())


class Stage(nn.Module):
    """Stem, ``blocks`` basic blocks and a linear head; ``forward(x, keep, way)``."""

    def __init__(self, blocks: int, channels: int = 16, p_last: float = 0.5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.ModuleList(Block(channels) for _ in range(blocks))
        self.fc = nn.Linear(channels, 10)
        self.register_buffer('survival', torch.linspace(1.0, p_last, blocks + 1)[1:])
        self.way = 'constant'

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        n = x.shape[0] * x.shape[2] * x.shape[3]
        for i, block in enumerate(self.blocks):
            scale = self.survival[i].reciprocal()
            if self.way == 'constant':
                x = torch.relu(block.kept_sum(x, torch.ones_like(scale)))
            elif self.way == 'cond':
                x, *stats = torch.cond(keep[i], _kept_plain, _dropped_plain, (x, *block.params(), scale))
                x = torch.relu(x)  # a dropped block's input is a ReLU output already
                block.update_stats(keep[i], n, stats)
            elif self.way == 'saved':
                x, *stats = SavedCondBlock.apply(keep[i], x, *block.params(), scale)
                block.update_stats(keep[i], n, stats)
        return self.fc(x.mean((2, 3)))


@torch.compiler.disable(recursive=False)
def regions_blocks(stage: Stage, x: torch.Tensor, keep: List[bool]) -> torch.Tensor:
    x = torch.relu_(x)
    scales = stage.survival.reciprocal().unbind(0)
    for i, block in enumerate(stage.blocks):
        if keep[i]:
            x = torch.relu_(block.kept_sum(x, scales[i]))
    return x


class RegionsStage(Stage):
    """The package's regions for this stage: stem and head compiled, each kept block a compiled region."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = regions_blocks(self, self.bn(self.stem(x)), keep.tolist())
        return self.fc(x.mean((2, 3)))


def eager_reference(stage: Stage, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> Stage:
    """The same draw run plainly in eager (dropped blocks skipped), after one backward."""
    ref = copy.deepcopy(stage)
    h = torch.relu(ref.bn(ref.stem(x)))
    for i, block in enumerate(ref.blocks):
        if keep[i]:
            h = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h))))) / ref.survival[i] + h)
    F.cross_entropy(ref.fc(h.mean((2, 3))), y).backward()
    return ref


def check_against_eager(way: str, blocks: int, channels_last: bool) -> Dict[str, float]:
    """Largest relative gradient and running-statistic difference to eager for one draw, in float64."""
    torch.manual_seed(0)
    stage = Stage(blocks).double()
    x, y = torch.randn(16, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (16,))
    if channels_last:
        stage, x = stage.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    keep = torch.rand(blocks) < stage.survival
    keep[0], keep[-1] = True, False
    ref = eager_reference(stage, x, y, keep)
    stage.way = way
    F.cross_entropy(torch.compile(stage)(x, keep), y).backward()
    grads = [((p.grad if p.grad is not None else torch.zeros_like(p)) - r.grad).abs().max() / r.grad.abs().max()
             for p, r in zip(stage.parameters(), ref.parameters()) if r.grad is not None]
    buffers = [(b.double() - r.double()).abs().max() for b, r in zip(stage.buffers(), ref.buffers())]
    return {'max_rel_grad_diff': float(max(grads)), 'max_buffer_diff': float(max(buffers))}


class Step:
    def __init__(self, stage: Stage, x: torch.Tensor, y: torch.Tensor, draws: List[torch.Tensor]):
        self.model, self.stage, self.x, self.y, self.draws, self.calls = torch.compile(stage), stage, x, y, draws, 0
        self.optimizer = torch.optim.SGD(stage.parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> None:
        keep = self.draws[self.calls % len(self.draws)]
        self.calls += 1
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x, keep), self.y).backward()
        self.optimizer.step()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--blocks', type=int, default=9)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--p-last', type=float, default=0.5, help='survival of the last block (linear from 1)')
    parser.add_argument('--bootstrap', type=int, default=2000)
    args = parser.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 16)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    if device.type != 'cpu':
        raise SystemExit('this attempt was measured on the CPU only (inductor lowers cond per device)')
    checks = {way: check_against_eager(way, args.blocks, args.channels_last) for way in ('cond', 'saved')}
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    template = Stage(args.blocks, p_last=args.p_last)
    gen = torch.Generator().manual_seed(1)
    draws = [torch.rand(args.blocks, generator=gen) < template.survival for _ in range(64)]
    all_kept, none_kept = [torch.ones(args.blocks, dtype=torch.bool)], [torch.zeros(args.blocks, dtype=torch.bool)]
    ways = {'constant depth': ('constant', Stage), 'regions': (None, RegionsStage), 'cond': ('cond', Stage),
            'cond, saved intermediates': ('saved', Stage)}

    def make(way: Optional[str], cls: type, keeps: List[torch.Tensor]) -> Step:
        stage = cls(args.blocks, p_last=args.p_last)
        stage.load_state_dict(template.state_dict())
        if way:
            stage.way = way
        if args.channels_last:
            stage = stage.to(memory_format=torch.channels_last)
        return Step(stage, x, y, keeps)

    drawn = {name: make(way, cls, all_kept if name == 'constant depth' else draws)
             for name, (way, cls) in ways.items()}
    times = alternate(drawn, args.reps, warmup=3)[args.clock]
    extremes = {f'{name}, {label}': make(way, cls, keeps)
                for name, (way, cls) in ways.items() if name != 'constant depth'
                for label, keeps in (('all kept', all_kept), ('none kept', none_kept))}
    extremes['constant depth'] = drawn['constant depth']
    extreme_times = alternate(extremes, max(3, args.reps // 2), warmup=2)[args.clock]
    base, ext_base = median(times['constant depth']), median(extreme_times['constant depth'])
    rows = []
    for name in ways:
        pr = paired_ratio(times, name, 'regions', args.bootstrap) if name not in ('constant depth', 'regions') else None
        kept = extreme_times.get(f'{name}, all kept')
        none = extreme_times.get(f'{name}, none kept')
        check = checks.get({'cond': 'cond', 'cond, saved intermediates': 'saved'}.get(name, ''), {})
        rows.append([name, f'{median(times[name]) / base:.3f}x',
                     f"{pr['ratio']:.3f}x [{pr['interval_95'][0]:.3f}, {pr['interval_95'][1]:.3f}]" if pr else '-',
                     f'{median(kept) / ext_base:.3f}x' if kept else '-',
                     f'{median(none) / ext_base:.3f}x' if none else '-',
                     f"{check['max_rel_grad_diff']:.1e} / {check['max_buffer_diff']:.1e}" if check else '-'])
    payload = {'machine': machine_info(device), 'command': reproduce_command('attempts.cond_gates', argv),
               'blocks': args.blocks, 'batch': args.batch, 'p_last': args.p_last, 'reps': args.reps,
               'clock': args.clock, 'channels_last': args.channels_last, 'checks_float64': checks,
               'times_s': times, 'extreme_times_s': extreme_times}
    markdown = '\n'.join([
        f"Measured on {machine_line(payload['machine'])}.", '',
        f"Reproduce: `{payload['command']}`", '',
        f'**Attempt 8: gates as torch.cond**, a stage of {args.blocks} basic blocks (16 channels, 32x32), batch '
        f'{args.batch}, survival linear from 1 to {args.p_last}, {args.reps} rounds, {args.clock} time', '',
        markdown_table(['variant', 'drawn gates vs constant depth', 'vs regions (paired, same draws)',
                        'all kept vs constant depth', 'none kept vs constant depth',
                        'float64 vs eager: grad / running stats'], rows), ''])
    write_results(args.out, f'attempt_cond_gates_{args.tag or device.type}', payload, markdown)
    return payload


if __name__ == '__main__':
    main()
