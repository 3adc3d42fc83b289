"""Tables of the README, rendered from the registry and from committed results files (no number typed twice).

Repository tooling, not part of the installed package: run it from the root of a checkout.
``python -m tools.readme`` rewrites the generated blocks of README.md in place;
``python -m tools.readme --check`` fails when README.md is out of date (a test runs it).
Each block sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch

from benchmarks.common import median
from benchmarks.train_step import format_ratio, ratio_interval
from sd_zoo.cards import readme_table

ROOT = Path(__file__).resolve().parents[1]


def model_table() -> str:
    """One row per registered ``sd_`` architecture: depth, blocks, parameters, input size, expected depth."""
    rows = ['| model | layers | residual blocks | expected blocks (p_L = 0.5) | parameters | input size |',
            '|---|---:|---:|---:|---:|---|']
    for name in timm.list_models('sd_*'):
        with torch.device('meta'):
            model = timm.create_model(name)
        sd = model.stochastic_depth
        layers = name.split('resnet')[1].split('_')[0]
        params = sum(p.numel() for p in model.parameters())
        size = 'x'.join(str(v) for v in model.pretrained_cfg['input_size'][1:])
        rows.append(f'| `{name}` | {layers} | {sd.num_blocks} | {sd.expected_depth:.2f} '
                    f'| {params / 1e6:.2f}M | {size} |')
    return '\n'.join(rows)


def weights_table() -> str:
    return readme_table()


def _read_json(path: Path) -> Dict:
    return json.loads(path.read_text())


def fashion_mnist_table(results_dir: Path = ROOT / 'results' / 'fashion_mnist') -> str:
    """Stochastic vs constant depth on Fashion-MNIST, read from the runs' results.json."""
    runs = {kind: results_dir / f'sd_resnet20_{kind}' / 'results.json' for kind in ('stochastic', 'constant')}
    if not all(p.exists() for p in runs.values()):
        return '_No finished Fashion-MNIST runs are committed yet._'
    res = {kind: _read_json(p) for kind, p in runs.items()}
    base_time = res['constant']['train_time_s']
    rows = ['| run | test error at best-val epoch (%) | best epoch | mean active blocks | '
            'training time (s) | training-time ratio |', '|---|---:|---:|---:|---:|---:|']
    for kind, r in res.items():
        rows.append(f"| {kind} depth | {100 * r['test_error_at_best_val']:.2f} | {r['best_epoch']} "
                    f"| {r['mean_active_depth']:.2f} of {r['run']['num_blocks']} "
                    f"| {r['train_time_s']:.0f} | {r['train_time_s'] / base_time:.3f} |")
    return '\n'.join(rows)


def resnet110_summary(path: Path = ROOT / 'results' / 'fashion_mnist_resnet110' / 'SUMMARY.md') -> str:
    """The pre-registered ResNet-110 experiment: its table and verdict, rendered by the experiment's report.py."""
    return path.read_text().strip() if path.exists() else '_The ResNet-110 runs are not committed yet._'


def paper_table() -> str:
    """The command for every row of the paper's results, beside the paper's numbers (training/recipes.py)."""
    sys.path.insert(0, str(ROOT))
    from training.recipes import PAPER_RUNS
    rows = ['| paper result | constant depth (%) | stochastic depth (%) | command (stochastic depth) |',
            '|---|---:|---:|---|']
    rows += [f"| {r['row']} | {r['constant']} | {r['stochastic']} | `{r['command']}` |" for r in PAPER_RUNS]
    return '\n'.join(rows)


def benchmark_table(results: Path = ROOT / 'benchmarks' / 'results') -> str:
    """The CPU summary, and the GPU one after it once ``benchmarks/gpu_check.sh`` has written it."""
    cpu, gpu = results / 'summary_cpu.md', results / 'summary_gpu.md'
    text = cpu.read_text().strip() if cpu.exists() else '_No benchmark results are committed yet._'
    if gpu.exists():
        text += '\n\nOn a GPU (`bash benchmarks/gpu_check.sh`, bf16 and channels_last):\n\n' + gpu.read_text().strip()
    return text


def _recommended(times: Dict[str, Sequence[float]], default: str, others: Sequence[str]) -> str:
    """``default`` unless another variant is faster beyond the noise of the run: the 95% bootstrap interval of its
    median time over the default's lies wholly below 1 (the fastest such variant wins). A recommendation must not
    flip between two runs on a difference the run cannot resolve."""
    clearly = [o for o in others if ratio_interval(times, o, default, 2000)[1] < 1.0]
    return min(clearly, key=lambda o: median(times[o])) if clearly else default


DDP_RUNS = (  # (results file, what its workload is): each measured DDP workload gets its own row
    ('ddp_cpu.json', ''),
    ('ddp_cpu_b64.json', ": the paper's recipe, global batch 128, on two ranks"),
)


