"""Evaluate any sd_ weight on a test set: ``sd-zoo-eval`` or ``python -m sd_zoo.evaluate``.

    sd-zoo-eval sd_resnet20_cifar.fashion_mnist --dataset fashion_mnist
    sd-zoo-eval hf-hub:org/name --dataset cifar10 --data-dir data/cifar10
    sd-zoo-eval results/fashion_mnist/export --dataset fashion_mnist --depth-samples 10
    sd-zoo-eval sd_resnet152.a1h_in1k --dataset imagefolder --data-dir /data/imagenet/val --dataset-id imagenet-1k

The weights are a registered tag, ``hf-hub:org/name``, an export folder or a safetensors file (with ``--model``).
Images go through the weights' own data config (timm's ``resolve_model_data_config`` and eval transform: resize,
centre crop, mean, std; converted to the model's number of channels). It prints top-1 / top-5 accuracy and top-1
error, writes them to a JSON file, and compares them with the figure on the weight's model card (the README.md
beside the weights, else the registry in ``sd_zoo/pretrained.py``) when one matches the dataset, split and image
size: pass or fail, with the difference in percentage points. Exit status: 0 (pass, or nothing to compare),
1 (the comparison failed), 2 (an error).

``--depth-samples K`` adds the paper's view of the network as an ensemble: K networks of random depth, each drawn
once from the training schedule (seeded; BatchNorm in eval mode; kept branches scaled as in training), evaluated on
every image, their softmax outputs averaged; the JSON holds the ensemble's error after 1..K members and each
member's own error and depth.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import DEFAULT_DATA_DIRS, DataError, load_cifar, load_fashion_mnist, load_svhn
from .hub import PretrainedWeightsError, write_text_atomic
from .sources import StartingPoint, load_pretrained

__all__ = ['DATASETS', 'CardFigure', 'evaluate', 'eval_dataset', 'card_figures', 'compare', 'random_depth', 'main']

# dataset -> the split evaluated and the dataset id used on model cards
DATASETS = {'fashion_mnist': 'test', 'cifar10': 'test', 'cifar100': 'test', 'svhn': 'test', 'imagefolder': None}
DEFAULT_TOLERANCE = 0.1  # percentage points: rounding of the card's figure and resize implementations


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
class TensorImages(Dataset):
    """uint8 images (N, C, H, W) as PIL images through ``transform`` (``mode``: 'L' or 'RGB', the model's)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any, mode: str):
        self.images, self.labels, self.transform, self.mode = images, labels.long(), transform, mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        img = self.images[index]
        pil = Image.fromarray(img[0].numpy(), 'L') if img.shape[0] == 1 else \
            Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), 'RGB')
        return self.transform(pil.convert(self.mode)), int(self.labels[index])


def eval_dataset(dataset: str, data_dir: Optional[str], data_config: Dict[str, Any], download: bool = False,
                 limit: int = 0) -> Dataset:
    """The test split of ``dataset`` (an ImageFolder: the folder itself) through ``data_config``'s eval transform."""
    from timm.data import create_transform
    transform = create_transform(**data_config, is_training=False)
    mode = 'L' if data_config['input_size'][0] == 1 else 'RGB'
    root = Path(data_dir or DEFAULT_DATA_DIRS.get(dataset, '.')).expanduser()
    if dataset == 'imagefolder':
        ds = _image_folder(root, transform, mode)
    else:
        if not root.is_dir() and not download:
            raise DataError(f'{root}: no such folder for dataset {dataset!r}; pass --data-dir to the folder that '
                            f'holds it, or add --download (needs internet)')
        if dataset == 'fashion_mnist':
            images, labels = load_fashion_mnist(root, download, splits=('test',))['test']
        elif dataset in ('cifar10', 'cifar100'):
            images, labels = load_cifar(root, 10 if dataset == 'cifar10' else 100, download, splits=('test',))['test']
        elif dataset == 'svhn':
            images, labels = load_svhn(root, download, splits=('test',))['test']
        else:
            raise DataError(f'--dataset={dataset!r} is unknown: use one of {sorted(DATASETS)}')
        ds = TensorImages(images, labels, transform, mode)
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def _image_folder(root: Path, transform: Any, mode: str) -> Dataset:
    from torchvision.datasets import ImageFolder
    if not root.is_dir():
        raise DataError(f'{root}: no such folder; --dataset imagefolder takes a folder of <class>/<image> files '
                        f'(e.g. ImageNet val/ with one folder per wnid, sorted as the classifier\'s classes)')
    try:
        return ImageFolder(str(root), transform=lambda img: transform(img.convert(mode)))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f'{root}: {e}') from e


