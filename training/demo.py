"""The README's main job, offline, in a few minutes of CPU: the zoo's deep network and what stochastic depth buys.

    python training/demo.py                 # what `make demo` runs
    python training/demo.py --quick         # smaller steps everywhere (the test suite runs this)

1. **The published weights, over HTTP.** Starts a local Hugging Face Hub server (olah, serving this
   repository's export of ``sd_resnet110_cifar.fashion_mnist`` as a git repository), downloads the weights with
   ``timm.create_model('sd_resnet110_cifar.fashion_mnist', pretrained=True)`` and the card with
   ``huggingface_hub``, and re-measures the card's test error on the full Fashion-MNIST test set.
2. **The saving, measured fairly.** Times the training step of ``sd_resnet110_cifar`` with stochastic depth and
   at constant depth *interleaved* (round-robin, CPU time, as ``benchmarks/`` does), so a change of machine
   load lands on both: the ratio of medians with a 95% bootstrap interval.
3. **The whole loop on a small model.** Trains ``sd_resnet20_cifar`` briefly with the project's engine, exports
   it, publishes the export to the local Hub server and loads it back through timm over HTTP: weights
   bit-identical, same test error.

If the ResNet-110 export is missing (the experiment of ``results/fashion_mnist_resnet110`` has not been run),
step 1 says so and the demo exits with status 1 after the other steps.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import sd_zoo  # noqa: E402,F401  (registers the sd_ models)
from training import cifar  # noqa: E402
from training.hub_server import LocalHubServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_TAG = 'sd_resnet110_cifar.fashion_mnist'
ZOO_EXPORT = REPO_ROOT / 'results' / 'fashion_mnist_resnet110' / 'export'
SMALL_MODEL = 'sd_resnet20_cifar'
SMALL_REPO = f'local-demo/{SMALL_MODEL}.fashion_mnist_demo'


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', type=Path, default=Path('runs/demo'))
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST IDX folder (default: the Debian one)')
    parser.add_argument('--quick', action='store_true', help='fewer repetitions, a smaller batch and test subset')
    parser.add_argument('--reps', type=int, default=None, help='interleaved timing rounds (default 12, quick 3)')
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- data

def fashion_test_loader(data_dir: Optional[str], limit: int = 0, batch_size: int = 256) -> DataLoader:
    """The Fashion-MNIST test split as the training runs see it (same reader, normalisation and order)."""
    from training.data import build_datasets
    from training.recipes import PRESETS, TrainConfig
    cfg = TrainConfig(**{**PRESETS['fashion_mnist'], 'data_dir': data_dir, 'limit': limit})
    return DataLoader(build_datasets(cfg).test, batch_size=batch_size)


@torch.no_grad()
def test_error(model: torch.nn.Module, loader: DataLoader, channels_last: bool = False) -> float:
    model.eval()
    wrong = 0
    for x, y in loader:
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        wrong += int((model(x).argmax(1) != y).sum())
    return wrong / len(loader.dataset)


# --------------------------------------------------------------------------------------------- 1. the zoo

def card_test_error(card_path: Path) -> Optional[float]:
    """The test-split error (%) in a model card's model-index, parsed offline."""
    from huggingface_hub import ModelCard
    data = ModelCard(card_path.read_text()).data.to_dict()
    for entry in data.get('model-index', []):
        for result in entry.get('results', []):
            if result.get('dataset', {}).get('split') == 'test':
                for metric in result.get('metrics', []):
                    if metric.get('type') == 'error':
                        return float(metric['value'])
    return None


def zoo_weights(hub: LocalHubServer, cache: Path, data_dir: Optional[str], limit: int) -> Dict[str, Any]:
    if not (ZOO_EXPORT / 'model.safetensors').is_file():
        print(f'[1/3] MISSING: {ZOO_EXPORT} holds no model.safetensors, so {ZOO_TAG} cannot be served. Run the '
              f'experiment of results/fashion_mnist_resnet110/PROTOCOL.md and export it (README, "Results").')
        return dict(missing=str(ZOO_EXPORT))
    from huggingface_hub import hf_hub_download
    repo_id = timm.models.get_pretrained_cfg(ZOO_TAG).hf_hub_id.split('@')[0]
    commit = hub.add_repo(repo_id, ZOO_EXPORT)
    with hub.client(cache):
        model = timm.create_model(ZOO_TAG, pretrained=True)
        card = Path(hf_hub_download(repo_id, 'README.md'))
    measured = 100 * test_error(model.to(memory_format=torch.channels_last),
                                fashion_test_loader(data_dir, limit), channels_last=True)
    expected = card_test_error(card)
    print(f'[1/3] {ZOO_TAG}: downloaded over HTTP from {hub.endpoint} ({repo_id}@{commit[:12]}) with '
          f'timm.create_model(..., pretrained=True)')
    if limit:
        print(f'      test error {measured:.2f}% on the first {limit} test images (card: {expected}% on all 10,000)')
        return dict(measured=measured, card=expected, limit=limit)
    same = expected is not None and abs(measured - expected) < 0.005
    print(f'      test error {measured:.2f}% on the 10,000 test images; the card says {expected}%: '
          f'{"reproduced" if same else "NOT reproduced"}')
    return dict(measured=measured, card=expected, reproduced=same)


