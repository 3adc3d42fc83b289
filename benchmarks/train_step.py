"""Training-step and eval-forward benchmark: sd_zoo's block mode against constant depth and the peers.

Variants, all on the same weights, timed round-robin in one process:

* ``constant depth``: the sd_ model with ``drop_path_rate=0`` (the baseline of every ratio), and a second copy
  of it whose ratio shows the noise of the measurement;
* ``sd_zoo block`` (linear rule, p_L = 0.5, dropped branches skipped) and ``sd_zoo sample`` (per-sample mask);
* peers, same architecture and per-block rates 1 - p_l: a copy of the constant-depth model whose blocks
  compute ``act(shortcut + peer(branch(x)))`` with timm's ``DropPath`` or torchvision's ``StochasticDepth``
  ('batch', 'row'); for the ImageNet model also timm's own ``resnet152`` with ``DropPath`` at our rates;
* accounting (CIFAR model): block mode with no block alive, and with one stage alive, to split the step
  into its non-block part and the cost of a block per stage.

Run from the repository root::

    python -m benchmarks.train_step                    # full CPU run (slow on 2 cores)
    python -m benchmarks.train_step --quick            # a fast check
    python -m benchmarks.train_step --device cuda --bf16 --channels-last   # the GPU run
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from benchmarks.common import (
    PEERS,
    TrainStep,
    add_device_args,
    add_peer_drop,
    alternate,
    apply_device_args,
    autocast,
    create_sd,
    machine_info,
    machine_line,
    markdown_table,
    median,
    prepare,
    ratio_table,
    reproduce_command,
    saved_activation_bytes,
    synchronize,
    timm_resnet_with_drop_path,
    write_results,
)

BASELINE = 'constant depth'
CONTROL = 'constant depth, 2nd copy (noise control)'
BLOCK = 'sd_zoo block'
NO_BLOCKS = '(accounting) no block alive'
FIXED_DRAW = '(accounting) one fixed draw, expected blocks per stage'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--cifar-model', default='sd_resnet110_cifar')
    parser.add_argument('--cifar-batch', type=int, default=128)
    parser.add_argument('--imagenet-model', default='sd_resnet152', help="'' skips the ImageNet part")
    parser.add_argument('--imagenet-batch', type=int, default=4)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--imagenet-reps', type=int, default=None)
    parser.add_argument('--drop-path-rate', type=float, default=0.5, help='1 - p_L (default 0.5)')
    parser.add_argument('--no-accounting', action='store_true', help='skip the stage-by-stage accounting')
    parser.add_argument('--target', type=float, default=0.78,
                        help='target for block mode vs constant depth of the CIFAR model (default 0.78)')
    parser.add_argument('--bootstrap', type=int, default=2000,
                        help='bootstrap resamples of the repetitions for the 95%% intervals (default 2000)')
    args = parser.parse_args(argv)
    if args.quick:
        args.cifar_model = 'sd_resnet56_cifar' if args.cifar_model == 'sd_resnet110_cifar' else args.cifar_model
        args.cifar_batch = min(args.cifar_batch, 32)
        args.imagenet_model = 'sd_resnet50' if args.imagenet_model == 'sd_resnet152' else args.imagenet_model
        args.imagenet_batch, args.img_size = min(args.imagenet_batch, 2), min(args.img_size, 128)
    args.reps = args.reps or (3 if args.quick else 15)
    args.imagenet_reps = args.imagenet_reps or (2 if args.quick else 5)
    return args


def stage_sizes(model: nn.Module) -> List[int]:
    return [len(getattr(model, name)) for name in model.stage_names]


def stage_bounds(sizes: Sequence[int]) -> List[int]:
    return [sum(sizes[:i]) for i in range(len(sizes) + 1)]


def per_stage(sizes: Sequence[int], values: Sequence[float]) -> List[float]:
    """Sums of per-block ``values`` (survival probabilities, kept flags) by stage."""
    bounds = stage_bounds(sizes)
    return [sum(values[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]


def expected_per_stage(sizes: Sequence[int], survival: Sequence[float]) -> List[int]:
    """The expected number of blocks each stage keeps, rounded."""
    return [round(e) for e in per_stage(sizes, survival)]


def fixed_draw(sizes: Sequence[int], survival: Sequence[float], seed: int = 0, tries: int = 100_000) -> List[bool]:
    """One draw of the rule that keeps the expected number of blocks in every stage (rounded)."""
    want = expected_per_stage(sizes, survival)
    rng = random.Random(seed)
    for _ in range(tries):
        kept = [rng.random() < p for p in survival]
        if per_stage(sizes, kept) == want:
            return kept
    raise RuntimeError(f'no draw kept {want} blocks per stage in {tries} tries')


def accounting_schedules(sizes: Sequence[int], survival: Optional[Sequence[float]] = None) -> Dict[str, List[float]]:
    """Survival schedules that keep no block, exactly one stage, or (given ``survival``) one fixed draw at the
    expected depth alive (1e-9 ~ never kept)."""
    off = 1e-9
    schedules = {NO_BLOCKS: [off] * sum(sizes)}
    bounds = stage_bounds(sizes)
    for idx, size in enumerate(sizes):
        probs = [off] * sum(sizes)
        probs[bounds[idx]:bounds[idx + 1]] = [1.0] * size
        schedules[f'(accounting) stage {idx + 1} alone'] = probs
    if survival is not None:
        schedules[FIXED_DRAW] = [1.0 if kept else off for kept in fixed_draw(sizes, survival)]
    return schedules


def build_train_variants(name: str, args: argparse.Namespace, accounting: bool,
                         timm_name: Optional[str]) -> Dict[str, nn.Module]:
    """All training variants of ``name`` on one set of weights."""
    extra = dict(num_classes=10) if name.endswith(('_cifar', '_svhn')) else {}
    base = create_sd(name, 'off', **extra)
    weights = base.state_dict()
    block = create_sd(name, 'block', weights, drop_path_rate=args.drop_path_rate, **extra)
    survival = block.stochastic_depth.survival
    variants = {BASELINE: base, CONTROL: create_sd(name, 'off', weights, **extra), BLOCK: block,
                'sd_zoo sample': create_sd(name, 'sample', weights, drop_path_rate=args.drop_path_rate, **extra)}
    for peer in PEERS:
        variants[peer] = add_peer_drop(create_sd(name, 'off', weights, **extra), peer, survival)
    if timm_name:
        variants[f'timm {timm_name} (constant)'] = timm_resnet_with_drop_path(timm_name, weights, None)
        variants[f'timm {timm_name} + DropPath'] = timm_resnet_with_drop_path(timm_name, weights, survival)
    if accounting:
        for label, probs in accounting_schedules(stage_sizes(base), survival).items():
            variants[label] = create_sd(name, 'block', weights, drop_path_schedule=probs, **extra)
    return variants


def gate_overhead_us(model: nn.Module, x: torch.Tensor, repeats: int = 200) -> float:
    """Microseconds per training forward spent asking the controller for all gates (one draw included)."""
    sd = model.stochastic_depth
    start = time.perf_counter()
    for _ in range(repeats):
        for index in range(sd.num_blocks):
            sd.gate(index, x, True)
    return (time.perf_counter() - start) / repeats * 1e6


def run_train(name: str, batch: int, size: int, reps: int, args: argparse.Namespace, device: torch.device,
              accounting: bool = False, timm_name: Optional[str] = None) -> Dict[str, Any]:
    """Time one training step of every variant; returns medians, ratios, phases, memory and realized depth."""
    variants = build_train_variants(name, args, accounting, timm_name)
    num_classes = variants[BASELINE].num_classes
    x = torch.randn(batch, 3, size, size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    steps = {label: TrainStep(prepare(m, device, args.channels_last), x, y, device, args.bf16)
             for label, m in variants.items()}
    memory = measure_memory(steps, device)
    sd = variants[BLOCK].stochastic_depth
    realized: List[List[bool]] = []

    def record(label: str, rep: int) -> None:
        if label == BLOCK:
            realized.append(list(sd.last_active))

    times = alternate(steps, reps, warmup=0, device=device, after_each=record)
    result = {
        'model': name, 'batch': batch, 'input_size': size, 'reps': reps,
        'expected_depth': sd.expected_depth, 'num_blocks': sd.num_blocks,
        'limit_block_fraction': sd.expected_depth / sd.num_blocks,
        'clock': args.clock, 'variants': ratio_table(times, BASELINE), 'times_s': times,
        'phases_median_s': {label: {k: median([p[k] for p in s.phases[-reps:]]) for k in s.phases[-1]}
                            for label, s in steps.items()},
        'saved_activation_bytes': memory,
        'block_mode_active_blocks': [sum(a) for a in realized],
        'gate_overhead_us_per_step': gate_overhead_us(variants[BLOCK], x),
    }
    if device.type == 'cuda':
        result['images_per_s'] = {label: batch / median(t) for label, t in times['wall'].items()}
    if accounting:
        acc = account(times[args.clock], realized, variants[BASELINE], sd.survival)
        acc['interval_95'] = bootstrap_interval(times[args.clock], realized, variants[BASELINE], sd.survival,
                                                args.bootstrap)
        acc['target'] = args.target
        acc['target_verdict'] = verdict(acc['interval_95']['block_ratio_at_expected_depth'], args.target)
        result['accounting'] = acc
    return result


def measure_memory(steps: Dict[str, TrainStep], device: torch.device) -> Dict[str, Dict[str, Any]]:
    """One (warm-up) step per variant: saved activation bytes, and the CUDA peak where there is one."""
    memory = {}
    for label, step in steps.items():
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        with saved_activation_bytes(step.model) as saved:
            step()
        synchronize(device)
        entry: Dict[str, Any] = {'saved_bytes': saved['bytes']}
        if device.type == 'cuda':
            entry['cuda_peak_bytes'] = torch.cuda.max_memory_allocated(device)
        sd = getattr(step.model, 'stochastic_depth', None)
        if label == BLOCK and sd is not None:
            entry['active_blocks'] = sum(sd.last_active)
        memory[label] = entry
    return memory


def account(times: Dict[str, List[float]], realized: List[List[bool]], model: nn.Module,
            survival: Sequence[float]) -> Dict[str, Any]:
    """Split the step into non-block time and per-stage block cost; correct block mode to the expected depth."""
    sizes = stage_sizes(model)
    t_const, t_none = median(times[BASELINE]), median(times[NO_BLOCKS])
    per_block = [(median(times[f'(accounting) stage {i + 1} alone']) - t_none) / n for i, n in enumerate(sizes)]
    expected = per_stage(sizes, survival)
    t_limit = t_none + sum(c * e for c, e in zip(per_block, expected))
    corrected = []
    for t, active in zip(times[BLOCK], realized):
        got = per_stage(sizes, active)
        corrected.append(t - sum(c * (g - e) for c, g, e in zip(per_block, got, expected)))
    sum_stages = t_none + sum(c * n for c, n in zip(per_block, sizes))
    result = {
        'non_block_fraction': t_none / t_const,
        'per_block_s_by_stage': per_block,
        'additivity_check': sum_stages / t_const,
        'limit_equal_blocks': (t_none + (t_const - t_none) * sum(survival) / len(survival)) / t_const,
        'limit_measured_block_costs': t_limit / t_const,
        'block_ratio_at_expected_depth': median(corrected) / t_const,
        'block_ratio_measured': median(times[BLOCK]) / t_const,
        'gap_to_limit': (median(corrected) - t_limit) / t_const,
        'realized_mean_active': sum(map(sum, realized)) / max(1, len(realized)),
    }
    if FIXED_DRAW in times:
        kept = expected_per_stage(sizes, survival)
        parts = t_none + sum(c * k for c, k in zip(per_block, kept))
        result.update({
            'fixed_draw_blocks_per_stage': kept,
            'fixed_draw_ratio': median(times[FIXED_DRAW]) / t_const,
            'fixed_draw_sum_of_parts': parts / t_const,
            'fixed_draw_gap': (median(times[FIXED_DRAW]) - parts) / t_const,
        })
    return result


INTERVAL_KEYS = ('block_ratio_measured', 'block_ratio_at_expected_depth', 'limit_measured_block_costs',
                 'gap_to_limit', 'fixed_draw_ratio', 'fixed_draw_gap')


def bootstrap_interval(times: Dict[str, List[float]], realized: List[List[bool]], model: nn.Module,
                       survival: Sequence[float], resamples: int, seed: int = 0) -> Dict[str, List[float]]:
    """95% percentile-bootstrap intervals of the accounting's ratios.

    The unit resampled is a repetition (one round of every variant, timed side by side, and the draw block
    mode made in it), so the pairing of the variants within a round and the draw noise both carry over.
    """
    rng = random.Random(seed)
    reps = len(realized)
    samples: Dict[str, List[float]] = {}
    for _ in range(resamples):
        idx = [rng.randrange(reps) for _ in range(reps)]
        acc = account({k: [v[i] for i in idx] for k, v in times.items()}, [realized[i] for i in idx],
                      model, survival)
        for key in INTERVAL_KEYS:
            if key in acc:
                samples.setdefault(key, []).append(acc[key])
    return {key: [percentile(v, 2.5), percentile(v, 97.5)] for key, v in samples.items()}


def ratio_interval(times: Dict[str, List[float]], num: str, den: str, resamples: int,
                   seed: int = 0) -> List[float]:
    """95% percentile-bootstrap interval of median(num) / median(den); one round of all variants is the unit."""
    rng, reps = random.Random(seed), len(times[num])
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(reps) for _ in range(reps)]
        ratios.append(median([times[num][i] for i in idx]) / median([times[den][i] for i in idx]))
    return [percentile(ratios, 2.5), percentile(ratios, 97.5)]


def paired_ratio(times: Dict[str, List[float]], num: str, den: str, resamples: int,
                 seed: int = 0) -> Dict[str, Any]:
    """Median of the per-round ratios num / den (variants that ran the same draw in a round) and its 95%
    percentile-bootstrap interval."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    rng = random.Random(seed)
    boot = [median([rng.choice(ratios) for _ in ratios]) for _ in range(resamples)]
    return {'ratio': median(ratios), 'interval_95': [percentile(boot, 2.5), percentile(boot, 97.5)]}


