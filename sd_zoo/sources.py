"""Where pretrained weights come from, and how they start another network.

A *source* is one of: a registered tag (``sd_resnet20_cifar.fashion_mnist``; a bare model name means its default
tag), a Hugging Face Hub id (``hf-hub:org/name``, optionally ``@revision``), a local export folder
(``config.json`` + ``model.safetensors``, or a training run folder holding ``best_model/``) or a single
safetensors file (its architecture then comes from ``model_name``, or a ``config.json`` beside it).

* :func:`load_pretrained` builds the network the weights were made for (their own classes and input channels),
  loads them, and says where they came from (:class:`StartingPoint`: tag, Hub repository and commit, file and its
  sha256, the model card beside the weights).
* :func:`adapt_pretrained` moves them into a network with other classes or input channels as
  ``timm.models.load_pretrained`` does: a classifier whose shape differs keeps its fresh initialisation, the first
  convolution goes through ``timm.models.adapt_input_conv``; it returns what it changed, in words.
* :func:`create_from_pretrained` does both, for fine-tuning.

Failures raise :class:`sd_zoo.hub.PretrainedWeightsError` naming the source and what would work instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, PretrainedWeightsError, check_keys, create_model, load_weights

__all__ = ['StartingPoint', 'load_pretrained', 'adapt_pretrained', 'create_from_pretrained', 'file_sha256']

HF_PREFIX = 'hf-hub:'
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.pkl', '.tar')


@dataclass
class StartingPoint:
    """What a network was loaded from: enough to find the same bytes again and to check them (``sha256``)."""
    spec: str
    kind: str  # 'tag', 'hf-hub', 'folder' or 'file'
    architecture: str
    num_classes: int
    in_chans: int
    tag: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None
    card: Optional[str] = None
    changes: List[str] = field(default_factory=list)

    def record(self) -> Dict[str, Any]:
        """JSON-ready fields (``None`` left out), for results.json, config.json and the card."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [])}

    def describe(self) -> str:
        where = f'Hub {self.hub_id}' + (f' at commit {self.revision}' if self.revision else '') if self.hub_id \
            else (self.file or self.spec)
        digest = f', sha256 {self.sha256}' if self.sha256 else ', file not found in the cache (no sha256)'
        name = self.tag or self.architecture
        return f'{name} ({where}{digest})'


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Loading, by kind of source
# ------------------------------------------------------------------------------------------------------------
def load_pretrained(spec: str, model_name: Optional[str] = None) -> Tuple[nn.Module, StartingPoint]:
    """The network ``spec``'s weights were made for, with the weights loaded, and where they came from.

    ``model_name`` is needed only for a bare safetensors file (no ``config.json`` beside it).
    """
    path = Path(spec).expanduser()
    if spec.startswith(HF_PREFIX):
        return _from_hub_name(spec, 'hf-hub')
    if path.is_dir():
        return _from_folder(spec, path)
    if path.is_file():
        return _from_file(spec, path, model_name)
    if _looks_like_path(spec):
        hint = ' (a Hub repository is written hf-hub:org/name)' if spec.count('/') == 1 and not spec.startswith(
            ('.', '/', '~')) else ''
        raise PretrainedWeightsError(
            f'{spec}: no such file or folder{hint}. Give a registered tag (e.g. sd_resnet20_cifar.fashion_mnist), '
            f'hf-hub:org/name, an export folder (config.json + {WEIGHTS_FILE}) or a .safetensors file')
    return _from_hub_name(spec, 'tag')


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or '/' in spec or spec.startswith(('.', '~')) or spec.endswith(_WEIGHT_SUFFIXES)


