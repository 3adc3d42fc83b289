"""Train a stochastic-depth ResNet on ImageNet (ILSVRC-2012 as an ImageFolder tree with train/ and val/).

The paper's ResNet-152 with fb.resnet.torch settings (batch 256, lr 0.1, /10 every 30 epochs, Nesterov,
weight decay 1e-4, random-resized crops + colour jitter + PCA lighting + flip), reporting the validation error:
    accelerate launch --multi_gpu --num_processes 8 training/imagenet.py --data-dir /data/imagenet \\
        --mixed-precision bf16 --channels-last --output-dir results/imagenet_sd
Constant-depth baseline: the same with --drop-path-rate 0. Another depth: --model sd_resnet50.
Continue an interrupted run: the same command plus --resume latest.
Fine-tune on your own ImageFolder (train/<class>/*, val/<class>/*) from pretrained weights:
    python training/imagenet.py --preset finetune_imagenet --pretrained sd_resnet152.a1h_in1k --data-dir my_images
Outputs as training/cifar.py (results.json, metrics, plots, best_model/, checkpoints/); ImageNet has no separate
test split here, so the reported figure is the validation error at its best epoch.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.recipes import PRESETS, build_parser, config_from_args  # noqa: E402

IMAGENET_PRESETS = [name for name, p in PRESETS.items() if p['dataset'] == 'imagenet']


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, train, and return the results; errors exit with a message naming the problem."""
    parser = build_parser(__doc__, 'imagenet_resnet152', IMAGENET_PRESETS)
    cfg = config_from_args(parser.parse_args(argv))
    if cfg.dataset not in ('imagenet', 'synthetic'):
        parser.error(f'--dataset={cfg.dataset!r}: use training/cifar.py for the small-image datasets')
    from training.engine import run_cli  # after parsing: --help stays fast
    return run_cli(cfg, parser)


if __name__ == '__main__':
    main()