def ratio_check(times: Dict[str, List[float]], num: str, den: str, resamples: int = 2000) -> Dict[str, Any]:
    """Ratio of medians num / den with its 95% bootstrap interval."""
    return {'ratio': median(times[num]) / median(times[den]), 'interval_95': ratio_interval(times, num, den, resamples)}


def target_check(times: Dict[str, List[float]], num: str, den: str, target: float,
                 resamples: int = 2000) -> Dict[str, Any]:
    """:func:`ratio_check`, and the verdict against ``target`` (at most)."""
    check = ratio_check(times, num, den, resamples)
    return {**check, 'target': target, 'verdict': verdict(check['interval_95'], target)}


def format_ratio(check: Dict[str, Any]) -> str:
    """``0.857x [0.807, 0.920]``: a :func:`target_check`'s ratio and interval."""
    lo, hi = check['interval_95']
    return f"{check['ratio']:.3f}x [{lo:.3f}, {hi:.3f}]"


def targets_markdown(targets: Dict[str, Dict[str, Any]], title: str = 'target') -> str:
    return markdown_table([title, 'ratio of medians [95% interval]', 'target', 'verdict'],
                          [[name, format_ratio(t), f"<= {t['target']:.2f}", t['verdict']]
                           for name, t in targets.items()])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def verdict(interval: Sequence[float], target: float) -> str:
    """'met' / 'not met' only when the whole 95% interval lies on one side of the target."""
    lo, hi = interval
    if hi <= target:
        return 'met'
    if lo > target:
        return 'not met'
    return 'undecided (the 95% interval contains the target)'