def _from_hub_name(spec: str, kind: str) -> Tuple[nn.Module, StartingPoint]:
    import timm
    if kind == 'tag' and not timm.is_model(spec.split('.')[0]):
        raise PretrainedWeightsError(
            f'{spec!r} is neither a registered model or tag nor an existing file or folder. Published sd_ weights: '
            f'{timm.list_pretrained("sd_*")}; or give hf-hub:org/name, an export folder or a .safetensors file')
    model = create_model(spec, pretrained=True)
    cfg = model.pretrained_cfg
    start = StartingPoint(spec=spec, kind=kind, architecture=cfg.get('architecture') or type(model).__name__,
                          num_classes=model.num_classes, in_chans=_in_chans(model))
    if kind == 'tag':
        start.tag = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else cfg.get('architecture')
    hub_id = cfg.get('hf_hub_id') or (spec[len(HF_PREFIX):] if kind == 'hf-hub' else None)
    if hub_id:
        repo_id, _, revision = hub_id.partition('@')
        start.hub_id = repo_id
        cached = _cached_file(repo_id, revision or None, cfg.get('hf_hub_filename'))
        if cached is not None:
            start.file, start.sha256 = str(cached), file_sha256(cached)
            start.revision = cached.parent.name if cached.parent.parent.name == 'snapshots' else (revision or None)
            start.card = _card_path(repo_id, start.revision or revision or None, cached.parent)
    return model.eval(), start


def _cached_file(repo_id: str, revision: Optional[str], filename: Optional[str]) -> Optional[Path]:
    """The weights file timm just loaded, found in the Hub cache (timm tries safetensors, then the pickle)."""
    from huggingface_hub import try_to_load_from_cache
    for name in ([filename] if filename else []) + [WEIGHTS_FILE, 'pytorch_model.bin']:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _card_path(repo_id: str, revision: Optional[str], snapshot: Path) -> Optional[str]:
    """README.md of the same commit: from the cache, else downloaded (online only; a missing card is no error)."""
    if (snapshot / CARD_FILE).is_file():
        return str(snapshot / CARD_FILE)
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo_id, CARD_FILE, revision=revision)
    except Exception:  # offline, no card in the repository, or no network: the registry's figures remain
        return None


def _from_folder(spec: str, folder: Path) -> Tuple[nn.Module, StartingPoint]:
    import timm
    if (folder / 'best_model' / WEIGHTS_FILE).is_file():  # a training run folder
        folder = folder / 'best_model'
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise PretrainedWeightsError(
            f'{folder} lacks {missing}: an export folder (sd-zoo-export, or a run\'s best_model/) holds '
            f'{CONFIG_FILE} and {WEIGHTS_FILE}; this one holds {present or "nothing"}')
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise PretrainedWeightsError(f'{folder / CONFIG_FILE} does not describe a model timm can build ({e})') from e
    load_weights(model, folder / WEIGHTS_FILE)
    weights = folder / WEIGHTS_FILE
    cfg = model.pretrained_cfg
    start = StartingPoint(spec=spec, kind='folder', architecture=cfg.get('architecture') or type(model).__name__,
                          num_classes=model.num_classes, in_chans=_in_chans(model), file=str(weights.resolve()),
                          sha256=file_sha256(weights))
    if cfg.get('tag'):
        start.tag = f"{start.architecture}.{cfg['tag']}"
    if (folder / CARD_FILE).is_file():
        start.card = str((folder / CARD_FILE).resolve())
    return model.eval(), start


def _from_file(spec: str, path: Path, model_name: Optional[str]) -> Tuple[nn.Module, StartingPoint]:
    import timm
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        model, start = _from_folder(spec, path.parent)
        return model, dataclasses.replace(start, kind='file')
    if path.suffix != '.safetensors':
        raise PretrainedWeightsError(
            f'{path} is not a safetensors file: sd_zoo starts from safetensors only (no unpickling); convert it '
            f'with safetensors.torch.save_file(torch.load(path, weights_only=True), "model.safetensors")')
    if not model_name:
        raise PretrainedWeightsError(
            f'{path} is a bare weights file without {CONFIG_FILE} beside it, so it does not say which architecture '
            f'it holds: pass --model (e.g. --model sd_resnet20_cifar)')
    if not timm.is_model(model_name):
        raise PretrainedWeightsError(f'--model={model_name!r} is not a registered model; sd_ models: '
                                     f'{timm.list_models("sd_*")}')
    shapes = _tensor_shapes(path)
    probe = timm.models.get_pretrained_cfg(model_name, allow_unregistered=True)
    first_conv = f"{getattr(probe, 'first_conv', None) or 'conv1'}.weight"
    classifier = f"{getattr(probe, 'classifier', None) or 'fc'}.weight"
    kwargs = {}
    if first_conv in shapes and len(shapes[first_conv]) == 4:
        kwargs['in_chans'] = shapes[first_conv][1]
    if classifier in shapes:
        kwargs['num_classes'] = shapes[classifier][0]
    with torch.random.fork_rng(devices=[]):
        model = create_model(model_name, pretrained=False, **kwargs)
    load_weights(model, path)
    start = StartingPoint(spec=spec, kind='file', architecture=model_name, num_classes=model.num_classes,
                          in_chans=_in_chans(model), file=str(path.resolve()), sha256=file_sha256(path))
    return model.eval(), start


