"""Hugging Face Hub-format export and safe loading of the `sd_` models (the layer above the weights table).

Export (:func:`export_model`) writes a Hub-ready folder: ``model.safetensors`` (safetensors only, always in the
inverted ``train`` scaling so the file also loads into timm's plain ResNet of the same layout), ``config.json``
in timm's format (``architecture``, ``num_classes``, ``pretrained_cfg``, ``model_args`` with the
stochastic-depth settings; sd_zoo's own metadata at the top level) and ``README.md``, the model card text it is
given. The folder is built next to the target and swapped in, so a failed export never replaces a good one.
Cards, exporting a training run and publishing live one layer up (:mod:`sd_zoo.cards`,
:mod:`sd_zoo.publishing`), the commands above them (:mod:`sd_zoo.cli`).

Loading never unpickles unless asked (:func:`load_weights` with ``allow_pickle=True``, then
``torch.load(weights_only=True)``); :func:`create_model` and :func:`explain_load_errors` (from
:mod:`sd_zoo.load_errors`, which the model file uses too) turn timm's and huggingface_hub's failures into
errors that say what is wrong and what is available.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

from ._version import __version__
from .load_errors import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    IntegrityError,
    PretrainedWeightsError,
    expected_sha256,
    explain_load_errors,
    file_sha256,
    verify_file,
    verify_loaded_weights,
)

__all__ = [
    'PretrainedWeightsError', 'export_model', 'load_weights', 'check_keys', 'create_model', 'explain_load_errors',
    'write_text_atomic', 'ExportTargetError', 'check_export_target', 'IntegrityError', 'file_sha256', 'verify_file',
    'expected_sha256', 'verify_loaded_weights',
]

CARD_FILE = 'README.md'


class ExportTargetError(ValueError):
    """The export folder holds something that is not a previous export; the message says what and what to do."""


# ------------------------------------------------------------------------------------------------------------
# Export target guard: an export replaces only a previous export (or, with overwrite, a folder of other files),
# never a training run
# ------------------------------------------------------------------------------------------------------------
EXPORT_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, '.gitattributes'})
RUN_MARKERS = ('results.json', 'metrics.json', 'checkpoints', 'trainer_state.json')


def _is_previous_export(folder: Path) -> bool:
    import json
    names = {p.name for p in folder.iterdir()}
    if not names <= EXPORT_FILES or CONFIG_FILE not in names:
        return False
    try:
        return 'architecture' in json.loads((folder / CONFIG_FILE).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return False


def check_export_target(out_dir: Union[str, Path], overwrite: bool = False) -> None:
    """Raise :class:`ExportTargetError` unless ``out_dir`` is new, empty or a previous export.

    With ``overwrite`` any other folder is replaced too, except a training run (results.json, checkpoints/,
    ...) or a folder holding one: those are never deleted.
    """
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportTargetError(f'--out={out} is a file, not a folder: choose a new folder for the export')
    runs = [m for m in RUN_MARKERS if (out / m).exists()] + \
        [str(p.relative_to(out)) for p in out.glob('*/results.json')][:3]
    if runs:
        raise ExportTargetError(f'--out={out} holds a training run ({", ".join(runs)}); an export never replaces '
                                f'a run: choose a new folder, e.g. {out}/export')
    if overwrite or not any(out.iterdir()) or _is_previous_export(out):
        return
    present = sorted(p.name for p in out.iterdir())
    raise ExportTargetError(f'--out={out} is not empty and is not a previous export (it holds {present[:8]}); '
                            f'choose a new folder, or pass --overwrite to replace its contents')


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` (old one removed last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        yield tmp
        for path in (tmp, *tmp.rglob('*')):  # mkdtemp's private 0700 is not what a shared export wants
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = target.with_name(f'.{target.name}.old-{os.getpid()}')
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _schedule_args(model: nn.Module) -> Dict[str, Any]:
    """The model_args that rebuild ``model``'s stochastic depth (exports are always in train scaling)."""
    sd = model.stochastic_depth
    return dict(drop_path_rate=sd.drop_path_rate, drop_path_schedule=sd.schedule, drop_path_mode=sd.mode,
                drop_path_scaling='train')