def run_eval(name: str, timm_name: str, batch: int, size: int, reps: int, args: argparse.Namespace,
             device: torch.device) -> Dict[str, Any]:
    """Eval forward of the sd_ model (block mode, as trained) against timm's model on identical weights."""
    ours = create_sd(name, 'block', None, drop_path_rate=args.drop_path_rate)
    theirs = timm_resnet_with_drop_path(timm_name, ours.state_dict(), None)
    models = {name: prepare(ours, device, args.channels_last).eval(),
              f'timm {timm_name}': prepare(theirs, device, args.channels_last).eval()}
    x = torch.randn(batch, 3, size, size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), autocast(device, args.bf16):
                return model(x)
        return run

    outs = [forward(m)() for m in models.values()]
    max_diff = (outs[0].float() - outs[1].float()).abs().max().item()
    times = alternate({label: forward(m) for label, m in models.items()}, reps, warmup=0, device=device)
    table = ratio_table(times, f'timm {timm_name}')
    return {'model': name, 'peer': f'timm {timm_name}', 'batch': batch, 'input_size': size, 'reps': reps,
            'clock': args.clock,
            'max_abs_output_diff': max_diff, 'variants': table, 'times_s': times}


def fmt_bytes(n: int) -> str:
    return f'{n / 2 ** 20:.0f} MiB'


