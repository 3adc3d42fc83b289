"""Training recipes: the run configuration, the paper's presets and the command-line parser built from them.

Training hyper-parameters live here and nowhere else (not in the models). A preset is a set of overrides
of :class:`TrainConfig`; every field is also a flag (``--drop-path-rate 0`` turns a preset into its
constant-depth baseline). Values come from the paper and the authors' Torch7 code (see PAPER.md).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['TrainConfig', 'PRESETS', 'FINETUNE_PRESETS', 'PAPER_RUNS', 'DATASETS', 'build_parser', 'config_from_args',
           'validate_config']

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'svhn', 'imagenet', 'synthetic')


@dataclass
class TrainConfig:
    """Everything one training run needs; ``None`` means 'the dataset's default'."""
    preset: str = ''
    # model ('' with --pretrained: the architecture of the pretrained weights)
    model: str = 'sd_resnet110_cifar'
    pretrained: Optional[str] = None
    drop_path_rate: float = 0.5
    drop_path_schedule: str = 'linear'
    drop_path_mode: str = 'block'
    drop_path_scaling: str = 'train'
    in_chans: Optional[int] = None
    num_classes: Optional[int] = None
    zero_init_last: Optional[bool] = None
    # data
    dataset: str = 'cifar10'
    data_dir: Optional[str] = None
    download: bool = False
    augment: bool = True
    pad: int = 4
    val_size: int = 5000
    train_per_class: int = 0
    split_seed: int = 0
    limit: int = 0
    workers: int = 2
    # optimisation (paper: SGD, Nesterov momentum 0.9, dampening 0, weight decay 1e-4, batch 128)
    epochs: int = 500
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: Tuple[int, ...] = (250, 375)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 0.01
    decay_dropped: bool = True
    # runtime
    seed: int = 0
    mixed_precision: str = 'no'
    grad_accum: int = 1
    channels_last: bool = False
    compile: bool = False
    compile_blocks: str = 'auto'
    threads: int = 0
    max_steps: int = 0
    # output
    output_dir: str = 'results/run'
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: Optional[str] = None
    log_with: str = 'tensorboard'
    compare_with: Optional[str] = None
    progress: bool = True


# zero_init_last=False: the paper's He initialisation (fb.resnet.torch), every branch's last BN weight 1
_CIFAR = dict(dataset='cifar10', model='sd_resnet110_cifar', epochs=500, milestones=(250, 375), augment=True,
              zero_init_last=False)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Table 1 rows, 110 layers, 45k/5k seeded split; "+" = flip + 4-px translation
    'cifar10': dict(_CIFAR),
    'cifar10_noaug': dict(_CIFAR, augment=False),
    'cifar100': dict(_CIFAR, dataset='cifar100'),
    'cifar100_noaug': dict(_CIFAR, dataset='cifar100', augment=False),
    # 152 layers, train + extra without augmentation, 400/class (train) + 200/class (extra) validation
    'svhn': dict(dataset='svhn', model='sd_resnet152_svhn', epochs=50, milestones=(30, 35), augment=False,
                 zero_init_last=False),
    # 1202 layers: lr 0.01 for 10 warm-up epochs, then 0.1
    'cifar10_1202': dict(_CIFAR, model='sd_resnet1202_cifar', epochs=300, milestones=(150, 225),
                         warmup_epochs=10, warmup_lr=0.01),
    # fb.resnet.torch: batch 256, lr 0.1 per 256 images, /10 every 30 epochs; ILSVRC val is the reported split
    'imagenet_resnet152': dict(dataset='imagenet', model='sd_resnet152', epochs=90, milestones=(30, 60),
                               batch_size=256, eval_batch_size=200, augment=True, workers=8, zero_init_last=False),
    # This CPU machine: 28x28 single-channel images fed as they are (in_chans=1, no resizing or padding to 32;
    # the CIFAR stem is stride 1, so the stages see 28/14/7 pixels); flip + 2-px translation; 55k/5k split.
    'fashion_mnist': dict(dataset='fashion_mnist', model='sd_resnet20_cifar', epochs=10, milestones=(5, 8),
                          augment=True, pad=2, workers=0, checkpoint_every=100, keep_last=2, zero_init_last=False),
    # The paper's 110-layer network on this CPU (results/fashion_mnist_resnet110/PROTOCOL.md and its amendments):
    # a fixed, class-balanced 5,000-image training subset without augmentation (the regime of the paper's largest
    # gains), 2,000 validation images, 24 epochs with the paper's /10 steps at 50% and 75% of training,
    # channels_last. Peak lr 0.02 after 2 epochs at 0.005 and the last BatchNorm of each branch zeroed at init:
    # with the paper's lr 0.1 and He initialisation both arms diverged on this small set (amendments 1-3).
    'fashion_mnist_resnet110': dict(dataset='fashion_mnist', model='sd_resnet110_cifar', epochs=24, lr=0.02,
                                    milestones=(12, 18), warmup_epochs=2, warmup_lr=0.005,
                                    augment=False, train_per_class=500, val_size=2000,
                                    workers=0, channels_last=True, checkpoint_every=20, keep_last=2,
                                    zero_init_last=True),
}

