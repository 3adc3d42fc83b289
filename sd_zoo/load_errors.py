"""Errors of building an `sd_` model with weights, explained: what is wrong and what is available.

The model file wraps timm's builder in :func:`explain_load_errors`, so ``timm.create_model`` itself raises these
clear errors. This module stands on timm and huggingface_hub alone, never on the rest of sd_zoo (as timm's own
model files never import its hub module): the loading layer above (:mod:`sd_zoo.hub`) re-exports it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

__all__ = ['PretrainedWeightsError', 'explain_load_errors', 'available_weights']


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
