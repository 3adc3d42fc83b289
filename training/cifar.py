"""Train a stochastic-depth ResNet on CIFAR-10/100, SVHN or Fashion-MNIST (the paper's small-image experiments).

One GPU or CPU:
    python training/cifar.py --preset cifar10 --data-dir data/cifar10 --output-dir results/cifar10_sd
Constant-depth baseline (same preset, no drops):
    python training/cifar.py --preset cifar10 --drop-path-rate 0 --output-dir results/cifar10_const
Several GPUs / machines (the global batch stays --batch-size):
    accelerate launch --multi_gpu --num_processes 4 training/cifar.py --preset cifar10 --mixed-precision bf16
Two CPU processes:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/cifar.py --preset fashion_mnist
Continue an interrupted run (same command plus):
    --resume latest
Fine-tune from pretrained weights (a tag, hf-hub:org/name, an export folder or a .safetensors file):
    python training/cifar.py --preset finetune_small --pretrained sd_resnet20_cifar.fashion_mnist --dataset cifar10

Presets (training/recipes.py): cifar10, cifar10_noaug, cifar100, cifar100_noaug, svhn, cifar10_1202,
fashion_mnist, fashion_mnist_resnet110, finetune_small. Outputs in --output-dir: results.json, metrics.csv/.json, tensorboard/, test_error.png,
first_conv_grad.png, best_model/ (model.safetensors + config.json for timm), checkpoints/.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.recipes import PRESETS, build_parser, config_from_args  # noqa: E402

SMALL_IMAGE_PRESETS = [name for name, p in PRESETS.items() if p['dataset'] != 'imagenet']


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, train, and return the results; errors exit with a message naming the problem."""
    parser = build_parser(__doc__, 'cifar10', SMALL_IMAGE_PRESETS)
    cfg = config_from_args(parser.parse_args(argv))
    if cfg.dataset == 'imagenet':
        parser.error('--dataset=imagenet: use training/imagenet.py for ImageNet')
    from training.engine import run_cli  # after parsing: --help stays fast
    return run_cli(cfg, parser)


if __name__ == '__main__':
    main()
