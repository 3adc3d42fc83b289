"""Published weights of the `sd_` models, as data: written once, read by the registry, the cards and the README.

Each :class:`PublishedWeight` says where a weight lives on the Hugging Face Hub, what it was trained on and how,
what it measured and where that number comes from. Everything a card shows travels with the record (weights
trained by this project carry the figures, recipe and constant-depth comparison copied from their run's
``results.json`` by ``sd-zoo-export``), so nothing here reads files. On import this module adds each weight as
a ``<model>.<tag>`` pretrained cfg of the models in :mod:`sd_zoo.sd_resnet` and registers them again with timm;
:func:`register_weight` does the same for one weight at run time. The Hub organisation of this project's
repositories comes from ``SD_ZOO_HUB_ORG`` (for mirrors).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from timm.models import generate_default_cfgs, register_model

from . import sd_resnet

__all__ = [
    'HUB_ORG_ENV', 'DEFAULT_HUB_ORG', 'PAPER', 'PAPER_RESULTS', 'Result', 'RunResult', 'PublishedWeight',
    'PUBLISHED', 'hub_org', 'published_weights', 'find_weight', 'names', 'with_published_weights',
    'register_weight', 'unregister_weight',
]

HUB_ORG_ENV = 'SD_ZOO_HUB_ORG'
DEFAULT_HUB_ORG = 'sd-zoo'
HF_WEIGHTS_FILE = 'model.safetensors'

PAPER = ('Deep Networks with Stochastic Depth', 'https://arxiv.org/abs/1603.09382')
RSB_PAPER = ('ResNet strikes back: An improved training procedure in timm', 'https://arxiv.org/abs/2110.00476')
RESNET_PAPER = ('Deep Residual Learning for Image Recognition', 'https://arxiv.org/abs/1512.03385')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Result:
    """One measured figure: ``metric`` (``top1``/``top5`` accuracy or ``error``, in %) on a split at a size."""
    metric: str
    value: float
    dataset: str
    split: str
    img_size: int
    source: str


@dataclass(frozen=True)
class RunResult:
    """One training run as a card compares it: its folder, drop-path rate, test error (%) at the best-validation
    epoch, that epoch and its wall time, copied from the run's ``results.json``."""
    run_dir: str
    drop_path_rate: Optional[float]
    test_error: float
    best_epoch: Optional[int]
    wall_time_s: float


# The paper's numbers (Huang et al. 2016), typed once: (dataset id, setting) -> (constant depth, stochastic depth)
# top-1 error in %. ImageNet figures are from the ECCV version and not verified here (see PAPER.md).
PAPER_RESULTS: Dict[Tuple[str, str], Tuple[float, float]] = {
    ('cifar10', 'ResNet-110, CIFAR-10+'): (6.41, 5.25),
    ('cifar100', 'ResNet-110, CIFAR-100+'): (27.22, 24.58),
    ('svhn', 'ResNet-152, SVHN'): (2.01, 1.75),
    ('cifar10', 'ResNet-1202, CIFAR-10+'): (6.72, 4.91),
    ('imagenet-1k', 'ResNet-152, ImageNet (90+ epochs, fb.resnet.torch recipe; approximate, ECCV version)'):
        (21.8, 22.0),
}