# Fine-tuning from pretrained weights (--pretrained is required; the model is the weights' architecture).
# Source: BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020, arXiv:1912.11370; the authors'
# bit_pytorch/train.py and bit_hyperrule.py): SGD, momentum 0.9 (no Nesterov), no weight decay, lr 0.003 at batch
# 512, a warm-up, then /10 at 30%, 60% and 90% of training. BiT counts steps (10k for 20k-500k images); this engine
# steps its schedule per epoch, so the length is ours: 20 epochs, /10 at epochs 6, 12, 18, one warm-up epoch at a
# tenth of the rate (BiT: a linear ramp over the first 5%). drop_path_rate 0.1 (p_L = 0.9) is our choice, not
# BiT's (its networks have no stochastic depth): a small rate keeps some of the regularisation while the network
# starts close to the function it was trained to compute; the paper's 0.5 is a from-scratch rate for deep nets.
# lr scales with the batch (Goyal et al. 2017): with --batch-size 128, pass --lr 0.00075 --warmup-lr 0.000075.
_FINETUNE = dict(lr=0.003, batch_size=512, momentum=0.9, nesterov=False, weight_decay=0.0, epochs=20,
                 milestones=(6, 12, 18), warmup_epochs=1, warmup_lr=0.0003, drop_path_rate=0.1, augment=True)
PRESETS.update({
    # small images (CIFAR-10/100, SVHN, Fashion-MNIST) from a small-image model (e.g. sd_resnet20_cifar.fashion_mnist)
    'finetune_small': dict(_FINETUNE, dataset='cifar10'),
    # ImageFolder train/ + val/ at 224 (your images) from an ImageNet model (e.g. sd_resnet152.a1h_in1k)
    'finetune_imagenet': dict(_FINETUNE, dataset='imagenet', eval_batch_size=200, workers=8),
})
FINETUNE_PRESETS = ('finetune_small', 'finetune_imagenet')

# --compile-blocks auto: what benchmarks/compile.py measured fastest on each device type (README, "Compile or
# not"). CPU: compiled regions. CUDA: not yet measured (the GPU check is owed); regions, the model's default
# (inductor fuses a block's element-wise work there as it does on the CPU).
COMPILE_BLOCKS_BY_DEVICE = {'cpu': 'regions', 'cuda': 'regions'}


def resolve_compile_blocks(choice: str, device_type: str) -> str:
    """``--compile-blocks`` for this device: the choice itself, or the recommendation when it is 'auto'."""
    return COMPILE_BLOCKS_BY_DEVICE.get(device_type, 'regions') if choice == 'auto' else choice