def _other(clock: str) -> str:
    return 'wall' if clock == 'cpu' else 'cpu'


def train_markdown(res: Dict[str, Any]) -> str:
    clock, other = res['clock'], _other(res['clock'])
    rows = []
    for label, v in res['variants'].items():
        mem = res['saved_activation_bytes'][label]
        note = f" ({mem['active_blocks']}/{res['num_blocks']} blocks)" if 'active_blocks' in mem else ''
        row = [label, f"**{v[f'{clock}_ratio']:.3f}x**", f"{v[f'{other}_ratio']:.3f}x",
               f"{v[f'{clock}_median_s']:.3f}", fmt_bytes(mem['saved_bytes']) + note]
        if 'images_per_s' in res:
            row.append(f"{res['images_per_s'][label]:.0f}")
        rows.append(row)
    head = ['variant', f'step vs constant depth ({clock} time)', f'({other} time)',
            f'median {clock} s (this machine)', 'saved activations (one step)']
    if 'images_per_s' in res:
        head.append('images/s')
    title = (f"**{res['model']}**, training step (forward, backward, SGD Nesterov), batch {res['batch']} at "
             f"{res['input_size']}px, median of {res['reps']}; limit sum(p_l)/L = "
             f"{res['limit_block_fraction']:.3f}\n\n")
    return title + markdown_table(head, rows)


