"""Model cards for the Hugging Face Hub and the table of published weights, rendered from :mod:`sd_zoo.pretrained`.

A card is YAML metadata (``library_name: timm``, license, tags, datasets, ``model-index`` with the measured
results) followed by timm-style sections: model details, usage, results against the paper, provenance and
citation. Every number comes from a :class:`~sd_zoo.pretrained.PublishedWeight`, a run's ``results.json`` (read
from a run folder the caller names, never from this package's surroundings) or the model itself (parameters and
MACs are counted, not typed). ``tools/cards.py`` rewrites this repository's ``hub_cards/`` and checks them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from huggingface_hub import EvalResult, ModelCardData
from torch.utils.flop_counter import FlopCounterMode

from .pretrained import PAPER_RESULTS, PublishedWeight, Result, RunResult, published_weights

__all__ = [
    'CARD_TAGS', 'BIBTEX', 'render_card', 'model_stats', 'run_figures', 'run_command', 'recipe_from_run',
    'run_result', 'comparison_table', 'card_filename', 'read_results', 'readme_table', 'started_from',
]

CARD_TAGS = ('image-classification', 'timm', 'stochastic-depth')

BIBTEX = {
    'huang2016': """@inproceedings{huang2016deep,
  title={Deep Networks with Stochastic Depth},
  author={Huang, Gao and Sun, Yu and Liu, Zhuang and Sedra, Daniel and Weinberger, Kilian Q.},
  booktitle={European Conference on Computer Vision (ECCV)},
  pages={646--661},
  year={2016}
}""",
    'rsb': """@inproceedings{wightman2021resnet,
  title={ResNet strikes back: An improved training procedure in timm},
  author={Wightman, Ross and Touvron, Hugo and Jegou, Herve},
  booktitle={NeurIPS 2021 Workshop on ImageNet: Past, Present, and Future},
  year={2021}
}""",
    'timm': """@misc{rw2019timm,
  author={Ross Wightman},
  title={PyTorch Image Models},
  year={2019},
  publisher={GitHub},
  journal={GitHub repository},
  doi={10.5281/zenodo.4414861},
  howpublished={\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
}

_METRIC_NAMES = {'top1': 'Top-1 accuracy', 'top5': 'Top-5 accuracy', 'error': 'Top-1 error'}


def card_filename(weight: PublishedWeight) -> str:
    return f'{weight.name}.md'


# ------------------------------------------------------------------------------------------------------------
# Numbers: counted from the model, or read from a run's results.json
# ------------------------------------------------------------------------------------------------------------
def model_stats(model_name: str, data_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Parameters (M), GMACs at the train input size, feature shapes and embedding size, counted on 'meta'."""
    import timm  # noqa: F401  (sd_zoo registers its models on import of the package)
    in_chans, height, width = data_cfg['input_size']
    with torch.device('meta'):
        model = timm.create_model(
            model_name, num_classes=data_cfg['num_classes'], in_chans=in_chans, drop_path_seed=0).eval()
        x = torch.empty(1, in_chans, height, width)
    with FlopCounterMode(display=False) as counter:
        model(x)
    features = [(f['num_chs'], height // f['reduction'], width // f['reduction']) for f in model.feature_info]
    if model_name.endswith('_cifar') or model_name.endswith('_svhn'):
        features = features[:4]  # stem + 3 stages (see _create_sd_resnet's feature_cfg)
    return {
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2e9,
        'features': features,
        'num_features': model.num_features,
        'pool_size': (height // model.feature_info[-1]['reduction'], width // model.feature_info[-1]['reduction']),
    }


def _pick(data: Dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


def _percent(value: float, key: str) -> float:
    # results.json may hold fractions (0.0731) or percentages (7.31); the field name decides when it can
    return float(value) * 100.0 if (not key.endswith(('_pct', '_percent')) and value <= 1.0) else float(value)


def run_figures(weight: PublishedWeight, results: Dict[str, Any]) -> List[Result]:
    """Test (and best validation) error of a run, read from its ``results.json``."""
    figures = []
    source = f'{weight.run_dir or "the run"}/results.json'
    img_size = weight.data_config()['input_size'][-1]
    for split, keys in (('test', ('test_error_pct', 'test_error_at_best_val', 'test_error')),
                        ('validation', ('best_val_error_pct', 'val_error_pct', 'best_val_error', 'val_error'))):
        key = next((k for k in keys if results.get(k) is not None), None)
        if key is not None:
            figures.append(Result('error', round(_percent(results[key], key), 2), weight.dataset, split, img_size,
                                  source))
    if not figures:
        raise ValueError(
            f'{source} has no test error: expected one of test_error_pct / test_error_at_best_val / test_error; '
            f'found keys {sorted(results)}')
    return figures


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------
def _metadata(weight: PublishedWeight, figures: Sequence[Result]) -> str:
    evals = [
        EvalResult(
            task_type='image-classification', task_name='Image Classification',
            dataset_type=weight.dataset_id, dataset_name=weight.dataset, dataset_split=r.split,
            metric_type='accuracy' if r.metric != 'error' else 'error', metric_value=r.value,
            metric_name=f'{_METRIC_NAMES[r.metric]} ({r.split}, {r.img_size} x {r.img_size})')
        for r in figures]
    data = ModelCardData(
        library_name='timm', license=weight.license, tags=list(CARD_TAGS), datasets=[weight.dataset_id],
        metrics=sorted({'accuracy' if r.metric != 'error' else 'error' for r in figures}) or None,
        model_name=weight.name if evals else None, eval_results=evals or None, pipeline_tag='image-classification')
    return data.to_yaml()


def _details(weight: PublishedWeight, stats: Dict[str, Any], command: str, recipe: Sequence[str]) -> str:
    cfg = weight.data_config()
    size = f'train = {cfg["input_size"][1]} x {cfg["input_size"][2]}'
    if cfg.get('test_input_size'):
        size += f', test = {cfg["test_input_size"][1]} x {cfg["test_input_size"][2]}'
    papers = '\n'.join(f'  - {title}: {url}' for title, url in weight.papers)
    recipe_lines = '\n'.join(f'  - {line}' for line in recipe)
    return f"""## Model Details
- **Model Type:** Image classification / feature backbone
- **Model Stats:**
  - Params (M): {stats['params_m']:.1f}
  - GMACs: {stats['gmacs']:.2f} (counted with `torch.utils.flop_counter` at the train size)
  - Image size: {size}
  - Input: {cfg['input_size'][0]} channel(s), mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}, \
interpolation {cfg.get('interpolation', 'bilinear')}, crop_pct {cfg.get('crop_pct', 1.0)}
- **Papers:**
{papers}
- **Dataset:** {weight.dataset}
- **Weights:** `{weight.hf_hub_id}` (`model.safetensors`), trained by {weight.trained_by}
- **Recipe:**
{recipe_lines}
- **Stochastic depth during training:** {weight.stochastic_depth}
- **Training command:**
```bash
{command}
```
"""


def _usage(weight: PublishedWeight, stats: Dict[str, Any]) -> str:
    c, h, w = weight.data_config()['input_size']
    shapes = '\n'.join(f'#  torch.Size([1, {ch}, {fh}, {fw}])' for ch, fh, fw in stats['features'])
    pool_h, pool_w = stats['pool_size']
    return f"""## Model Usage
`sd_zoo` registers its models with timm when it is imported; an installed `sd_zoo` also imports itself as
soon as timm is imported (set `SD_ZOO_NO_AUTOIMPORT=1` to turn that off).

### Image Classification
```python
import timm
import torch

model = timm.create_model('{weight.name}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)
# img = PIL.Image.open(...).convert('{'L' if c == 1 else 'RGB'}')
with torch.no_grad():
    output = model(transforms(img).unsqueeze(0))  # (1, {weight.data_config()['num_classes']}) logits
top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
model = timm.create_model('{weight.name}', pretrained=True, features_only=True).eval()
for feature_map in model(torch.randn(1, {c}, {h}, {w})):
    print(feature_map.shape)
{shapes}
```

### Image Embeddings
```python
model = timm.create_model('{weight.name}', pretrained=True, num_classes=0).eval()
embedding = model(torch.randn(1, {c}, {h}, {w}))  # (1, {stats['num_features']})
# or, unpooled: model.forward_features(x) -> (1, {stats['num_features']}, {pool_h}, {pool_w}), then
# model.forward_head(features, pre_logits=True) -> (1, {stats['num_features']})
```

The same weights load with `timm.create_model('hf-hub:{weight.hf_hub_id}', pretrained=True)`.
"""


def _results(weight: PublishedWeight, figures: Sequence[Result], comparison: Optional[str]) -> str:
    rows = '\n'.join(
        f'| {_METRIC_NAMES[r.metric]} | {r.value:g} | {r.dataset} {r.split} | {r.img_size} | {r.source} |'
        for r in figures)
    paper_rows = [(setting, cd, sd) for (ds, setting), (cd, sd) in PAPER_RESULTS.items() if ds == weight.dataset_id]
    paper = '\n'.join(f'| {setting} | {cd:g} | {sd:g} |' for setting, cd, sd in paper_rows)
    if paper:
        own = ', '.join(f'{100.0 - r.value:.2f}% at {r.img_size} x {r.img_size}' for r in figures if r.metric == 'top1')
        own = own or ', '.join(f'{r.value:g}% ({r.split})' for r in figures if r.metric == 'error')
        paper = ('The paper\'s results on this dataset (top-1 error, %; Huang et al. 2016):\n\n'
                 '| setting | constant depth | stochastic depth |\n|---|---|---|\n' + paper + '\n\n'
                 f'This weight\'s top-1 error: {own}. Recipes differ (see Model Details), so this is a reference '
                 'point, not a reproduction of the paper.\n')
    else:
        paper = f'The paper reports no result on {weight.dataset}.\n'
    text = f"""## Results
| metric | value (%) | split | image size | source |
|---|---|---|---|---|
{rows}

{paper}"""
    if comparison:
        text += '\n' + comparison
    for note in weight.notes:
        text += f'\n{note}\n'
    return text


def render_card(
        weight: PublishedWeight,
        run_results: Optional[Dict[str, Any]] = None,
        comparison: Optional[str] = None,
        stats: Optional[Dict[str, Any]] = None,
) -> str:
    """The README.md of ``weight``'s Hub repository (``run_results``: its run's results.json, if trained here;
    ``comparison``: the stochastic vs constant depth table, by default :func:`comparison_table` of the record)."""
    figures = list(weight.results) if run_results is None else run_figures(weight, run_results)
    stats = stats or model_stats(weight.model, weight.data_config())
    command = weight.train_command or (run_command(run_results) if run_results else 'not recorded')
    recipe = weight.recipe or recipe_from_run(run_results or {})
    comparison = comparison if comparison is not None else comparison_table(weight)
    citations = '\n\n'.join(BIBTEX[key] for key in ('huang2016', *weight.extra_citations, 'timm'))
    body = '\n'.join([
        f'# Model card for {weight.name}',
        '',
        f'A stochastic-depth ResNet (`{weight.model}`, sd_zoo) with weights trained on {weight.dataset} '
        f'by {weight.trained_by}.',
        '',
        _details(weight, stats, command, recipe),
        _usage(weight, stats),
        _results(weight, figures, comparison),
        '## Provenance',
        weight.provenance,
        '',
        '## Citation',
        '```bibtex',
        citations,
        '```',
        '',
    ])
    return f'---\n{_metadata(weight, figures)}\n---\n\n{body}'


_RECIPE_KEYS = ('preset', 'dataset', 'model', 'pretrained', 'epochs', 'batch_size', 'lr', 'momentum', 'nesterov',
                'weight_decay',
                'milestones', 'lr_gamma', 'warmup_epochs', 'augment', 'val_size', 'split_seed', 'seed',
                'drop_path_rate', 'drop_path_schedule', 'drop_path_mode', 'drop_path_scaling', 'mixed_precision')


def _settings(results: Dict[str, Any]) -> Dict[str, Any]:
    return _pick(results, 'settings', 'config', 'args') or {}


def recipe_from_run(results: Dict[str, Any]) -> List[str]:
    """The recipe lines of a card, from a run's recorded settings (and how its images were fed)."""
    settings = _settings(results)
    if not settings:
        return ['see the training command']
    lines = [f'{k}: {json.dumps(settings[k])}' for k in _RECIPE_KEYS if settings.get(k) not in (None, '')]
    lines += started_from(results)
    if isinstance(results.get('data'), dict):  # how the images were fed (size, channels, split), as recorded
        lines.append(f"data: {json.dumps(results['data'], sort_keys=True)}")
    return lines


