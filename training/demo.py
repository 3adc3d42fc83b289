"""The README's main job, offline, in a few minutes of CPU: stochastic vs constant depth on Fashion-MNIST.

    python training/demo.py                       # what `make demo` runs
    python training/demo.py --limit 0 --epochs 8 --batch-size 128 --lr 0.1  # the full split, as results/ holds

1. trains ``sd_resnet20_cifar`` on a Fashion-MNIST subset twice with the project's training engine: stochastic
   depth (linear rule, p_L = 0.5, block mode) and constant depth (``--drop-path-rate 0``), same seed and split;
2. exports the stochastic-depth run's best weights as a Hub-ready folder (safetensors, config.json, card);
3. publishes that folder into a local Hugging Face cache and loads it back offline with
   ``timm.create_model('hf-hub:...', pretrained=True)``, checks the weights are bit-identical and re-evaluates
   the test error;
4. prints the test errors at the best-validation epoch and the measured training-time ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from training import cifar  # noqa: E402

MODEL = 'sd_resnet20_cifar'
REPO_ID = f'local-demo/{MODEL}.fashion_mnist_demo'


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', type=Path, default=Path('runs/demo'))
    parser.add_argument('--limit', type=int, default=12000, help='images per split (0 = the full split)')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=64, help='smaller than the preset: more steps per image')
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST IDX folder (default: the Debian one)')
    parser.add_argument('--resume', action='store_true', help='continue the runs in --output-dir (default: start over)')
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.limit < 0:
        parser.error(f'--epochs={args.epochs} must be >= 1 and --limit={args.limit} >= 0')
    return args


def train_argv(args: argparse.Namespace, drop_path_rate: float, run_dir: Path) -> List[str]:
    milestones = ','.join(str(m) for m in sorted({max(1, args.epochs * 2 // 3), args.epochs}))
    argv = ['--preset', 'fashion_mnist', '--model', MODEL, '--drop-path-rate', str(drop_path_rate),
            '--epochs', str(args.epochs), '--milestones', milestones, '--limit', str(args.limit),
            '--batch-size', str(args.batch_size), '--lr', str(args.lr),
            '--output-dir', str(run_dir), '--log-with', 'none', '--no-progress', '--resume', 'latest']
    return argv + (['--data-dir', args.data_dir] if args.data_dir else [])


@contextlib.contextmanager
def offline_hub_cache(cache_dir: Path) -> Iterator[None]:
    """Point huggingface_hub at ``cache_dir`` with no network, for the duration of the block."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), True
    try:
        yield
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


@torch.no_grad()
def test_error(model: torch.nn.Module, run_args: List[str]) -> float:
    """Error of ``model`` on the run's own test split (built from the same flags)."""
    from training.data import build_datasets
    from training.recipes import build_parser, config_from_args
    cfg = config_from_args(build_parser('', 'fashion_mnist', ['fashion_mnist']).parse_args(run_args))
    loader = DataLoader(build_datasets(cfg).test, batch_size=cfg.eval_batch_size)
    model.eval()
    wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in loader)
    return wrong / len(loader.dataset)


def reload_through_timm(run_dir: Path, export_dir: Path, cache_dir: Path) -> torch.nn.Module:
    """Export the run, publish it to a local Hub cache, load it back offline; check bit-identical weights."""
    import timm

    from sd_zoo.publishing import LocalHubCache, export_run, publish

    export_run(run_dir, export_dir, tag='fashion_mnist_demo', suggest_entry=False)
    commit = publish(export_dir, REPO_ID, api=LocalHubCache(cache_dir))
    with offline_hub_cache(cache_dir):
        model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    exported = load_file(str(export_dir / 'model.safetensors'))
    loaded = model.state_dict()
    if exported.keys() != loaded.keys() or any(not torch.equal(exported[k], loaded[k]) for k in exported):
        raise RuntimeError('the weights loaded through timm differ from the exported ones')
    print(f'exported to {export_dir}, published to {cache_dir} as {REPO_ID}@{commit[:12]}, '
          f'reloaded with timm.create_model("hf-hub:{REPO_ID}", pretrained=True): weights bit-identical')
    return model


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.output_dir.exists() and not args.resume:
        shutil.rmtree(args.output_dir)
    runs: Dict[str, Dict[str, Any]] = {}
    for kind, rate in (('stochastic', 0.5), ('constant', 0.0)):
        print(f'--- training {MODEL} with {kind} depth (drop_path_rate={rate}) ---', flush=True)
        runs[kind] = cifar.main(train_argv(args, rate, args.output_dir / kind))
        if runs[kind]['status'] != 'completed':
            raise SystemExit(f"the {kind}-depth run stopped early ({runs[kind]['status']}); add --resume to the "
                             f"same command to continue from its checkpoint")
    stochastic_dir = args.output_dir / 'stochastic'
    model = reload_through_timm(stochastic_dir, args.output_dir / 'export', args.output_dir / 'hub_cache')
    reloaded_error = test_error(model, train_argv(args, 0.5, stochastic_dir))

    ratio = runs['stochastic']['train_time_s'] / runs['constant']['train_time_s']
    print('\n=== Fashion-MNIST, sd_resnet20_cifar, '
          f"{runs['stochastic']['data']['train_size']} training images, {args.epochs} epochs ===")
    for kind, res in runs.items():
        print(f"{kind:>10} depth: test error {100 * res['test_error_at_best_val']:.2f}% at the best-validation "
              f"epoch {res['best_epoch']}, {res['mean_active_depth']:.2f} of {res['run']['num_blocks']} blocks per step, "
              f"training time {res['train_time_s']:.1f}s")
    run = runs['stochastic']['run']
    print(f'training-time ratio, stochastic / constant depth: {ratio:.3f} (same machine, one after the other; '
          f"the expected depth {run['expected_depth']:.2f} of {run['num_blocks']} blocks bounds the block compute "
          f"at {run['expected_depth'] / run['num_blocks']:.3f})")
    print(f'reloaded stochastic-depth model: test error {100 * reloaded_error:.2f}%')
    return {'runs': runs, 'time_ratio': ratio, 'reloaded_test_error': reloaded_error}


if __name__ == '__main__':
    main()