@dataclass(frozen=True)
class PublishedWeight:
    """A weight file on the Hub for ``<model>.<tag>`` and everything a card says about it.

    ``hub_repo`` is the repository name; ``hub_org`` fixes its owner (for weights hosted by others), otherwise
    the project's organisation (``SD_ZOO_HUB_ORG``) is used. ``revision`` pins a 40-hex commit once known.
    ``results`` hold the measured figures with their source (for a project run: its ``run_dir/results.json``);
    ``comparison`` holds the project run and its constant-depth twin (``baseline_run_dir``), compared in the card.
    """
    model: str
    tag: str
    hub_repo: str
    trained_by: str
    dataset: str
    dataset_id: str
    data_cfg: Dict[str, Any]
    recipe: Tuple[str, ...]
    train_command: str
    stochastic_depth: str
    provenance: str
    hub_org: Optional[str] = None
    revision: Optional[str] = None
    license: str = 'apache-2.0'
    papers: Tuple[Tuple[str, str], ...] = (PAPER,)
    results: Tuple[Result, ...] = ()
    run_dir: Optional[str] = None
    baseline_run_dir: Optional[str] = None
    paper_ids: str = 'arXiv:1603.09382'
    extra_citations: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    default: bool = True
    comparison: Tuple[RunResult, ...] = ()

    @property
    def name(self) -> str:
        return f'{self.model}.{self.tag}'

    @property
    def repo_id(self) -> str:
        return f'{self.hub_org or hub_org()}/{self.hub_repo}'

    @property
    def hf_hub_id(self) -> str:
        """Full ``org/repo`` id for timm, pinned as ``org/repo@<commit>`` once a revision is known."""
        return f'{self.repo_id}@{self.revision}' if self.revision else self.repo_id

    def data_config(self) -> Dict[str, Any]:
        """The model's base cfg (``sd_resnet``) updated with this weight's data facts: what timm will use."""
        return {**_BASE_CFGS.get(self.model, {}), **self.data_cfg}

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The weight facts timm needs (merged over the architecture's base cfg in ``sd_resnet``)."""
        return {
            **self.data_cfg,
            'hf_hub_id': self.hf_hub_id,
            'hf_hub_filename': HF_WEIGHTS_FILE,
            'license': self.license,
            'paper_ids': self.paper_ids,
            'paper_name': self.papers[0][0],
            'origin_url': f'https://huggingface.co/{self.repo_id}',
        }


def hub_org() -> str:
    """The Hub organisation of this project's repositories (``SD_ZOO_HUB_ORG``, default ``sd-zoo``)."""
    return os.environ.get(HUB_ORG_ENV, '').strip() or DEFAULT_HUB_ORG


# ----------------------------------------------------------------------------------------------------------
# timm's ImageNet ResNet-152 weights trained with (per-sample) stochastic depth. Their keys and shapes equal
# sd_resnet152's, so they load strictly. Figures: timm's model cards (comparison table, ImageNet-1k val).
# ----------------------------------------------------------------------------------------------------------
_TIMM_RSB_DATA = dict(
    num_classes=1000, input_size=(3, 224, 224), test_input_size=(3, 288, 288), pool_size=(7, 7),
    crop_pct=0.95, test_crop_pct=1.0, interpolation='bicubic', mean=IMAGENET_MEAN, std=IMAGENET_STD,
)
_TIMM_SD = (
    "timm's per-sample drop path (`timm.layers.DropPath`): every residual branch is multiplied by a per-image "
    "Bernoulli mask scaled by 1/p (inverted scaling, so evaluation is the plain ResNet), with timm's ResNet "
    "rule rate * idx / (N - 1) (first block never dropped), not the paper's per-batch block dropping. "
)
_TIMM_PROVENANCE = (
    "These are timm's weights, not trained by sd_zoo: the file is `model.safetensors` from the Hugging Face "
    "repository `{repo}` (also released as `{url}`), published by Ross Wightman with timm. sd_zoo only "
    "registers them under `sd_resnet152` because their keys and shapes are identical, so they load strictly; "
    "the numbers above are timm's, measured by timm, not re-measured here."
)


def _timm_rsb(
        tag: str,
        recipe: Tuple[str, ...],
        sd_rate: str,
        url: str,
        results: Tuple[Tuple[str, float, int], ...],
) -> PublishedWeight:
    repo = f'resnet152.{tag}'
    source = f"timm model card https://huggingface.co/timm/{repo} (model comparison table)"
    return PublishedWeight(
        model='sd_resnet152', tag=tag, hub_repo=repo, hub_org='timm', trained_by='timm',
        dataset='ImageNet-1k', dataset_id='imagenet-1k', data_cfg=dict(_TIMM_RSB_DATA), recipe=recipe,
        train_command=(
            "Not published as one command; timm's `train.py` with the RSB hyper-parameters "
            "(https://arxiv.org/abs/2110.00476, Table 1 for ResNet-50; see the recipe above)"),
        stochastic_depth=_TIMM_SD + sd_rate,
        provenance=_TIMM_PROVENANCE.format(repo=f'timm/{repo}', url=url),
        papers=(RSB_PAPER, RESNET_PAPER, PAPER), paper_ids='arXiv:2110.00476',
        results=tuple(Result(m, v, 'ImageNet-1k', 'validation', s, source) for m, v, s in results),
        extra_citations=('rsb',),
    )


_RSB_RATE_UNKNOWN = (
    "The RSB paper (Table 1) gives drop-path rate 0.05 for ResNet-50 in procedures A1 and A2 (none in A3); "
    "the rate timm used for ResNet-152 is not published in timm's pretrained cfg, model card or paper."
)

_R110_SD = 'results/fashion_mnist_resnet110/stochastic'
_R110_CONST = 'results/fashion_mnist_resnet110/constant'
_R110_DATA = {'num_classes': 10, 'input_size': (1, 28, 28), 'pool_size': (7, 7), 'crop_pct': 1.0,
              'interpolation': 'bilinear', 'mean': (0.286,), 'std': (0.353,)}
_R110_COMPARISON = (
    RunResult(_R110_SD, drop_path_rate=0.5, test_error=20.25, best_epoch=23, wall_time_s=4272.5300016589945),
    RunResult(_R110_CONST, drop_path_rate=0.0, test_error=16.84, best_epoch=24, wall_time_s=4757.753114360998))
_R110_PROVENANCE = (
    'Trained by sd_zoo with its own training script on the CPU of its 2-core development machine, both arms at the '
    'same time (one thread each), following the protocol committed before the runs '
    '(`results/fashion_mnist_resnet110/PROTOCOL.md`, with three amendments made before these runs started); run '
    'folder `results/fashion_mnist_resnet110/{arm}` (results.json, metrics, log). Exported with `sd-zoo-export '
    '--run results/fashion_mnist_resnet110/{arm} --tag {tag} --out results/fashion_mnist_resnet110/{out}`.')
_R110_NOTES = (
    'Pre-registered comparison on a 5,000-image class-balanced subset without augmentation, 24 epochs, one seed: '
    'stochastic depth 20.25% test error at the best-validation epoch, constant depth 16.84% (+3.41 points: by the '
    'protocol\'s rule, stochastic depth hurt here); training-time ratio 0.785 (S / C, measured inside the runs). '
    'A second seed per arm, run later (weights not published): 19.27% against 16.63% (+2.64 points), ratio 0.743; '
    'mean difference over the two seeds +3.03 points, the same verdict. '
    'The project README (section "The paper\'s network") says what this means against the paper\'s numbers.',
    'Peak lr 0.02 and zero-initialised last BatchNorms instead of the paper\'s lr 0.1 and He initialisation: with '
    'those, both arms diverged on this small set (protocol amendments 1-3).',
    '28 x 28 single-channel images fed as they are (in_chans=1, no resizing); ask for this tag explicitly (the '
    'plain name `sd_resnet110_cifar` keeps its untrained CIFAR defaults).',
)


def _r110_recipe(rate: float) -> Tuple[str, ...]:
    """The recipe lines of both ResNet-110 arms (as tools/cards.py derives them from results.json)."""
    return ('preset: "fashion_mnist_resnet110"', 'dataset: "fashion_mnist"', 'model: "sd_resnet110_cifar"',
            'epochs: 24', 'batch_size: 128', 'lr: 0.02', 'momentum: 0.9', 'nesterov: true', 'weight_decay: 0.0001',
            'milestones: [12, 18]', 'lr_gamma: 0.1', 'warmup_epochs: 2', 'augment: false',
            'val_size: 2000', 'split_seed: 0', 'seed: 0', f'drop_path_rate: {rate}', 'drop_path_schedule: "linear"',
            'drop_path_mode: "block"', 'drop_path_scaling: "train"', 'mixed_precision: "no"',
            'data: {"split_seed": 0, "test_size": 10000, "train_fingerprint": "633b57da38d75b79", '
            '"train_per_class": 500, "train_size": 5000, "val_fingerprint": "daa7fd65787a476e", "val_size": 2000}')


_FMNIST_RUN = 'results/fashion_mnist/sd_resnet20_stochastic'
_FMNIST_BASELINE = 'results/fashion_mnist/sd_resnet20_constant'

PUBLISHED: Tuple[PublishedWeight, ...] = (
    _timm_rsb(
        'a1h_in1k',
        ("Based on the ResNet Strikes Back (RSB) `A1` recipe: LAMB optimizer, BCE loss, cosine LR schedule "
         "with warm-up, 600 epochs at 224 x 224",
         "Stronger dropout, stochastic depth and RandAugment than the paper's `A1` recipe (timm's card)"),
        _RSB_RATE_UNKNOWN + " The `A1h` recipe used a higher rate than `A1`, by timm's card; its value is "
        "unpublished.",
        'https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/'
        'resnet152_a1h-dc400468.pth',
        (('top1', 82.8, 224), ('top5', 96.13, 224), ('top1', 83.46, 288), ('top5', 96.54, 288))),
    _timm_rsb(
        'a1_in1k',
        ("ResNet Strikes Back (RSB) `A1` recipe: LAMB optimizer, BCE loss, cosine LR schedule with warm-up, "
         "600 epochs at 224 x 224",),
        _RSB_RATE_UNKNOWN,
        'https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/'
        'resnet152_a1_0-2eee8a7a.pth',
        (('top1', 81.97, 224), ('top5', 95.24, 224), ('top1', 82.74, 288), ('top5', 95.71, 288))),
    _timm_rsb(
        'a2_in1k',
        ("ResNet Strikes Back (RSB) `A2` recipe: LAMB optimizer, BCE loss, cosine LR schedule with warm-up, "
         "300 epochs at 224 x 224",),
        _RSB_RATE_UNKNOWN,
        'https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/'
        'resnet152_a2_0-b4c6978f.pth',
        (('top1', 81.77, 224), ('top5', 95.22, 224), ('top1', 82.62, 288), ('top5', 95.75, 288))),
    # Weights trained by this project are added here, one entry per run: `sd-zoo-export --run <run_dir>
    # [--baseline-run <constant-depth run>]` prints the entry to paste, with the figures, recipe and comparison
    # copied from the runs' results.json (tools/cards.py checks them against the committed runs).
    PublishedWeight(
        model='sd_resnet20_cifar',
        tag='fashion_mnist',
        hub_repo='sd_resnet20_cifar.fashion_mnist',
        trained_by='sd_zoo',
        dataset='Fashion-MNIST',
        dataset_id='fashion_mnist',
        data_cfg={'num_classes': 10, 'input_size': (1, 28, 28), 'pool_size': (7, 7), 'crop_pct': 1.0,
                  'interpolation': 'bilinear', 'mean': (0.286,), 'std': (0.353,)},
        recipe=('preset: "fashion_mnist"', 'dataset: "fashion_mnist"', 'model: "sd_resnet20_cifar"', 'epochs: 8',
                'batch_size: 128', 'lr: 0.1', 'momentum: 0.9', 'nesterov: true', 'weight_decay: 0.0001',
                'milestones: [4, 6]', 'lr_gamma: 0.1', 'warmup_epochs: 0', 'augment: true', 'val_size: 5000',
                'split_seed: 0', 'seed: 0', 'drop_path_rate: 0.5', 'drop_path_schedule: "linear"',
                'drop_path_mode: "block"', 'drop_path_scaling: "train"', 'mixed_precision: "no"',
                'data: {"split_seed": 0, "test_size": 10000, "train_size": 55000, '
                '"val_fingerprint": "e1f4a1de3b6a5745", "val_size": 5000}'),
        train_command=('python training/cifar.py --preset fashion_mnist --drop-path-rate 0.5 --threads 1 '
                       '--no-progress --epochs 8 --milestones 4,6 '
                       '--output-dir results/fashion_mnist/sd_resnet20_stochastic --resume latest'),
        stochastic_depth=("sd_zoo's block mode (one gate per block per mini-batch, dropped branches skipped, as "
                          "in the paper), linear schedule, p_L = 0.5"),
        provenance=('Trained by sd_zoo with its own training script on the CPU of its 2-core development machine, '
                    'beside a constant-depth twin (same seed, split and recipe, `--drop-path-rate 0`); run '
                    'folders `results/fashion_mnist/sd_resnet20_stochastic` and `..._constant` (results.json, '
                    'metrics, plots). Exported with `sd-zoo-export --run results/fashion_mnist/'
                    'sd_resnet20_stochastic --baseline-run results/fashion_mnist/sd_resnet20_constant '
                    '--tag fashion_mnist --out results/fashion_mnist/export`.'),
        results=(
            Result('error', 11.8, 'Fashion-MNIST', 'test', 28, _FMNIST_RUN + '/results.json'),
            Result('error', 11.64, 'Fashion-MNIST', 'validation', 28, _FMNIST_RUN + '/results.json')),
        run_dir=_FMNIST_RUN,
        baseline_run_dir=_FMNIST_BASELINE,
        comparison=(
            RunResult(_FMNIST_RUN, drop_path_rate=0.5, test_error=11.8, best_epoch=8, wall_time_s=3832.817877368999),
            RunResult(_FMNIST_BASELINE, drop_path_rate=0.0, test_error=7.88, best_epoch=6,
                      wall_time_s=4208.938204974998)),
        notes=('28 x 28 single-channel images fed as they are (in_chans=1, no resizing); the plain name '
               '`sd_resnet20_cifar` keeps its untrained CIFAR defaults, so ask for this tag explicitly.',
               'The two runs shared a busy 2-core CPU (one thread each, other jobs beside them), so their time '
               'ratio is a rough measurement; the controlled one is in the project\'s `benchmarks/`. On this '
               'shallow 9-block network and 8-epoch schedule stochastic depth did worse than constant depth.'),
        default=False,
    ),
    # The pre-registered ResNet-110 experiment (results/fashion_mnist_resnet110/PROTOCOL.md): both arms are published,
    # the stochastic-depth one and its constant-depth twin, so that either can be checked or fine-tuned.
    PublishedWeight(
        model='sd_resnet110_cifar',
        tag='fashion_mnist',
        hub_repo='sd_resnet110_cifar.fashion_mnist',
        trained_by='sd_zoo',
        dataset='Fashion-MNIST',
        dataset_id='fashion_mnist',
        data_cfg=dict(_R110_DATA),
        recipe=_r110_recipe(0.5),
        train_command=('python training/cifar.py --preset fashion_mnist_resnet110 --threads 1 --no-progress '
                       '--drop-path-rate 0.5 --output-dir <RUNS>/r110_sd_seed0'),
        stochastic_depth=("sd_zoo's block mode (one gate per block per mini-batch, dropped branches skipped, as "
                          "in the paper), linear schedule, p_L = 0.5"),
        provenance=_R110_PROVENANCE.format(arm='stochastic', tag='fashion_mnist', out='export'),
        results=(
            Result('error', 20.25, 'Fashion-MNIST', 'test', 28, _R110_SD + '/results.json'),
            Result('error', 19.15, 'Fashion-MNIST', 'validation', 28, _R110_SD + '/results.json')),
        run_dir=_R110_SD,
        baseline_run_dir=_R110_CONST,
        comparison=_R110_COMPARISON,
        notes=_R110_NOTES,
        default=False,
    ),
    PublishedWeight(
        model='sd_resnet110_cifar',
        tag='fashion_mnist_constant_depth',
        hub_repo='sd_resnet110_cifar.fashion_mnist_constant_depth',
        trained_by='sd_zoo',
        dataset='Fashion-MNIST',
        dataset_id='fashion_mnist',
        data_cfg=dict(_R110_DATA),
        recipe=_r110_recipe(0.0),
        train_command=('python training/cifar.py --preset fashion_mnist_resnet110 --threads 1 --no-progress '
                       '--drop-path-rate 0 --output-dir <RUNS>/r110_const_seed0'),
        stochastic_depth=('none: the constant-depth twin of `sd_resnet110_cifar.fashion_mnist` '
                          '(`--drop-path-rate 0`, every block in every step)'),
        provenance=_R110_PROVENANCE.format(arm='constant', tag='fashion_mnist_constant_depth',
                                           out='export_constant_depth'),
        results=(
            Result('error', 16.84, 'Fashion-MNIST', 'test', 28, _R110_CONST + '/results.json'),
            Result('error', 15.2, 'Fashion-MNIST', 'validation', 28, _R110_CONST + '/results.json')),
        run_dir=_R110_CONST,
        notes=_R110_NOTES,
        default=False,
    ),
)


def published_weights() -> Tuple[PublishedWeight, ...]:
    return PUBLISHED


def find_weight(name: str) -> Optional[PublishedWeight]:
    """The published weight called ``<model>.<tag>``, or None."""
    return next((w for w in PUBLISHED if w.name == name), None)


def with_published_weights(base_cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The cfgs for ``generate_default_cfgs``: one ``'<model>.<tag>'`` entry per published weight (the model's
    base cfg updated with the weight's facts) and the untagged base cfg of every model without a default weight.

    timm's default tag of a model is its first weight: for weights with ``default=False`` (say, trained on another
    input modality) the untagged cfg is marked as the default, so the plain name keeps the architecture's defaults.
    ``base_cfgs`` maps model names to their untagged cfg dicts.
    """
    unknown = [w.name for w in PUBLISHED if w.model not in base_cfgs]
    if unknown:
        raise ValueError(f'published weights {unknown} name unknown models; known: {sorted(base_cfgs)}')
    out: Dict[str, Dict[str, Any]] = {}
    for model, base in base_cfgs.items():
        weights = sorted((w for w in PUBLISHED if w.model == model), key=lambda w: not w.default)
        out.update({w.name: {**base, **w.pretrained_cfg()} for w in weights})
        if not any(w.default for w in weights):
            # 'model.*' is timm's mark of an explicit default; it must follow the tags with weights
            out[f'{model}.*' if weights else model] = base
    return out


# The models' untrained cfgs, taken before the published weights are added to sd_resnet.default_cfgs below.
_BASE_CFGS: Dict[str, Dict[str, Any]] = {
    model: cfg.cfgs[''].to_dict() for model, cfg in sd_resnet.default_cfgs.items()}


def register_weight(weight: PublishedWeight) -> None:
    """Add (or replace) a published weight at run time, e.g. a private fine-tune or a mirror's own repository.

    The model's entrypoint is registered again with timm, so ``<model>.<tag>`` works at once; the first weight
    listed for a model stays its default.
    """
    global PUBLISHED
    if weight.model not in _BASE_CFGS:
        raise ValueError(f'{weight.model} is not an sd_ model; known: {sorted(_BASE_CFGS)}')
    PUBLISHED = tuple(w for w in PUBLISHED if w.name != weight.name) + (weight,)
    _register_again(weight.model)


def unregister_weight(name: str) -> None:
    """Remove the published weight ``<model>.<tag>`` added by :func:`register_weight`."""
    global PUBLISHED
    weight = find_weight(name)
    if weight is None:
        raise ValueError(f'{name} is not a published weight; published: {names()}')
    PUBLISHED = tuple(w for w in PUBLISHED if w.name != name)
    _register_again(weight.model)


def _register_again(*models: str) -> None:
    cfgs = generate_default_cfgs(with_published_weights(dict(_BASE_CFGS)))
    with warnings.catch_warnings():  # timm warns on any re-registration; replacing the entry is the point here
        warnings.simplefilter('ignore', UserWarning)
        for model in models:
            sd_resnet.default_cfgs[model] = cfgs[model]
            register_model(getattr(sd_resnet, model))


def names() -> List[str]:
    return [w.name for w in PUBLISHED]


_register_again(*_BASE_CFGS)