_NUM_CLASSES = {'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100, 'svhn': 10}


def _num_classes(dataset: str, ds: Dataset) -> int:
    base = ds.dataset if isinstance(ds, Subset) else ds
    return len(base.classes) if hasattr(base, 'classes') else _NUM_CLASSES[dataset]


# ------------------------------------------------------------------------------------------------------------
# Random depth (the paper's ensemble view)
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def random_depth(model: nn.Module, seed: int) -> Iterator[Any]:
    """Inside the block, ``model`` in eval mode runs one network of random depth: the gates are drawn as in
    training (block mode, from the model's schedule), seeded by ``seed`` so every batch meets the same network;
    BatchNorm keeps its running statistics. Yields the stochastic-depth controller (``last_active``)."""
    sd = getattr(model, 'stochastic_depth', None)
    if sd is None or not hasattr(model, 'sd_blocks'):
        raise ValueError('--depth-samples needs an sd_ model (one with a stochastic-depth schedule)')
    if all(p >= 1.0 for p in sd.survival):
        raise ValueError('--depth-samples: the weights were saved with a constant-depth schedule (every p_l = 1), '
                         'so there is no random depth to draw')
    blocks, mode = list(model.sd_blocks()), sd.mode
    sd.mode = 'block'  # one draw per block for the whole batch: a network, not a per-image mask
    sd.manual_seed(seed)
    for block in blocks:
        block.training = True  # the gate asks the block, not its BatchNorm layers
    try:
        yield sd
    finally:
        for block in blocks:
            block.training = False
        sd.mode = mode


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, depth_samples: int = 0, seed: int = 0, device: str = 'cpu',
             progress: bool = True) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy, top-1 error and mean loss (in %, loss in nats) of ``model`` over ``loader``;
    with ``depth_samples`` K, also the ensemble of K random-depth networks (see the module doc)."""
    from tqdm.auto import tqdm
    model.eval().to(device)
    k5 = min(5, getattr(model, 'num_classes', 5) or 5)
    n, top1, top5, loss = 0, 0, 0, 0.0
    member_right, ensemble_right = [0] * depth_samples, [0] * depth_samples
    depths: List[Optional[List[bool]]] = [None] * depth_samples
    for x, y in tqdm(loader, desc='eval', disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        pred = logits.topk(k5, dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(dim=1).sum())
        loss += float(F.cross_entropy(logits, y, reduction='sum'))
        n += len(y)
        probs = torch.zeros_like(logits)
        for k in range(depth_samples):
            with random_depth(model, seed + k) as sd:
                member = model(x).softmax(dim=1)
                depths[k] = list(sd.last_active)
            probs += member
            member_right[k] += int((member.argmax(dim=1) == y).sum())
            ensemble_right[k] += int((probs.argmax(dim=1) == y).sum())
    if n == 0:
        raise DataError('the dataset holds no images')
    out = dict(images=n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, error=100.0 * (n - top1) / n,
               loss=loss / n, top5_k=k5)
    if depth_samples:
        out['depth_samples'] = dict(
            samples=depth_samples, seed=seed, ensemble_error=100.0 * (n - ensemble_right[-1]) / n,
            ensemble_error_by_members=[100.0 * (n - r) / n for r in ensemble_right],
            member_errors=[100.0 * (n - r) / n for r in member_right],
            member_active_blocks=[sum(d) for d in depths], member_active=[[int(b) for b in d] for d in depths],
            num_blocks=len(depths[0]))
        out['depth_samples']['mean_member_error'] = sum(out['depth_samples']['member_errors']) / depth_samples
    return out


# ------------------------------------------------------------------------------------------------------------
# The card's figures and the comparison
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardFigure:
    """A number on a weight's card: ``metric`` 'error', 'top1' or 'top5' (in %), where it was measured."""
    metric: str
    value: float
    dataset_id: str
    split: str
    img_size: Optional[int]
    source: str


