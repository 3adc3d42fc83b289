"""Cards and publishing: export a training run with its model card, render the cards of every published weight,
and upload an exported folder to the Hugging Face Hub (or write it into a local Hub cache).

    sd-zoo-export --run results/fashion_mnist/<run> --tag fashion_mnist --out exports/<name> --card-dir hub_cards
    sd-zoo-publish exports/<name> --repo-id sd-zoo/<name> [--private] [--revision B] [--create-pr] [--dry-run]

A run folder is read only where the caller names it (``--run``, ``--baseline-run``); a run's numbers reach
the cards of published weights through their records in :mod:`sd_zoo.pretrained`. :func:`publish` creates the
repository if needed, uploads the folder and prints the commit to pin in ``sd_zoo/pretrained.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

from ._version import __version__
from .cards import (
    card_filename,
    read_results,
    recipe_from_run,
    render_card,
    run_command,
    run_figures,
    run_result,
)
from .hub import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    _schedule_args,
    check_export_target,
    export_model,
    load_weights,
    write_text_atomic,
)
from .pretrained import PublishedWeight, Result, RunResult, find_weight, published_weights

__all__ = [
    'export_run', 'weight_from_run', 'entry_source', 'render_all_cards', 'publish', 'LocalHubCache', 'LocalCommit',
]

PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt', '.tar')


# ------------------------------------------------------------------------------------------------------------
# Export of a training run, and the cards of the published weights
# ------------------------------------------------------------------------------------------------------------
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


def weight_from_run(
        run_dir: Path,
        model: nn.Module,
        tag: str,
        results: Dict[str, Any],
        baseline_run_dir: Optional[Path] = None,
        baseline_results: Optional[Dict[str, Any]] = None,
) -> PublishedWeight:
    """A :class:`PublishedWeight` describing a project run (what to paste into ``sd_zoo/pretrained.py``).

    The figures, recipe and training command come from the run's ``results``; with a constant-depth twin
    (``baseline_run_dir`` and its ``baseline_results``) the record also carries the comparison of the two runs.
    """
    cfg = model.pretrained_cfg
    keys = ('num_classes', 'input_size', 'test_input_size', 'pool_size', 'crop_pct', 'test_crop_pct',
            'interpolation', 'mean', 'std')
    data_cfg = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in keys if cfg.get(k) is not None}
    dataset = _run_dataset(results) or tag
    arch = cfg['architecture']
    args = _schedule_args(model)
    gates = {'block': 'one gate per block per mini-batch, dropped branches skipped, as in the paper',
             'sample': 'per-sample masks', 'off': 'off: constant depth'}[args['drop_path_mode']]
    weight = PublishedWeight(
        model=arch, tag=tag, hub_repo=f'{arch}.{tag}', trained_by='sd_zoo',
        dataset=_DATASET_NAMES.get(dataset, dataset), dataset_id=dataset, data_cfg=data_cfg,
        recipe=tuple(recipe_from_run(results)), train_command=run_command(results),
        stochastic_depth=(f"sd_zoo's {args['drop_path_mode']} mode ({gates}), {args['drop_path_schedule']} "
                          f"schedule, p_L = {1 - args['drop_path_rate']:g}"),
        provenance=(f'Trained by sd_zoo with its own training script; run folder `{run_dir}` (results.json, '
                    f'metrics, best weights). Exported with `sd-zoo-export --run {run_dir} --tag {tag}`.'),
        run_dir=str(run_dir))
    weight = dataclasses.replace(weight, results=tuple(run_figures(weight, results)))
    if baseline_run_dir is not None and baseline_results is not None:
        weight = dataclasses.replace(
            weight, baseline_run_dir=str(baseline_run_dir),
            comparison=(run_result(str(run_dir), results), run_result(str(baseline_run_dir), baseline_results)))
    return weight


_DATASET_NAMES = {'fashion_mnist': 'Fashion-MNIST', 'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN',
                  'imagenet': 'ImageNet-1k', 'imagenet-1k': 'ImageNet-1k'}


def _relative(path: Path) -> str:
    """``path`` as the card and config name it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
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
        baseline = None if baseline_run is None else Path(baseline_run)
        weight = weight_from_run(
            Path(_relative(run_dir)), model, tag, results, baseline_run_dir=baseline and Path(_relative(baseline)),
            baseline_results=baseline and read_results(baseline))
        if suggest_entry:
            print(f'{name} is not in sd_zoo/pretrained.py yet; add this entry to PUBLISHED, then run '
                  f'`python tools/cards.py` in the repository:\n\n{entry_source(weight)}\n')
    card = render_card(weight, results)
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


def entry_source(weight: PublishedWeight) -> str:
    """Python source of ``weight`` as an entry of ``PUBLISHED``."""
    fields = ('model', 'tag', 'hub_repo', 'trained_by', 'dataset', 'dataset_id', 'data_cfg', 'recipe', 'train_command',
              'stochastic_depth', 'provenance', 'results', 'run_dir', 'baseline_run_dir', 'comparison')
    lines = []
    for field in fields:
        value = getattr(weight, field, None)
        if value is None or (value == () and field in ('results', 'comparison')):
            continue
        if isinstance(value, tuple) and value and isinstance(value[0], (Result, RunResult)):
            lines.append(f'    {field}=(\n' + ''.join(f'        {item!r},\n' for item in value) + '    ),')
        else:
            lines.append(f'    {field}={value!r},')
    return 'PublishedWeight(\n' + '\n'.join(lines) + '\n),'


def render_all_cards(card_dir: Union[str, Path], check: bool = False) -> List[str]:
    """(Re)write one card per published weight into ``card_dir``; with ``check``, only list stale cards."""
    stale = []
    for weight in published_weights():
        text = render_card(weight)
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
        commit_message=commit_message or f'Upload {folder.name} with sd_zoo {__version__}',
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