_CHOICES = {
    'drop_path_schedule': ('linear', 'uniform'), 'drop_path_mode': ('block', 'sample', 'off'),
    'drop_path_scaling': ('train', 'test'), 'dataset': DATASETS, 'mixed_precision': ('no', 'fp16', 'bf16'),
    'log_with': ('tensorboard', 'none'), 'compile_blocks': ('auto', 'regions', 'eager'),
}
_HELP = {
    'preset': 'paper experiment to start from; every other flag overrides one of its values',
    'model': 'architecture (default: the preset\'s; with --pretrained, the architecture of those weights)',
    'pretrained': 'start from these weights: a registered tag (sd_resnet152.a1h_in1k), hf-hub:org/name, an export '
                  'folder or a .safetensors file; a different head or number of input channels is adapted',
    'drop_path_rate': '1 - p_L, drop probability of the last block (0 = constant-depth baseline)',
    'data_dir': 'dataset folder (default: the dataset\'s usual place, see training/data.py)',
    'download': 'download the dataset with torchvision if it is missing (needs internet)',
    'pad': 'translation augmentation: zero-pad by this many pixels, then crop back at random',
    'val_size': 'images held out from the training set for validation (seeded by --split-seed)',
    'train_per_class': 'train on a seeded, class-balanced subset of this many images per class (0 = all)',
    'limit': 'use at most this many images of each split (0 = all): for smoke tests',
    'batch_size': 'global batch per optimizer step (split over processes and accumulation steps)',
    'milestones': 'epochs at which the learning rate is multiplied by --lr-gamma',
    'decay_dropped': 'dropped blocks still get weight decay and momentum, as in the authors\' code',
    'threads': 'torch.set_num_threads (0 = torch default)',
    'compile': 'torch.compile the model (the gates stay in Python: no recompiles from draws); see the README\'s '
               'recommendation per situation',
    'compile_blocks': 'with --compile, how the gated blocks run: compiled regions per block shape, or eager '
                      '(auto = the measured recommendation for the device, training.recipes.COMPILE_BLOCKS_BY_DEVICE)',
    'max_steps': 'stop (with a checkpoint) after this many optimizer steps in total (0 = no limit)',
    'checkpoint_every': 'also checkpoint every N optimizer steps (0 = at the end of each epoch only)',
    'keep_last': 'periodic checkpoints to keep (the best-validation one is kept as well)',
    'resume': 'checkpoint folder to continue from, or "latest" (in --output-dir)',
    'compare_with': 'metrics.json of a constant-depth run, overlaid on the test-error plot',
    'in_chans': 'input channels (default: the dataset\'s)',
    'zero_init_last': 'zero the last BatchNorm of each residual branch at init (default: the model\'s)',
}


def _parse_int_tuple(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(',', ' ').split())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None