def with_interval(a: Dict[str, Any], key: str, unit: str = 'x') -> str:
    text = f"{a[key]:.3f}{unit}"
    if key in a.get('interval_95', {}):
        lo, hi = a['interval_95'][key]
        text += f" ({lo:.3f}-{hi:.3f})" if lo >= 0 else f" ({lo:+.3f} to {hi:+.3f})"
    return text


def accounting_markdown(res: Dict[str, Any]) -> str:
    a, phases = res['accounting'], res['phases_median_s']
    rows = [
        ['block mode, measured (median)', with_interval(a, 'block_ratio_measured')],
        ['block mode, corrected to the expected depth', with_interval(a, 'block_ratio_at_expected_depth')],
        ['limit: non-block time + sum(p_l)/L of the block time', f"{a['limit_equal_blocks']:.3f}x"],
        ['limit: non-block time + measured per-stage block costs x expected blocks',
         with_interval(a, 'limit_measured_block_costs')],
        ['block mode at the expected depth minus that limit (what is left for overhead)',
         with_interval(a, 'gap_to_limit', '')],
    ]
    if 'fixed_draw_ratio' in a:
        kept = ', '.join(map(str, a['fixed_draw_blocks_per_stage']))
        rows += [
            [f'one fixed draw keeping {kept} blocks per stage: measured', with_interval(a, 'fixed_draw_ratio')],
            ['the same draw: sum of its parts (non-block time + per-stage block costs)',
             f"{a['fixed_draw_sum_of_parts']:.3f}x"],
            ['the same draw: measured minus the sum of its parts', with_interval(a, 'fixed_draw_gap', '')],
        ]
    rows += [
        [f"target: block mode at most {a['target']:.2f}x (at the expected depth)", a['target_verdict']],
        ['non-block share of a constant-depth step (stem, head, loss, optimizer on them, Python)',
         f"{a['non_block_fraction']:.3f}"],
        ['cost of one block by stage, relative to stage 1',
         ', '.join(f'{c / a["per_block_s_by_stage"][0]:.2f}' for c in a['per_block_s_by_stage'])],
        ['stages added up / constant depth (additivity check)', f"{a['additivity_check']:.3f}"],
        ['realized mean active blocks in the timed block-mode steps',
         f"{a['realized_mean_active']:.2f} (expected {res['expected_depth']:.2f})"],
        ['gate drawing + lookup per step', f"{res['gate_overhead_us_per_step']:.0f} us"],
        ['optimizer step, block mode / constant depth (dropped blocks have no grad, so no update)',
         f"{phases[BLOCK]['optimizer'] / phases[BASELINE]['optimizer']:.2f}"],
    ]
    return (f"**Accounting, {res['model']}** (in brackets: 95% bootstrap interval over the {res['reps']} "
            f"repetitions)\n\n" + markdown_table(['quantity', 'value'], rows))