# --------------------------------------------------------------------------------------------- 2. the saving

def interleaved_ratio(reps: int, batch: int, seed: int = 0) -> Dict[str, Any]:
    """Training-step CPU time of stochastic over constant depth, timed round-robin; 95% bootstrap interval."""
    from benchmarks.common import TrainStep, alternate, median
    from benchmarks.train_step import ratio_interval
    torch.manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    steps = {}
    for name, rate in (('stochastic', 0.5), ('constant', 0.0)):
        model = timm.create_model('sd_resnet110_cifar', in_chans=1, num_classes=10, drop_path_rate=rate)
        model = model.to(memory_format=torch.channels_last).train()
        steps[name] = TrainStep(model, x, y, torch.device('cpu'), bf16=False)
    cpu = alternate(steps, reps=reps, warmup=1)['cpu']
    ratio = median(cpu['stochastic']) / median(cpu['constant'])
    interval = ratio_interval(cpu, 'stochastic', 'constant', 2000, seed)  # a round times both side by side
    print(f'[2/3] training step of sd_resnet110_cifar (batch {batch}, 28 x 28, {torch.get_num_threads()} threads), '
          f'{reps} interleaved rounds: stochastic / constant depth CPU time = {ratio:.3f} '
          f'(95% interval {interval[0]:.3f}-{interval[1]:.3f}); the paper\'s expected depth bounds the block '
          f'compute at {40.25 / 54:.3f}')
    return dict(ratio=ratio, interval=interval, reps=reps, batch=batch)


# --------------------------------------------------------------------------------------------- 3. the loop

def small_run_argv(args: argparse.Namespace, run_dir: Path) -> List[str]:
    limit = '512' if args.quick else '2048'
    argv = ['--preset', 'fashion_mnist', '--model', SMALL_MODEL, '--epochs', '1', '--milestones', '1',
            '--limit', limit, '--batch-size', '64', '--lr', '0.05', '--output-dir', str(run_dir),
            '--log-with', 'none', '--no-progress']
    return argv + (['--data-dir', args.data_dir] if args.data_dir else [])


def train_export_publish_reload(args: argparse.Namespace, hub: LocalHubServer) -> Dict[str, Any]:
    from sd_zoo.publishing import export_run
    from training.data import build_datasets
    from training.recipes import build_parser, config_from_args
    run_dir, export_dir = args.output_dir / 'small_run', args.output_dir / 'small_export'
    argv = small_run_argv(args, run_dir)
    result = cifar.main(argv)
    if result['status'] != 'completed':
        raise SystemExit(f"the small run stopped early ({result['status']})")
    export_run(run_dir, export_dir, tag='fashion_mnist_demo', suggest_entry=False)
    commit = hub.add_repo(SMALL_REPO, export_dir)
    with hub.client(args.output_dir / 'hub_cache'):
        model = timm.create_model(f'hf-hub:{SMALL_REPO}', pretrained=True)
    exported, loaded = load_file(str(export_dir / 'model.safetensors')), model.state_dict()
    identical = exported.keys() == loaded.keys() and all(torch.equal(exported[k], loaded[k]) for k in exported)
    cfg = config_from_args(build_parser('', 'fashion_mnist', ['fashion_mnist']).parse_args(argv))
    reloaded = test_error(model, DataLoader(build_datasets(cfg).test, batch_size=cfg.eval_batch_size))
    print(f'[3/3] trained {SMALL_MODEL} for 1 epoch on {result["data"]["train_size"]} images (test error '
          f'{100 * result["test_error_at_best_val"]:.2f}%), exported, published to {SMALL_REPO}@{commit[:12]} on '
          f'the local Hub, reloaded with timm.create_model("hf-hub:{SMALL_REPO}", pretrained=True): weights '
          f'{"bit-identical" if identical else "DIFFERENT"}, test error {100 * reloaded:.2f}%')
    return dict(run=result, identical=identical, reloaded_test_error=reloaded)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    args.output_dir.mkdir(parents=True)
    reps = args.reps or (3 if args.quick else 12)
    with LocalHubServer(args.output_dir / 'hub') as hub:
        zoo = zoo_weights(hub, args.output_dir / 'zoo_cache', args.data_dir, 1000 if args.quick else 0)
        timing = interleaved_ratio(reps, 32 if args.quick else 128)
        small = train_export_publish_reload(args, hub)
    out = dict(zoo=zoo, timing=timing, small=small)
    failed = [what for what, bad in (('zoo weights missing', 'missing' in zoo),
                                     ('card error not reproduced', zoo.get('reproduced') is False),
                                     ('reloaded weights differ', not small['identical'])) if bad]
    print('demo: ' + ('all steps passed' if not failed else 'FAILED: ' + '; '.join(failed)))
    out['failed'] = failed
    return out


if __name__ == '__main__':
    sys.exit(1 if main()['failed'] else 0)