def _compile_rows(comp: Dict[str, Any], situation: str) -> List[str]:
    """The eager and the compiled recommendation of each config of a compile benchmark's results."""
    rows = []
    for res in comp['configs']:
        v, clock = res['variants'], comp['clock']
        where = f"{res['model']}, batch {res['batch']}"
        eager = v['sd_zoo block, eager'][f'{clock}_median_s'] / v['constant depth, eager'][f'{clock}_median_s']
        rows.append(f"| {situation}, eager ({where}) | block mode (the default) | {eager:.3f}x constant depth, eager |")
        advice = {'sd_zoo block, eager': 'do not compile: eager block mode is faster here',
                  'sd_zoo block, compiled': "`torch.compile(model)` (`--compile`; compiled regions, the default)",
                  'sd_zoo block, compiled, eager blocks': "`torch.compile(model)` with `compile_blocks='eager'`"}
        default = 'sd_zoo block, compiled'
        best = _recommended(res['times_s'][clock], default, [label for label in advice if label != default])
        t = res['targets']['block compiled vs constant depth compiled']
        vs = v[best][f'{clock}_median_s'] / v['constant depth, compiled'][f'{clock}_median_s']
        rows.append(f"| {situation}, compiled ({where}) | {advice[best]} | {vs:.3f}x constant depth, compiled (block "
                    f"compiled: {format_ratio(t)}, {t['verdict']}) |")
    return rows


def compile_recommendation(results: Path = ROOT / 'benchmarks' / 'results') -> str:
    """One recommendation per situation (mode, and whether to compile), chosen from the measured results files:
    the project's default way unless another measured variant is clearly faster (:func:`_recommended`); a situation
    without a results file says that it is not measured."""
    rows = ['| situation | recommendation | measured (ratio of medians, 95% interval) |', '|---|---|---|']
    if (results / 'compile_cpu.json').exists():
        rows += _compile_rows(_read_json(results / 'compile_cpu.json'), 'CPU')
    gpu = results / 'compile_gpu.json'  # written by benchmarks/gpu_check.sh
    if gpu.exists():
        comp = _read_json(gpu)
        precision = ', bf16' if comp.get('bf16') else ''
        rows += _compile_rows(comp, f"one GPU ({comp['machine'].get('gpu', 'GPU')}{precision})")
    for ddp_name, workload in DDP_RUNS:
        if not (results / ddp_name).exists():
            continue
        ddp = _read_json(results / ddp_name)
        v, clock = ddp['variants'], ddp['clock']
        advice = {'sd_zoo block': "block mode under plain DDP (`drop_path_grad='zero'`, the default), not compiled",
                  'sd_zoo block, compiled': '`torch.compile(DDP(model))` (`--compile`)',
                  'sd_zoo block, find_unused_parameters': "`drop_path_grad='none'` with `find_unused_parameters`"}
        default = 'sd_zoo block'
        best = _recommended(ddp['times_s'][clock], default, [label for label in advice if label != default and label in v])
        measured = '; '.join(f"{name}: {format_ratio(t)}, {t['verdict']}" for name, t in ddp.get('targets', {}).items())
        rows.append(f"| CPU, {ddp['world_size']} DDP processes ({ddp['model']}, {ddp['batch_per_rank']} images a rank"
                    f"{workload}) | {advice[best]} | {measured} |")
    # (benchmarks.ddp runs gloo CPU processes only, so nothing writes ddp_gpu.json yet)
    for situation, name in (('one GPU', 'compile_gpu.json'), ('several GPUs', 'ddp_gpu.json')):
        if not (results / name).exists():
            rows.append(f"| {situation} | not measured yet (no GPU here; the GPU check is owed): block mode; "
                        f"`--compile` compiles the kept blocks as regions (the default) | - |")
    return '\n'.join(rows)


BLOCKS: Dict[str, Callable[[], str]] = {
    'models': model_table,
    'weights': weights_table,
    'fashion_mnist': fashion_mnist_table,
    'resnet110': resnet110_summary,
    'paper': paper_table,
    'benchmarks': benchmark_table,
    'compile': compile_recommendation,
}


def render(text: str, blocks: Dict[str, Callable[[], str]] = BLOCKS) -> str:
    """Replace the body of every generated block present in ``text``."""
    for name, make in blocks.items():
        pattern = re.compile(rf'(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)', re.S)
        if pattern.search(text):
            body = make()
            text = pattern.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--readme', type=Path, default=ROOT / 'README.md')
    parser.add_argument('--check', action='store_true', help='fail if the README is out of date')
    parser.add_argument('--print', dest='show', choices=sorted(BLOCKS), help='print one table and exit')
    args = parser.parse_args(argv)
    if args.show:
        print(BLOCKS[args.show]())
        return 0
    current = args.readme.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            print(f'{args.readme} is out of date: run `python -m tools.readme`', file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == '__main__':
    sys.exit(main())
