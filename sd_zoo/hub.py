"""Hugging Face Hub export, publishing and safe loading for the `sd_` models.

Export (``sd-zoo-export`` / ``python -m sd_zoo.hub export``) writes a Hub-ready folder: ``model.safetensors``
(safetensors only, always in the inverted ``train`` scaling so the file also loads into timm's plain ResNet of
the same layout), ``config.json`` in timm's format (``architecture``, ``num_classes``, ``pretrained_cfg``,
``model_args`` with the stochastic-depth settings; sd_zoo's own metadata at the top level) and ``README.md``,
the model card. The folder is built next to the target and swapped in, so a failed export never replaces a
good one. Publish (``sd-zoo-publish``) creates the repository if needed, uploads the folder and prints the
commit to pin in ``sd_zoo/pretrained.py``.

    sd-zoo-export --run results/fashion_mnist/<run> --tag fashion_mnist --out exports/<name> --card-dir hub_cards
    sd-zoo-publish exports/<name> --repo-id sd-zoo/<name> [--private] [--revision B] [--create-pr] [--dry-run]
    python -m sd_zoo.hub cards [--check]       # re-render hub_cards/ from sd_zoo/pretrained.py

Loading never unpickles unless asked (:func:`load_weights` with ``allow_pickle=True``, then
``torch.load(weights_only=True)``); :func:`create_model` and :func:`explain_load_errors` turn timm's and
huggingface_hub's failures into errors that say what is wrong and what is available.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from .pretrained import PublishedWeight

__all__ = [
    'PretrainedWeightsError', 'export_model', 'export_run', 'publish', 'LocalHubCache', 'load_weights',
    'create_model', 'explain_load_errors', 'render_all_cards', 'write_text_atomic', 'main', 'ExportTargetError',
    'check_export_target', 'IntegrityError', 'file_sha256', 'verify_file', 'expected_sha256',
]

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt', '.tar')
ROOT = Path(__file__).resolve().parent.parent


class PretrainedWeightsError(RuntimeError):
    """Weights could not be found, read or matched; the message names the problem and what is available."""


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
    from timm.models._hub import save_config_for_hf
    from safetensors.torch import save_file
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


def card_with_checksums(card: str, files: Dict[str, Dict[str, Any]]) -> str:
    rows = '\n'.join(f'| `{name}` | {info["bytes"]:,} | `{info["sha256"]}` |' for name, info in sorted(files.items()))
    return (card.rstrip('\n') + '\n\n## Files\n\nsd_zoo checks the sha256 of the weights when it loads them.\n\n'
            '| file | bytes | sha256 |\n|---|---|---|\n' + rows + '\n')


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


def _version() -> str:
    from . import __version__
    return __version__


def _weights_dir(run_dir: Path) -> Path:
    """Where a run keeps its best weights: ``<run>/best_model/`` (the training engine) or the run folder."""
    best = run_dir / 'best_model'
    return best if (best / WEIGHTS_FILE).is_file() else run_dir


def _model_from_run(run_dir: Path) -> nn.Module:
    import timm
    weights_dir = _weights_dir(run_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (weights_dir / name).is_file():
            present = sorted(p.name for p in weights_dir.iterdir()) if weights_dir.is_dir() else []
            raise FileNotFoundError(
                f'{weights_dir / name} not found: a finished run leaves its best weights as {WEIGHTS_FILE} + '
                f'{CONFIG_FILE} in best_model/; the folder holds {present or "nothing (does it exist?)"}')
    model = timm.create_model(f'local-dir:{weights_dir}', pretrained=False)
    load_weights(model, weights_dir / WEIGHTS_FILE)
    return model


def _run_dataset(results: Dict[str, Any]) -> Optional[str]:
    for section in ('run', 'settings', 'config'):
        if isinstance(results.get(section), dict) and results[section].get('dataset'):
            return str(results[section]['dataset'])
    return results.get('dataset')


def weight_from_run(run_dir: Path, model: nn.Module, tag: str, results: Dict[str, Any]) -> 'PublishedWeight':
    """A :class:`PublishedWeight` describing a project run (what to paste into ``sd_zoo/pretrained.py``)."""
    from .pretrained import PublishedWeight
    cfg = model.pretrained_cfg
    keys = ('num_classes', 'input_size', 'test_input_size', 'pool_size', 'crop_pct', 'test_crop_pct',
            'interpolation', 'mean', 'std')
    data_cfg = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in keys if cfg.get(k) is not None}
    dataset = _run_dataset(results) or tag
    arch = cfg['architecture']
    args = _schedule_args(model)
    gates = {'block': 'one gate per block per mini-batch, dropped branches skipped, as in the paper',
             'sample': 'per-sample masks', 'off': 'off: constant depth'}[args['drop_path_mode']]
    return PublishedWeight(
        model=arch, tag=tag, hub_repo=f'{arch}.{tag}', trained_by='sd_zoo',
        dataset=_DATASET_NAMES.get(dataset, dataset), dataset_id=dataset, data_cfg=data_cfg, recipe=(),
        train_command='',
        stochastic_depth=(f"sd_zoo's {args['drop_path_mode']} mode ({gates}), {args['drop_path_schedule']} "
                          f"schedule, p_L = {1 - args['drop_path_rate']:g}"),
        provenance=(f'Trained by sd_zoo with its own training script; run folder `{run_dir}` (results.json, '
                    f'metrics, best weights). Exported with `sd-zoo-export --run {run_dir} --tag {tag}`.'),
        run_dir=str(run_dir))


_DATASET_NAMES = {'fashion_mnist': 'Fashion-MNIST', 'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN',
                  'imagenet': 'ImageNet-1k', 'imagenet-1k': 'ImageNet-1k'}


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def export_run(
        run_dir: Union[str, Path],
        out_dir: Union[str, Path],
        tag: Optional[str] = None,
        card_dir: Optional[Union[str, Path]] = None,
        suggest_entry: bool = True,
        baseline_run: Optional[Union[str, Path]] = None,
        overwrite: bool = False,
) -> Path:
    """Export a training run's best weights with a card built from its ``results.json``.

    The card uses the run's entry in ``sd_zoo/pretrained.py`` when ``<model>.<tag>`` is registered; otherwise
    an entry is derived from the run (``baseline_run``: its constant-depth twin, compared in the card) and,
    if ``suggest_entry``, printed, ready to paste there.
    """
    from .cards import read_results, render_card, card_filename
    from .pretrained import find_weight

    run_dir = Path(run_dir)
    check_export_target(out_dir, overwrite)
    results = read_results(run_dir)
    check_best_weights_match(run_dir, results)
    model = _model_from_run(run_dir)
    tag = tag or results.get('tag') or _run_dataset(results)
    if not tag:
        raise ValueError(f'no tag given and {run_dir}/results.json names no dataset: pass --tag (e.g. fashion_mnist)')
    name = f"{model.pretrained_cfg['architecture']}.{tag}"
    weight = find_weight(name)
    if weight is None:
        weight = weight_from_run(Path(_relative(run_dir)), model, tag, results)
        if baseline_run is not None:
            weight = dataclasses.replace(weight, baseline_run_dir=_relative(Path(baseline_run)))
        if suggest_entry:
            print(f'{name} is not in sd_zoo/pretrained.py yet; add this entry to PUBLISHED, then run '
                  f'`python -m sd_zoo.hub cards`:\n\n{entry_source(weight)}\n')
    card = render_card(weight, results, comparison=_comparison(weight))
    export_model(model, out_dir, card, tag=tag, metadata={'run_dir': _relative(run_dir), 'results': results},
                 overwrite=overwrite)
    if card_dir is not None:
        write_text_atomic(Path(card_dir) / card_filename(weight), card)
    return Path(out_dir)


def check_best_weights_match(run_dir: Path, results: Dict[str, Any]) -> None:
    """Refuse a run whose ``best_model/`` is not the best epoch ``results.json`` reports (a run killed between
    its checkpoint and the export of its best weights); resuming the run repairs it."""
    import json
    config = run_dir / 'best_model' / CONFIG_FILE
    if results.get('best_epoch') is None or not config.is_file():
        return
    try:
        exported = json.loads(config.read_text(encoding='utf-8')).get('sd_zoo', {}).get('training', {}).get('epoch')
    except (OSError, ValueError, AttributeError):
        exported = None
    if exported is not None and exported != results['best_epoch']:
        raise ValueError(f'{run_dir}: best_model/ holds the weights of epoch {exported}, results.json reports epoch '
                         f'{results["best_epoch"]} as best (the run was stopped before it exported them); repair '
                         f'it with the training command plus --resume latest, then export again')


def _comparison(weight: 'PublishedWeight') -> Optional[str]:
    from .cards import comparison_table
    return comparison_table(weight) if weight.run_dir else None


def entry_source(weight: 'PublishedWeight') -> str:
    """Python source of ``weight`` as an entry of ``PUBLISHED``."""
    fields = ('model', 'tag', 'hub_repo', 'trained_by', 'dataset', 'dataset_id', 'data_cfg', 'recipe', 'train_command',
              'stochastic_depth', 'provenance', 'run_dir', 'baseline_run_dir')
    lines = [f'    {f}={getattr(weight, f)!r},' for f in fields if getattr(weight, f, None) is not None]
    return 'PublishedWeight(\n' + '\n'.join(lines) + '\n),'


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


def render_all_cards(card_dir: Union[str, Path], check: bool = False) -> List[str]:
    """(Re)write one card per published weight into ``card_dir``; with ``check``, only list stale cards."""
    from .cards import card_filename, read_results, render_card
    from .pretrained import published_weights

    stale = []
    for weight in published_weights():
        results = read_results(ROOT / weight.run_dir) if weight.run_dir else None
        text = render_card(weight, results, comparison=_comparison(weight))
        path = Path(card_dir) / card_filename(weight)
        if not path.is_file() or path.read_text(encoding='utf-8') != text:
            stale.append(str(path))
            if not check:
                write_text_atomic(path, text)
    return stale


# ------------------------------------------------------------------------------------------------------------
# Publish
# ------------------------------------------------------------------------------------------------------------
def _upload_files(folder: Path) -> List[Path]:
    files = sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.'))
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f'{folder} holds pickle files {pickles}: sd_zoo publishes safetensors only; remove them')
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} lacks {missing}: make the folder with sd-zoo-export first')
    return files


def publish(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
        api: Optional[Any] = None,
) -> Optional[str]:
    """Upload an exported folder to ``repo_id`` (created if needed); return the commit id (None on dry run).

    ``api`` defaults to ``huggingface_hub.HfApi()`` (token from ``huggingface-cli login`` or ``HF_TOKEN``);
    :class:`LocalHubCache` stands in for it to write a Hub cache folder instead.
    """
    folder = Path(folder)
    files = _upload_files(folder)
    if '/' not in repo_id:
        raise ValueError(f'repo_id={repo_id!r} must be a full "org/name" (the org: SD_ZOO_HUB_ORG or your user)')
    target = f'{repo_id}@{revision or "main"}' + (' (as a pull request)' if create_pr else '')
    if dry_run:
        print(f'dry run: would upload to {target}:')
        for path in files:
            print(f'  {path.relative_to(folder)}  ({path.stat().st_size:,} bytes)')
        return None
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type='model', private=private, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id=repo_id, branch=revision, repo_type='model', exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision, create_pr=create_pr,
        commit_message=commit_message or f'Upload {folder.name} with sd_zoo {_version()}',
        allow_patterns=[str(p.relative_to(folder)) for p in files])
    print(f'uploaded {len(files)} files to {target}: commit {info.oid}')
    if getattr(info, 'pr_url', None):
        print(f'pull request: {info.pr_url}')
    print(f"pin it in sd_zoo/pretrained.py: revision='{info.oid}'  (hf_hub_id '{repo_id}@{info.oid}')")
    return info.oid


@dataclass
class LocalCommit:
    oid: str
    commit_url: str
    pr_url: Optional[str] = None
    pr_revision: Optional[str] = None


class LocalHubCache:
    """Stands in for ``HfApi`` and writes what it uploads as a Hugging Face cache folder.

    The layout is huggingface_hub's (``models--{org}--{name}/refs/<branch>`` holding the commit,
    ``snapshots/<commit>/<files>``), so ``HF_HUB_CACHE=<cache_dir> HF_HUB_OFFLINE=1`` loads from it: handy
    to seed an offline machine and to test publishing without the network.
    """

    def __init__(self, cache_dir: Union[str, Path]):
        self.cache_dir = Path(cache_dir)
        self.repos: Dict[str, Dict[str, Any]] = {}

    def _repo(self, repo_id: str) -> Path:
        return self.cache_dir / ('models--' + repo_id.replace('/', '--'))

    def create_repo(self, repo_id: str, repo_type: str = 'model', private: bool = False, exist_ok: bool = False,
                    **_: Any) -> str:
        path = self._repo(repo_id)
        if path.exists() and not exist_ok:
            raise FileExistsError(f'{repo_id} exists in {self.cache_dir}')
        (path / 'refs').mkdir(parents=True, exist_ok=True)
        self.repos[repo_id] = {'private': private}
        return f'local://{path}'

    def create_branch(self, repo_id: str, branch: str, repo_type: str = 'model', exist_ok: bool = False,
                      **_: Any) -> None:
        ref = self._repo(repo_id) / 'refs' / branch
        if ref.exists():
            if not exist_ok:
                raise FileExistsError(f'branch {branch} of {repo_id} exists')
            return
        main = self._repo(repo_id) / 'refs' / 'main'
        if main.exists():
            write_text_atomic(ref, main.read_text())

    def upload_folder(self, repo_id: str, folder_path: str, revision: Optional[str] = None, create_pr: bool = False,
                      commit_message: str = '', allow_patterns: Optional[Sequence[str]] = None,
                      **_: Any) -> LocalCommit:
        repo, branch = self._repo(repo_id), revision or 'main'
        parent_ref = repo / 'refs' / branch
        parent = parent_ref.read_text().strip() if parent_ref.is_file() else ''
        names = sorted(allow_patterns or [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob('*')
                                          if p.is_file()])
        digest = hashlib.sha1(f'{parent}\n{branch}\n{create_pr}\n{commit_message}\n'.encode())
        for name in names:
            digest.update(name.encode() + b'\0' + (Path(folder_path) / name).read_bytes())
        oid = digest.hexdigest()
        snapshot = repo / 'snapshots' / oid
        if parent:  # a commit holds the whole tree: the parent's files, then the uploaded ones
            shutil.copytree(repo / 'snapshots' / parent, snapshot, dirs_exist_ok=True)
        for name in names:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder_path) / name, snapshot / name)
        if create_pr:
            num = len(list((repo / 'refs' / 'pr').glob('*'))) + 1 if (repo / 'refs' / 'pr').exists() else 1
            write_text_atomic(repo / 'refs' / 'pr' / str(num), oid)
            return LocalCommit(oid, f'local://{snapshot}', f'local://{repo_id}/pr/{num}', f'refs/pr/{num}')
        write_text_atomic(parent_ref, oid)
        return LocalCommit(oid, f'local://{snapshot}')


# ------------------------------------------------------------------------------------------------------------
# Safe loading and clear errors
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


def _available_weights(arch: str) -> str:
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
                f'{model_name} has no published weights ({msg}); {_available_weights(arch)}. '
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


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with :func:`explain_load_errors` around it."""
    import timm
    with explain_load_errors(model_name):
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if pretrained:
        verify_loaded_weights(model)
    return model