def build_parser(description: str, default_preset: str, presets: Sequence[str]) -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field, all defaulting to ``None`` (= keep the preset's value)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        kwargs: Dict[str, Any] = dict(default=None, help=_HELP.get(f.name))
        if f.name == 'preset':
            parser.add_argument(flag, default=default_preset, choices=list(presets), help=_HELP['preset'])
            continue
        if isinstance(f.default, bool) or f.name == 'zero_init_last':
            kwargs['action'] = argparse.BooleanOptionalAction
        elif f.name == 'milestones':
            kwargs['type'] = _parse_int_tuple
        elif f.name in _CHOICES:
            kwargs['choices'] = _CHOICES[f.name]
        else:
            kwargs['type'] = type(f.default) if f.default is not None else (int if 'chans' in f.name or
                                                                            'classes' in f.name else str)
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset values first, then every flag given on the command line."""
    values = dict(PRESETS[args.preset], preset=args.preset)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != 'preset'})
    if args.pretrained and args.model is None:
        values['model'] = ''  # the pretrained weights' architecture, resolved when they are loaded
    return TrainConfig(**values)


def _type_errors(cfg: TrainConfig) -> List[str]:
    """Fields of the wrong type (a config built in Python, not by the parser: ``drop_path_rate='0.5'``)."""
    errors = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if value is None or default is dataclasses.MISSING:
            continue
        if isinstance(default, bool) or f.name == 'zero_init_last':
            ok, kind = isinstance(value, bool), 'true or false'
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), 'a number'
        elif isinstance(default, int) or f.name in ('in_chans', 'num_classes'):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), 'an integer'
        elif isinstance(default, str) or f.name in ('pretrained', 'data_dir', 'resume', 'compare_with'):
            ok, kind = isinstance(value, str), 'a string'
        else:
            ok, kind = isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value), 'integers'
        if not ok:
            errors.append(f"--{f.name.replace('_', '-')}={value!r}: must be {kind}, not {type(value).__name__}")
    return errors


def validate_config(cfg: TrainConfig) -> List[str]:
    """Problems with the configuration, each naming its flag (empty when the configuration is valid)."""
    errors = _type_errors(cfg)
    if errors:  # the range checks below would fail on the wrong types with less helpful messages
        return errors

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            errors.append(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: {what}")

    need(bool(cfg.pretrained) or cfg.preset not in FINETUNE_PRESETS, 'pretrained',
         f'--preset {cfg.preset} fine-tunes: give --pretrained (a tag, hf-hub:org/name, an export folder or a file)')
    need(bool(cfg.model or cfg.pretrained), 'model', 'name an architecture, e.g. sd_resnet110_cifar')
    need(0.0 <= cfg.drop_path_rate < 1.0, 'drop_path_rate', 'must lie in [0, 1) (0 = constant depth)')
    for name in ('epochs', 'batch_size', 'eval_batch_size', 'grad_accum'):
        need(getattr(cfg, name) >= 1, name, 'must be a positive integer')
    for name in ('pad', 'limit', 'train_per_class', 'workers', 'warmup_epochs', 'threads', 'max_steps', 'checkpoint_every'):
        need(getattr(cfg, name) >= 0, name, 'must be >= 0')
    need(cfg.keep_last >= 1, 'keep_last', 'must be >= 1 (the latest checkpoint is needed to resume)')
    need(cfg.lr > 0, 'lr', 'must be > 0')
    need(cfg.warmup_lr > 0, 'warmup_lr', 'must be > 0')
    need(0.0 <= cfg.momentum < 1.0, 'momentum', 'must lie in [0, 1)')
    need(not cfg.nesterov or cfg.momentum > 0, 'nesterov', 'Nesterov momentum needs --momentum > 0')
    need(cfg.weight_decay >= 0, 'weight_decay', 'must be >= 0')
    need(0.0 < cfg.lr_gamma <= 1.0, 'lr_gamma', 'must lie in (0, 1]')
    need(list(cfg.milestones) == sorted(set(cfg.milestones)) and all(m > 0 for m in cfg.milestones),
         'milestones', 'must be increasing positive epochs')
    need(cfg.val_size >= 1 or cfg.dataset in ('svhn', 'imagenet'), 'val_size',
         'must be >= 1: the reported figure is the test error at the best-validation epoch')
    need(cfg.in_chans is None or cfg.in_chans >= 1, 'in_chans', 'must be >= 1')
    need(cfg.num_classes is None or cfg.num_classes >= 2, 'num_classes', 'must be >= 2')
    return errors


# The command for every row of the paper's results (PAPER.md), for the README; tests run each one on stand-in data.
PAPER_RUNS: List[Dict[str, Any]] = [
    dict(row='CIFAR-10+ ResNet-110', preset='cifar10', constant=6.41, stochastic=5.25,
         command='python training/cifar.py --preset cifar10 --data-dir data/cifar10 --output-dir results/cifar10_sd'),
    dict(row='CIFAR-100+ ResNet-110', preset='cifar100', constant=27.22, stochastic=24.58,
         command='python training/cifar.py --preset cifar100 --data-dir data/cifar100 '
                 '--output-dir results/cifar100_sd'),
    dict(row='CIFAR-10 ResNet-110 (no augmentation)', preset='cifar10_noaug', constant=13.63, stochastic=11.66,
         command='python training/cifar.py --preset cifar10_noaug --data-dir data/cifar10 '
                 '--output-dir results/cifar10_noaug_sd'),
    dict(row='CIFAR-100 ResNet-110 (no augmentation)', preset='cifar100_noaug', constant=44.74, stochastic=37.8,
         command='python training/cifar.py --preset cifar100_noaug --data-dir data/cifar100 '
                 '--output-dir results/cifar100_noaug_sd'),
    dict(row='SVHN ResNet-152', preset='svhn', constant=2.01, stochastic=1.75,
         command='python training/cifar.py --preset svhn --data-dir data/svhn --output-dir results/svhn_sd'),
    dict(row='CIFAR-10+ ResNet-1202', preset='cifar10_1202', constant=6.72, stochastic=4.91,
         command='python training/cifar.py --preset cifar10_1202 --data-dir data/cifar10 '
                 '--output-dir results/cifar10_1202_sd'),
    dict(row='ImageNet ResNet-152 (top-1 val error)', preset='imagenet_resnet152', constant=21.8, stochastic=22.0,
         command='accelerate launch training/imagenet.py --preset imagenet_resnet152 --data-dir data/imagenet '
                 '--mixed-precision bf16 --channels-last --output-dir results/imagenet_resnet152_sd'),
]
"""Each command trains with stochastic depth; append ``--drop-path-rate 0`` (and another --output-dir) for the
constant-depth column. ImageNet figures are the paper's v3 values, not verified here."""