def export_model(
        model: nn.Module,
        out_dir: Union[str, Path],
        card: str,
        tag: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``model`` (an `sd_` model made by ``timm.create_model``) as a Hub-ready folder; return its path.

    The weights are folded into ``train`` scaling on a copy; ``card`` is the README.md text; ``tag`` and
    ``metadata`` go into config.json (``pretrained_cfg.tag`` and a top-level ``sd_zoo`` entry);
    ``data_config`` (input_size, mean, std, crop_pct, ...) is the preprocessing the weights were trained with.
    ``out_dir`` must be new, empty or a previous export (see :func:`check_export_target`; ``overwrite``).
    The sha256 of the weights file is recorded in config.json (``sd_zoo.files``) and in the card.
    """
    check_export_target(out_dir, overwrite)
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    from .stochastic_depth import fold_test_scaling

    if not hasattr(model, 'stochastic_depth') or not hasattr(model, 'pretrained_cfg'):
        raise TypeError('export_model needs an sd_ model built by timm.create_model (it has no stochastic_depth '
                        'controller or pretrained_cfg)')
    model = fold_test_scaling(copy.deepcopy(model).cpu().eval())
    args = {k: v for k, v in getattr(model, '_model_args', {}).items()
            if k not in ('drop_path_seed', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')}
    model._model_args = args  # a copy's: timm's exporter reads the recorded creation arguments from it
    sd = model.stochastic_depth
    extra = {'sd_zoo': {
        'version': _version(), 'survival_probabilities': sd.survival, 'expected_depth': sd.expected_depth,
        'scaling_note': 'weights in inverted (train) scaling: evaluation is the plain ResNet', **(metadata or {})}}
    cfg_update = {'hf_hub_filename': WEIGHTS_FILE, **({'tag': tag} if tag else {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with _atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={'format': 'pt'})
        files = {WEIGHTS_FILE: {'sha256': file_sha256(tmp / WEIGHTS_FILE), 'bytes': (tmp / WEIGHTS_FILE).stat().st_size}}
        extra['sd_zoo']['files'] = files
        save_config_for_hf(model, str(tmp / CONFIG_FILE), model_config={'pretrained_cfg': cfg_update, **extra},
                           model_args=_schedule_args(model), data_config=data_config)
        (tmp / CARD_FILE).write_text(card_with_checksums(card, files), encoding='utf-8')
    return Path(out_dir)


def card_with_checksums(card: str, files: Dict[str, Dict[str, Any]]) -> str:
    rows = '\n'.join(f'| `{name}` | {info["bytes"]:,} | `{info["sha256"]}` |' for name, info in sorted(files.items()))
    return (card.rstrip('\n') + '\n\n## Files\n\nsd_zoo checks the sha256 of the weights when it loads them.\n\n'
            '| file | bytes | sha256 |\n|---|---|---|\n' + rows + '\n')


def _version() -> str:
    return __version__


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.tmp-')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's private 0600 is not what a shared file wants
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------------------------
def _read_state_dict(path: Path, allow_pickle: bool) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f'weights file {path} does not exist')
    if path.suffix != '.safetensors':
        if not allow_pickle:
            raise PretrainedWeightsError(
                f'{path} is not a safetensors file; sd_zoo does not unpickle weights unless asked: pass '
                f'allow_pickle=True to load it with torch.load(weights_only=True), or convert it to safetensors')
        state = torch.load(path, map_location='cpu', weights_only=True)
        return state.get('state_dict', state.get('model', state)) if isinstance(state, dict) else state
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedWeightsError(
            f'{path} is not a readable safetensors file ({e}); it is corrupted or truncated '
            f'({path.stat().st_size:,} bytes): delete it and download or export it again') from e


def check_keys(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Raise a clear error unless ``state`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise PretrainedWeightsError(
            f'weights in {source} do not match {arch}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:3]}. '
            f'Check the model name and num_classes / in_chans against the file\'s config.json')


def load_weights(model: nn.Module, path: Union[str, Path], allow_pickle: bool = False) -> nn.Module:
    """Load a weights file into ``model`` strictly; safetensors only unless ``allow_pickle``."""
    path = Path(path)
    if path.is_file():
        verify_file(path)
    state = _read_state_dict(path, allow_pickle)
    check_keys(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with :func:`explain_load_errors` around it."""
    import timm
    with explain_load_errors(model_name):
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    if pretrained and not architecture.startswith('sd_'):
        verify_loaded_weights(model)  # sd_ entrypoints check their weights themselves (sd_resnet._create_sd_resnet)
    return model