_NAME = re.compile(r'Top-(1|5) (accuracy|error) \((\w+), (\d+) x \d+\)')


def _figures_from_card(path: str) -> List[CardFigure]:
    from huggingface_hub import ModelCard
    try:
        results = ModelCard(Path(path).read_text(encoding='utf-8')).data.eval_results or []
    except Exception:  # an unreadable card has no figures; the registry may still have them
        return []
    figures = []
    for r in results:
        match = _NAME.search(r.metric_name or '')
        metric = 'error' if r.metric_type == 'error' else ('top5' if match and match.group(1) == '5' else 'top1')
        figures.append(CardFigure(metric, float(r.metric_value), r.dataset_type, r.dataset_split or '',
                                  int(match.group(4)) if match else None, path))
    return figures


def _figures_from_registry(start: StartingPoint) -> List[CardFigure]:
    from .pretrained import published_weights
    weight = next((w for w in published_weights() if w.name == start.tag or
                   (start.hub_id and w.repo_id == start.hub_id)), None)
    if weight is None:
        return []
    results = list(weight.results)
    if not results and weight.run_dir:
        from .cards import read_results, run_figures
        run = Path(__file__).resolve().parent.parent / weight.run_dir  # a source checkout keeps its runs
        if (run / 'results.json').is_file():
            results = run_figures(weight, read_results(run))
    return [CardFigure(r.metric, r.value, weight.dataset_id, r.split, r.img_size,
                       f'sd_zoo/pretrained.py ({weight.name}; {r.source})') for r in results]


def card_figures(start: StartingPoint) -> List[CardFigure]:
    """The figures of the weight's card: its README.md beside the weights, else the registry's entry."""
    return (_figures_from_card(start.card) if start.card else []) or _figures_from_registry(start)


def compare(result: Dict[str, Any], figures: Sequence[CardFigure], dataset_id: Optional[str], split: str,
            img_size: int, tolerance: float) -> List[Dict[str, Any]]:
    """One entry per card figure that matches the evaluation (dataset, split, image size): ours, the card's,
    the difference (ours - card, percentage points) and whether it lies within ``tolerance``."""
    ours = {'error': result['error'], 'top1': result['top1'], 'top5': result['top5']}
    rows = []
    for f in figures:
        if f.dataset_id != dataset_id or f.split != split or (f.img_size and f.img_size != img_size):
            continue
        diff = ours[f.metric] - f.value
        rows.append(dict(**asdict(f), ours=ours[f.metric], difference=diff, tolerance=tolerance,
                         passed=abs(diff) <= tolerance + 1e-9))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sd-zoo-eval', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('weights', help='registered tag, hf-hub:org/name, export folder or .safetensors file')
    p.add_argument('--dataset', required=True, choices=sorted(DATASETS))
    p.add_argument('--data-dir', help='dataset folder (default: the dataset\'s usual place; imagefolder: the '
                                      'folder of <class>/ subfolders, e.g. ImageNet val/)')
    p.add_argument('--download', action='store_true', help='download the dataset with torchvision if missing')
    p.add_argument('--model', help='architecture of a bare .safetensors file (e.g. sd_resnet20_cifar)')
    p.add_argument('--dataset-id', help='card id of an imagefolder dataset to compare with (e.g. imagenet-1k)')
    p.add_argument('--split-name', default='validation', help='card split of an imagefolder dataset')
    p.add_argument('--train-size', action='store_true',
                   help='use the train input size and crop even when the weights define a test size')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--limit', type=int, default=0, help='evaluate the first N images only (no card comparison)')
    p.add_argument('--depth-samples', type=int, default=0, metavar='K',
                   help='also evaluate the ensemble of K random-depth networks drawn from the schedule')
    p.add_argument('--seed', type=int, default=0, help='seed of the first random-depth network (then +1, +2, ...)')
    p.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                   help='largest |ours - card| that passes, in percentage points')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0 = torch default)')
    p.add_argument('--output', help='JSON file to write (default: eval_<weights>_<dataset>.json here)')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    return p


