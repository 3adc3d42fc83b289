"""Errors of building an `sd_` model with weights, explained: what is wrong and what is available; and the
integrity check of the weights file (its sha256 against the one recorded when it was written).

The model file wraps timm's builder in :func:`explain_load_errors` and checks the weights with
:func:`verify_loaded_weights`, so ``timm.create_model`` itself raises these clear errors. This module stands on
timm and huggingface_hub alone, never on the rest of sd_zoo (as timm's own model files never import its hub
module): the loading layer above (:mod:`sd_zoo.hub`) re-exports it.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

__all__ = ['PretrainedWeightsError', 'explain_load_errors', 'available_weights', 'IntegrityError', 'file_sha256',
           'expected_sha256', 'verify_file', 'verify_loaded_weights']

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'


class PretrainedWeightsError(RuntimeError):
    """Weights could not be found, read or matched; the message names the problem and what is available."""


def available_weights(arch: str) -> str:
    """A sentence naming the published weights of ``arch`` and of every `sd_` model."""
    import timm
    tags = timm.list_pretrained(f'{arch}.*')
    every = timm.list_pretrained('sd_*')
    return (f'published for {arch}: {tags}' if tags else f'{arch} has no published weights') + \
        f'; all sd_ weights: {every}'


def _cache_listing(repo_id: str) -> str:
    from huggingface_hub import constants
    root = Path(constants.HF_HUB_CACHE) / ('models--' + repo_id.replace('/', '--'))
    files = sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()) if root.exists() else []
    return f'cache {constants.HF_HUB_CACHE} holds for {repo_id}: {files or "nothing"}'


@contextlib.contextmanager
def explain_load_errors(model_name: str) -> Iterator[None]:
    """Re-raise weight-loading failures inside the block as :class:`PretrainedWeightsError` with a clear message."""
    import timm
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from safetensors import SafetensorError
    from timm.models import get_pretrained_cfg
    from timm.models._registry import split_model_name_tag

    arch, tag = split_model_name_tag(model_name.split(':', 1)[-1])
    try:
        yield
    except PretrainedWeightsError:
        raise
    except RuntimeError as e:
        msg = str(e)
        if 'Invalid pretrained tag' in msg or 'No pretrained weights exist' in msg:
            raise PretrainedWeightsError(
                f'{model_name} has no published weights ({msg}); {available_weights(arch)}. '
                f'Use pretrained=False for random init') from e
        if 'Unknown model' in msg:
            raise PretrainedWeightsError(
                f'{model_name}: its config.json names an architecture timm does not know ({msg}); import the package '
                f'that registers it, or check "architecture" in config.json (sd_ models: '
                f'{", ".join(timm.list_models("sd_*")[:6])}, ...)') from e
        if 'Error(s) in loading state_dict' in msg:
            raise PretrainedWeightsError(f'weights for {model_name} do not match the model: {msg}') from e
        raise
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, EntryNotFoundError) as e:
        cfg = get_pretrained_cfg(model_name, allow_unregistered=True) if ':' not in model_name else None
        hub_id = (cfg.hf_hub_id if cfg else model_name.split(':', 1)[-1]) or arch
        repo_id = hub_id.split('@')[0]
        raise PretrainedWeightsError(
            f'{model_name}: a file of {hub_id} is not available ({type(e).__name__}: {str(e).splitlines()[0]}); '
            f'{_cache_listing(repo_id)}. Unset HF_HUB_OFFLINE to download it, or seed the cache with '
            f'`sd-zoo-publish <export> --repo-id {repo_id} --cache-dir <HF_HUB_CACHE>`') from e
    except SafetensorError as e:
        raise PretrainedWeightsError(
            f'{model_name}: the downloaded safetensors file is corrupted ({e}); delete it from the cache '
            f'(`hf cache delete` or remove the snapshot folder) and load again') from e


# ------------------------------------------------------------------------------------------------------------
# Integrity: sha256 of weight files, recorded at export and checked on load
# ------------------------------------------------------------------------------------------------------------
class IntegrityError(PretrainedWeightsError):
    """A file's sha256 differs from the one recorded for it: its bytes changed after it was written."""


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(path: Union[str, Path]) -> Optional[str]:
    """The sha256 recorded for a weights file: in the ``config.json`` beside it (``sd_zoo.files``), or, for a
    Hugging Face cache snapshot, the name of the LFS blob the file links to. None when nothing is recorded."""
    import json
    import re
    path = Path(path)
    config = path.parent / CONFIG_FILE
    if config.is_file():
        try:
            recorded = json.loads(config.read_text(encoding='utf-8')).get('sd_zoo', {}).get('files', {})
        except (OSError, ValueError, AttributeError):
            recorded = {}
        if isinstance(recorded, dict) and isinstance(recorded.get(path.name), dict):
            return recorded[path.name].get('sha256')
    blob = path.resolve()
    if blob.parent.name == 'blobs' and re.fullmatch(r'[0-9a-f]{64}', blob.name):
        return blob.name
    return None


def verify_file(path: Union[str, Path], expected: Optional[str] = None) -> bool:
    """Check ``path`` against ``expected`` (or :func:`expected_sha256`); True if verified, False if nothing is
    recorded (unverified, accepted); :class:`IntegrityError` on a mismatch."""
    path = Path(path)
    expected = expected or expected_sha256(path)
    if not expected:
        return False
    actual = file_sha256(path)
    if actual != expected:
        raise IntegrityError(
            f'{path} is corrupted: its sha256 is {actual}, {expected} was recorded when it was written. Delete it '
            f'and download or export it again (for a Hub file: remove it from the cache, `hf cache delete`)')
    return True


def verify_loaded_weights(model: Any) -> Optional[Path]:
    """Check the sha256 of the file ``model``'s pretrained weights came from (a local file, or the Hub cache's
    copy); return the file when a recorded sha256 matched, None when nothing was recorded (unverified)."""
    from huggingface_hub import try_to_load_from_cache
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    candidates = [Path(cfg['file'])] if cfg.get('file') else []
    if cfg.get('hf_hub_id'):
        repo_id, _, revision = cfg['hf_hub_id'].partition('@')
        cached = try_to_load_from_cache(repo_id, cfg.get('hf_hub_filename') or WEIGHTS_FILE, revision=revision or None)
        candidates += [Path(cached)] if isinstance(cached, str) else []
    for path in candidates:
        if path.is_file() and verify_file(path):
            return path
    return None