def _tensor_shapes(path: Path) -> Dict[str, List[int]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedWeightsError(f'{path} is not a readable safetensors file ({e})') from e


def _in_chans(model: nn.Module) -> int:
    if getattr(model, 'in_chans', None):
        return int(model.in_chans)
    return int(model.pretrained_cfg.get('input_size', (3,))[0])


# ------------------------------------------------------------------------------------------------------------
# Moving weights into another head or stem
# ------------------------------------------------------------------------------------------------------------
def _names(value: Any) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def adapt_pretrained(source: nn.Module, model: nn.Module, source_name: str = 'the pretrained weights') -> List[str]:
    """Load ``source``'s weights into ``model`` (same architecture), adapting its head and first convolution.

    As ``timm.models.load_pretrained``: classifier weights whose shape differs are not loaded (``model`` keeps its
    fresh initialisation), and a first convolution with another number of input channels is converted with
    ``timm.models.adapt_input_conv`` (RGB to grey: the channels are summed; C to C': repeated and scaled by C / C').
    Everything else must match exactly. Returns one sentence per change.
    """
    from timm.models import adapt_input_conv
    state = dict(source.state_dict())
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    changes = []
    for name in _names(cfg.get('classifier', 'fc')):
        weight, target = state.get(f'{name}.weight'), own.get(f'{name}.weight')
        if weight is None or target is None or weight.shape == target.shape:
            continue
        for suffix in ('weight', 'bias'):
            if f'{name}.{suffix}' in own:
                state[f'{name}.{suffix}'] = own[f'{name}.{suffix}']
        changes.append(f'head re-initialised: {name} has {weight.shape[0]} classes in {source_name} and '
                       f'{target.shape[0]} here, so it keeps its fresh initialisation (as timm does)')
    for name in _names(cfg.get('first_conv', 'conv1')):
        weight, target = state.get(f'{name}.weight'), own.get(f'{name}.weight')
        if weight is None or target is None or weight.shape == target.shape or weight.ndim != 4 \
                or weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
            continue
        src, dst = weight.shape[1], target.shape[1]
        state[f'{name}.weight'] = adapt_input_conv(dst, weight, base_chans=src)
        how = 'summed over the input channels' if dst == 1 else f'repeated and scaled by {src}/{dst}'
        changes.append(f'first convolution adapted: {name} takes {src} input channel(s) in {source_name} and '
                       f'{dst} here (timm.models.adapt_input_conv: {how})')
    check_keys(model, state, source_name)
    model.load_state_dict(state, strict=True)
    return changes


def create_from_pretrained(
        spec: str,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        **kwargs: Any,
) -> Tuple[nn.Module, StartingPoint]:
    """A new network (``model_name``, default the weights' architecture; other ``kwargs`` as for
    ``timm.create_model``, e.g. the stochastic-depth settings) initialised from ``spec``'s weights.

    The source is loaded without touching torch's global random state, so the new network's own initialisation
    (a re-initialised head) is the one a run from scratch with the same seed would draw.
    ``StartingPoint.changes`` lists what had to be adapted.
    """
    import timm
    with torch.random.fork_rng(devices=[]):
        source, start = load_pretrained(spec, model_name)
    if model_name and start.kind != 'file' and model_name != start.architecture:
        raise PretrainedWeightsError(
            f'{spec} holds {start.architecture} weights, not {model_name}: leave out --model to fine-tune '
            f'{start.architecture}, or start {model_name} from weights of its own architecture')
    model = timm.create_model(model_name or start.architecture, num_classes=num_classes or start.num_classes,
                              in_chans=in_chans or start.in_chans, **kwargs)
    start.changes = adapt_pretrained(source, model, source_name=spec)
    return model, start