def verify_loaded_weights(model: nn.Module) -> Optional[Path]:
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


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def _export_parser(sub: Any) -> None:
    p = sub.add_parser('export', help='write a Hub-ready folder (model.safetensors, config.json, README.md)')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--run', help='training run folder (results.json, model.safetensors, config.json)')
    src.add_argument('--model', help='registered weight <model>.<tag> to export as published (downloads it)')
    p.add_argument('--tag', help='pretrained tag of the export, e.g. fashion_mnist (default: the run dataset)')
    p.add_argument('--out', required=True, help='output folder: new, empty or a previous export (replaced '
                   'atomically); never a training run')
    p.add_argument('--overwrite', action='store_true', help='replace --out even if it holds other files')
    p.add_argument('--card-dir', help='also write the card there as <model>.<tag>.md (e.g. hub_cards)')
    p.add_argument('--baseline-run', help='constant-depth twin of --run, compared with it in the card')


def _publish_parser(sub: Any) -> None:
    p = sub.add_parser('publish', help='upload an exported folder to the Hub and print the commit to pin')
    p.add_argument('folder')
    p.add_argument('--repo-id', required=True, help='org/name on the Hub')
    p.add_argument('--private', action='store_true')
    p.add_argument('--revision', help='branch to commit to (created from main if needed)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--message', help='commit message')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded, upload nothing')
    p.add_argument('--cache-dir', help='write a Hugging Face cache folder here instead of uploading')