def started_from(results: Dict[str, Any]) -> List[str]:
    """What a fine-tuning run started from (``run.pretrained`` in its results.json), as card lines."""
    start = (results.get('run') or {}).get('pretrained')
    if not isinstance(start, dict):
        return []
    where = f"Hub `{start['hub_id']}`" + (f" at commit `{start['revision']}`" if start.get('revision') else '') \
        if start.get('hub_id') else f"`{start.get('file') or start.get('spec')}`"
    digest = f", {Path(start['file']).name} sha256 `{start['sha256']}`" if start.get('sha256') else ''
    lines = [f"fine-tuned from: `{start.get('tag') or start.get('architecture')}` ({where}{digest})"]
    lines += list(start.get('changes', []))
    return lines


def run_command(results: Dict[str, Any]) -> str:
    """The run's command line as recorded, else rebuilt from its settings (every recipe value as a flag)."""
    recorded = _pick(results, 'command', 'argv')
    if recorded:
        return recorded if isinstance(recorded, str) else ' '.join(recorded)
    settings = _settings(results)
    if not settings:
        return 'not recorded'
    script = 'training/imagenet.py' if settings.get('dataset') == 'imagenet' else 'training/cifar.py'
    flags = []
    for key in (*_RECIPE_KEYS, 'output_dir'):
        value = settings.get(key)
        if value is None or value == '' or key == 'drop_path_scaling':
            continue
        flag = '--' + key.replace('_', '-')
        if isinstance(value, bool):
            flags.append(flag if value else f'--no-{key.replace("_", "-")}')
        elif isinstance(value, (list, tuple)):
            flags.append(f'{flag} ' + ' '.join(str(v) for v in value))
        else:
            flags.append(f'{flag} {value}')
    return f'python {script} ' + ' '.join(flags) + '  # rebuilt from results.json settings'