def eval_markdown(res: Dict[str, Any]) -> str:
    clock, other = res['clock'], _other(res['clock'])
    rows = [[label, f"**{v[f'{clock}_ratio']:.3f}x**", f"{v[f'{other}_ratio']:.3f}x", f"{v[f'{clock}_median_s']:.3f}"]
            for label, v in res['variants'].items()]
    return (f"**Eval forward**, batch {res['batch']} at {res['input_size']}px, median of {res['reps']}, "
            f"max |output difference| {res['max_abs_output_diff']:.2e}\n\n"
            + markdown_table(['model', f"time vs {res['peer']} ({clock})", f'({other})',
                              f'median {clock} s (this machine)'], rows))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = apply_device_args(args)
    torch.manual_seed(0)
    info = machine_info(device)
    payload: Dict[str, Any] = {'machine': info, 'command': reproduce_command('train_step', argv), 'settings': {
        'bf16': args.bf16, 'channels_last': args.channels_last, 'drop_path_rate': args.drop_path_rate,
        'quick': args.quick, 'clock': args.clock, 'flush_denormal': args.flush_denormal}}
    payload['cifar'] = run_train(args.cifar_model, args.cifar_batch, 32, args.reps, args, device,
                                 accounting=not args.no_accounting)
    parts = [train_markdown(payload['cifar'])]
    if 'accounting' in payload['cifar']:
        parts.append(accounting_markdown(payload['cifar']))
    if args.imagenet_model:
        timm_name = args.imagenet_model.replace('sd_', '', 1)
        payload['imagenet'] = run_train(args.imagenet_model, args.imagenet_batch, args.img_size,
                                        args.imagenet_reps, args, device, timm_name=timm_name)
        payload['eval'] = run_eval(args.imagenet_model, timm_name, args.imagenet_batch, args.img_size,
                                   args.imagenet_reps + 2, args, device)
        parts += [train_markdown(payload['imagenet']), eval_markdown(payload['eval'])]
    markdown = (f"Measured on {machine_line(info)}.\n\nReproduce: `{payload['command']}`\n\n"
                + '\n'.join(parts))
    write_results(args.out, f"train_step_{args.tag or device.type}", payload, markdown)
    return payload


if __name__ == '__main__':
    main()