def _run_export(args: argparse.Namespace) -> None:
    if args.run:
        out = export_run(args.run, args.out, tag=args.tag, card_dir=args.card_dir, baseline_run=args.baseline_run,
                         overwrite=args.overwrite)
    else:
        from .cards import card_filename, render_card
        from .pretrained import find_weight
        weight = find_weight(args.model)
        if weight is None:
            raise SystemExit(f'{args.model} is not a published weight; {_available_weights(args.model.split(".")[0])}')
        check_export_target(args.out, args.overwrite)
        model = create_model(args.model, pretrained=True)
        card = render_card(weight)
        out = export_model(model, args.out, card, tag=weight.tag, overwrite=args.overwrite)
        if args.card_dir:
            write_text_atomic(Path(args.card_dir) / card_filename(weight), card)
    print(f'exported {out}: ' + ', '.join(sorted(p.name for p in Path(out).iterdir())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m sd_zoo.hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    _export_parser(sub)
    _publish_parser(sub)
    cards = sub.add_parser('cards', help='render hub_cards/ from sd_zoo/pretrained.py')
    cards.add_argument('--out', default=str(ROOT / 'hub_cards'))
    cards.add_argument('--check', action='store_true', help='fail if a committed card is stale')
    sub.add_parser('table', help='print the README table of published weights')
    args = parser.parse_args(argv)
    try:
        if args.command == 'export':
            _run_export(args)
        elif args.command == 'publish':
            api = LocalHubCache(args.cache_dir) if args.cache_dir else None
            publish(args.folder, args.repo_id, private=args.private, revision=args.revision,
                    create_pr=args.create_pr, commit_message=args.message, dry_run=args.dry_run, api=api)
        elif args.command == 'cards':
            stale = render_all_cards(args.out, check=args.check)
            print(('stale: ' if args.check else 'written: ') + (', '.join(stale) or 'none'))
            return 1 if (args.check and stale) else 0
        else:
            from .pretrained import readme_table
            print(readme_table(), end='')
    except (PretrainedWeightsError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def export_main() -> int:
    return main(['export', *sys.argv[1:]])


def publish_main() -> int:
    return main(['publish', *sys.argv[1:]])


if __name__ == '__main__':
    sys.exit(main())