def run_result(run_dir: str, results: Dict[str, Any]) -> RunResult:
    """What a card's comparison shows of a run (``run_dir``: the folder as the card names it), from its results."""
    key = 'test_error_at_best_val' if results.get('test_error_at_best_val') is not None else 'test_error'
    err = round(_percent(results[key], key), 4) if results.get(key) is not None else float('nan')
    rate = _settings(results).get('drop_path_rate', (results.get('run') or {}).get('drop_path_rate'))
    return RunResult(run_dir=run_dir, drop_path_rate=rate, test_error=err, best_epoch=results.get('best_epoch'),
                     wall_time_s=float(results.get('wall_time_s') or 0.0))


def _run_row(label: str, run: RunResult) -> str:
    return (f'| {label} (`{run.run_dir}`) | {run.drop_path_rate} | {run.test_error:.2f} | {run.best_epoch} | '
            f'{run.wall_time_s / 60:.1f} |')


def comparison_table(weight: PublishedWeight) -> Optional[str]:
    """Stochastic vs constant depth: the weight's run and its baseline run, as the record carries them."""
    if len(weight.comparison) != 2:
        return None
    ours, base = weight.comparison
    ratio = ours.wall_time_s / max(base.wall_time_s, 1e-9)
    return '\n'.join([
        'Stochastic depth against constant depth, same model, recipe, seed and split:',
        '',
        '| run | drop_path_rate | test error at best-validation epoch (%) | best epoch | wall time (min) |',
        '|---|---|---|---|---|',
        _run_row('stochastic depth', ours),
        _run_row('constant depth', base),
        '',
        f'Wall-time ratio stochastic / constant: {ratio:.3f}.',
        '',
    ])


def read_results(run_dir: Path) -> Dict[str, Any]:
    """A run's ``results.json``, with a clear error when it is missing or not JSON."""
    path = Path(run_dir) / 'results.json'
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: a finished training run writes results.json into its run dir')
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); re-run the evaluation or fix the file') from e



# ------------------------------------------------------------------------------------------------------------
# The table of published weights (the README's)
# ------------------------------------------------------------------------------------------------------------
def _headline(weight: PublishedWeight) -> str:
    shown = [f'{r.metric} {r.value:g}% @ {r.img_size} ({r.split})'
             for r in weight.results if r.metric in ('top1', 'error')]
    return ', '.join(shown) or 'n/a'


def readme_table() -> str:
    """Markdown table of every published weight, from the records."""
    rows = ['| model | weights (Hub) | trained by | dataset | result |', '|---|---|---|---|---|']
    for w in published_weights():
        rows.append(
            f'| `{w.name}` | [{w.repo_id}](https://huggingface.co/{w.repo_id}) | {w.trained_by} | {w.dataset} '
            f'| {_headline(w)} |')
    return '\n'.join(rows)