def _output_path(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', args.weights.strip('/')).strip('_')
    return Path(f'eval_{name}_{args.dataset}.json')


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as ``args`` say; returns what the JSON file holds."""
    from timm.data import resolve_model_data_config
    for name in ('batch_size', 'workers', 'limit', 'depth_samples', 'threads'):
        if getattr(args, name) < (1 if name == 'batch_size' else 0):
            raise ValueError(f'--{name.replace("_", "-")}={getattr(args, name)} must be '
                             f'{"positive" if name == "batch_size" else ">= 0"}')
    if args.threads:
        torch.set_num_threads(args.threads)
    model, start = load_pretrained(args.weights, args.model)
    data_config = resolve_model_data_config(model, use_test_size=not args.train_size)
    ds = eval_dataset(args.dataset, args.data_dir, data_config, args.download, args.limit)
    if _num_classes(args.dataset, ds) > model.num_classes:
        raise ValueError(f'{args.weights} has {model.num_classes} classes but {args.dataset} has '
                         f'{_num_classes(args.dataset, ds)}: evaluate weights trained on this dataset, or fine-tune '
                         f'them first (training/cifar.py --preset finetune_small --pretrained ...)')
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    started = time.perf_counter()
    result = evaluate(model, loader, args.depth_samples, args.seed, args.device, args.progress)
    dataset_id = args.dataset if args.dataset != 'imagefolder' else args.dataset_id
    split = DATASETS[args.dataset] or args.split_name
    img_size = data_config['input_size'][-1]
    total = len(ds.dataset) if isinstance(ds, Subset) else len(ds)
    comparison = [] if args.limit and result['images'] < total else \
        compare(result, card_figures(start), dataset_id, split, img_size, args.tolerance)
    return dict(weights=args.weights, source=start.record(), dataset=args.dataset, dataset_id=dataset_id,
                split=split, data_dir=args.data_dir, images_in_split=total, data_config=_jsonable(data_config),
                **result, card_comparison=comparison,
                passed=all(c['passed'] for c in comparison) if comparison else None,
                seconds=time.perf_counter() - started, device=args.device, versions=_versions())


def _jsonable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _versions() -> Dict[str, str]:
    import timm

    from . import __version__
    return dict(torch=torch.__version__, timm=timm.__version__, sd_zoo=__version__)


def report(out: Dict[str, Any]) -> str:
    """The printed summary of :func:`run`'s result."""
    cfg = out['data_config']
    lines = [f"{out['weights']} on {out['dataset']} {out['split']} ({out['images']} of {out['images_in_split']} "
             f"images, {cfg['input_size'][-2]}x{cfg['input_size'][-1]}, crop_pct {cfg['crop_pct']}, "
             f"{cfg['interpolation']}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])})",
             f"  top-1 {out['top1']:.2f}%  top-{out['top5_k']} {out['top5']:.2f}%  error {out['error']:.2f}%"]
    for c in out['card_comparison']:
        lines.append(f"  card: {c['metric']} {c['value']:g}% ({c['split']}, {c['img_size']} px; {c['source']}): ours "
                     f"{c['ours']:.2f}%, difference {c['difference']:+.2f} pp, tolerance {c['tolerance']:g} -> "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    if not out['card_comparison']:
        lines.append('  card: no figure to compare with' + (' (--limit evaluates a subset)'
                                                             if out['images'] < out['images_in_split'] else ''))
    ds = out.get('depth_samples')
    if ds:
        lines.append(f"  {ds['samples']} random-depth networks (seed {ds['seed']}, mean "
                     f"{sum(ds['member_active_blocks']) / ds['samples']:.2f} of {ds['num_blocks']} blocks): ensemble "
                     f"error {ds['ensemble_error']:.2f}%, single networks {ds['mean_member_error']:.2f}% on average "
                     f"(plain network {out['error']:.2f}%)")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except (PretrainedWeightsError, DataError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    path = _output_path(args)
    write_text_atomic(path, json.dumps(out, indent=1))
    print(report(out))
    print(f'wrote {path}')
    return 1 if out['passed'] is False else 0


if __name__ == '__main__':
    sys.exit(main())
