"""The training loop shared by ``training/cifar.py`` and ``training/imagenet.py``.

One call, :func:`train`, runs a :class:`~training.recipes.TrainConfig` end to end with Accelerate: data,
model, SGD with the paper's schedule, per-epoch validation and test, metrics (CSV / JSON / TensorBoard),
plots, atomic checkpoints with exact mid-epoch resume, and the best-validation weights exported for timm.

Distributed notes: every rank seeds torch and the model's gate generator with the same seed, so all ranks
drop the same blocks in every step with no communication; DDP is told about unused parameters only when
block mode can skip branches. The learning-rate schedule is per epoch and stepped here, not by ``prepare``.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sd_zoo  # noqa: F401  (registers the sd_ models)
from sd_zoo.hub import IntegrityError, export_model, verify_file, write_text_atomic

from .data import DataError, DatasetBundle, build_datasets, check_labels
from .recipes import TrainConfig, resolve_compile_blocks, validate_config
from .run_folder import (
    MAY_CHANGE_ON_RESUME,
    RunFolderError,
    RunLock,
    check_new_run,
    checkpoint_files,
    complete_checkpoints,
    describe_refused,
    disk_full,
    fault_point,
    settings_changes,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from sd_zoo.sources import StartingPoint

__all__ = ['train', 'run_cli', 'TrainingError', 'ConfigError', 'NonFiniteLossError', 'TrainState', 'lr_factor',
           'export_best_weights', 'resolve_checkpoint', 'EXIT_INTERRUPTED']

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGINT/SIGTERM after saving a checkpoint; rerun with --resume latest


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


class ConfigError(TrainingError):
    pass


class NonFiniteLossError(TrainingError):
    pass


@dataclasses.dataclass
class TrainState:
    """Progress saved with every checkpoint (registered with Accelerate, so it resumes with the rest)."""
    epoch: int = 0            # epoch in progress (or the next one when batches_done == 0)
    batches_done: int = 0     # data-loader batches of this epoch already trained on (per rank)
    global_step: int = 0      # optimizer steps
    best_val_error: float = math.inf
    best_epoch: int = -1
    train_time: float = 0.0   # seconds spent training and evaluating, summed over resumed sessions
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    epoch_acc: Dict[str, float] = dataclasses.field(default_factory=dict)  # running sums of the epoch
    resumes: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # settings changed at each resume

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate / ``cfg.lr`` in ``epoch`` (0-based): warm-up, then /10 at each milestone."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / cfg.lr
    return cfg.lr_gamma ** sum(epoch >= m for m in cfg.milestones)


# --------------------------------------------------------------------------------------------- setup

def _create_model(cfg: TrainConfig, bundle: DatasetBundle) -> Tuple[nn.Module, Optional['StartingPoint']]:
    """The run's network, from scratch or (``--pretrained``) from pretrained weights, and where those came from."""
    if cfg.pretrained:
        return _create_pretrained_model(cfg, bundle)
    extra = {} if cfg.zero_init_last is None else dict(zero_init_last=cfg.zero_init_last)
    try:
        return timm.create_model(
            cfg.model, num_classes=cfg.num_classes or bundle.num_classes, in_chans=cfg.in_chans or bundle.in_chans,
            drop_path_rate=cfg.drop_path_rate, drop_path_schedule=cfg.drop_path_schedule,
            drop_path_mode=cfg.drop_path_mode, drop_path_scaling=cfg.drop_path_scaling,
            drop_path_grad='zero' if cfg.decay_dropped else 'none', **extra), None
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigError(f'--model={cfg.model!r} is not a registered model: use an sd_ model, e.g. '
                              f'{", ".join(m for m in timm.list_models("sd_*")[:4])}') from e
        raise
    except ValueError as e:  # the model's own checks name the argument (drop_path_schedule=..., ...)
        raise ConfigError(f'--{str(e).split("=")[0].replace("_", "-")}: {e}') from e


def _create_pretrained_model(cfg: TrainConfig, bundle: DatasetBundle) -> Tuple[nn.Module, 'StartingPoint']:
    """``cfg.model`` (default: the weights' architecture, written back into ``cfg``) initialised from
    ``cfg.pretrained``, with the dataset's classes and channels; the stochastic-depth settings are the run's own."""
    from sd_zoo.hub import PretrainedWeightsError
    from sd_zoo.sources import create_from_pretrained
    extra = {} if cfg.zero_init_last is None else dict(zero_init_last=cfg.zero_init_last)
    try:
        model, start = create_from_pretrained(
            cfg.pretrained, cfg.model or None, num_classes=cfg.num_classes or bundle.num_classes,
            in_chans=cfg.in_chans or bundle.in_chans, drop_path_rate=cfg.drop_path_rate,
            drop_path_schedule=cfg.drop_path_schedule, drop_path_mode=cfg.drop_path_mode,
            drop_path_scaling=cfg.drop_path_scaling, drop_path_grad='zero' if cfg.decay_dropped else 'none', **extra)
    except PretrainedWeightsError as e:
        raise ConfigError(f'--pretrained={cfg.pretrained!r}: {e}') from e
    except ValueError as e:
        raise ConfigError(f'--{str(e).split("=")[0].replace("_", "-")}: {e}') from e
    if not hasattr(model, 'stochastic_depth'):
        raise ConfigError(f'--pretrained={cfg.pretrained!r} holds {start.architecture} weights, not an sd_ model')
    cfg.model = cfg.model or start.architecture
    return model, start


def _report_start(acc, start: Optional['StartingPoint']) -> None:
    if start is not None:
        acc.print(f'starting from {start.describe()}')
        for change in start.changes or ['same classes and input channels: every weight loaded as it is']:
            acc.print(f'  {change}')


def _check_data_fits_model(cfg: TrainConfig, bundle: DatasetBundle) -> None:
    """--in-chans and --num-classes against the data, and the data's labels, before the model is built."""
    check_labels(bundle, cfg.dataset)
    if cfg.in_chans is not None and cfg.in_chans != bundle.in_chans:
        raise ConfigError(f'--in-chans={cfg.in_chans} does not match the data: {cfg.dataset} images have '
                          f'{bundle.in_chans} channel(s); omit --in-chans')
    if cfg.num_classes is not None and cfg.num_classes < bundle.num_classes:
        raise ConfigError(f'--num-classes={cfg.num_classes} is smaller than the {bundle.num_classes} classes of '
                          f'{cfg.dataset} (labels 0..{bundle.num_classes - 1}); omit --num-classes or pass '
                          f'--num-classes {bundle.num_classes}')


def _make_accelerator(cfg: TrainConfig, model: nn.Module):
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    sd = model.stochastic_depth
    handlers = []
    if sd.is_active and sd.mode == 'block' and sd.dropped_grad == 'none':
        # --no-decay-dropped: dropped branches leave parameters without gradient, DDP must look for them each
        # step (by default they get a zero gradient, so every parameter takes part and plain DDP suffices)
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process: a scheduler's signal to the process group
    must not kill a worker (and with it the main process) before the main process has saved its checkpoint.
    Workers start with both blocked (see :func:`_batches`); ignored, a pending one is discarded."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _batches(loader):
    """Iterate ``loader`` with SIGINT/SIGTERM blocked while it fetches, so that workers it starts inherit the
    block until they ignore both; the main process gets a signal that arrived meanwhile right after.

    Use it as ``with contextlib.closing(_batches(loader)) as batches``: the workers ignore SIGTERM, so the
    ``terminate()`` with which Python's exit stops leftover worker processes cannot end them, and exit would
    wait for them forever. They must be shut down when the iteration ends, whichever way it ends: closing
    this generator closes the loader's iterator; an error raised by the loader (a worker's exception, say)
    has the loader's frames, which hold its iterator, cleared from its traceback (the lines stay)."""
    it = iter(loader)
    try:
        while True:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                batch = next(it)
            except StopIteration:
                return
            except BaseException as e:
                traceback.clear_frames(e.__traceback__)
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            yield batch
    finally:
        if hasattr(it, 'close'):  # accelerate's loaders iterate with a generator; torch's iterator has none
            it.close()
        del it  # the last reference: torch's iterator shuts its workers down when it is collected


def _collect_leftover_loaders() -> None:
    """At exit, before multiprocessing joins its children: collect iterators that only a reference cycle
    keeps alive, so that they shut their (SIGTERM-ignoring) workers down instead of blocking the exit."""
    import gc
    gc.collect()


atexit.register(_collect_leftover_loaders)  # atexit runs last-registered first: before multiprocessing's


def _make_loaders(cfg: TrainConfig, bundle: DatasetBundle, per_device: int, pin: bool):
    common = dict(num_workers=cfg.workers, pin_memory=pin, persistent_workers=False,
                  worker_init_fn=_ignore_stop_signals if cfg.workers else None)
    train = DataLoader(bundle.train, batch_size=per_device, shuffle=True, drop_last=False, **common)
    evals = [DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, **common)
             for ds in (bundle.val, bundle.test) if ds is not None]
    return train, evals


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # the paper decays every parameter, BatchNorm included (fb.resnet.torch)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           dampening=0.0, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(resume: str, output_dir: Path) -> Optional[Path]:
    """Folder to resume from: an explicit path, or 'latest' in ``output_dir/checkpoints`` (None if none yet)."""
    if resume != 'latest':
        path = Path(resume)
        if not (path / 'trainer_state.json').is_file():
            raise TrainingError(f'--resume={resume!r}: not a checkpoint folder (no trainer_state.json); use a '
                                f'folder under <output-dir>/checkpoints/ or "latest"')
        return path
    done = complete_checkpoints(output_dir / 'checkpoints')
    return done[0] if done else None


class Checkpointer:
    """Atomic checkpoints ``checkpoints/step_<N>``: written to a temporary folder, then renamed; the newest
    ``keep_last`` and the best-validation one are kept; the file ``latest`` names the newest."""

    def __init__(self, accelerator, root: Path, keep_last: int):
        self.accelerator, self.root, self.keep_last = accelerator, root, keep_last
        self.last_path: Optional[Path] = None

    def save(self, state: TrainState, cfg: TrainConfig, is_best: bool = False) -> Path:
        acc = self.accelerator
        name = f'step_{state.global_step:08d}'
        final, tmp = self.root / name, self.root / f'.tmp-{name}'
        try:
            self._write(state, cfg, name, final, tmp, is_best)
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
            if not disk_full(e, tmp):
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f'no space left on device while writing checkpoint {tmp} ({type(e).__name__}: {e}); '
                                f'free some space, then continue with --resume latest (last complete checkpoint: '
                                f'{self.last_path or "none"})') from e
        self.last_path = final
        return final

    def _write(self, state: TrainState, cfg: TrainConfig, name: str, final: Path, tmp: Path, is_best: bool) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            fault_point('checkpoint:state_saved')
            info = dict(epoch=state.epoch, batches_done=state.batches_done, global_step=state.global_step,
                        best_epoch=state.best_epoch, config=dataclasses.asdict(cfg), files=checkpoint_files(tmp))
            (tmp / 'trainer_state.json').write_text(json.dumps(info, indent=1))  # written last: marks complete
            fault_point('checkpoint:complete')
            if final.exists():  # the same step saved again (e.g. interrupted right after an epoch-end save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fault_point('checkpoint:renamed')
            write_text_atomic(self.root / 'latest', name)
            fault_point('checkpoint:latest')
            if is_best:
                write_text_atomic(self.root / 'best', name)
            self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        keep = {(self.root / p).read_text().strip() for p in ('latest', 'best') if (self.root / p).is_file()}
        for stale in self.root.glob('.tmp-step_*'):  # left by a killed run; only one save runs at a time
            shutil.rmtree(stale, ignore_errors=True)
        steps = sorted(p.name for p in self.root.glob('step_*'))
        for name in steps[:-self.keep_last]:
            if name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)


# --------------------------------------------------------------------------------------------- export

def export_best_weights(model: nn.Module, dest: Path, cfg: TrainConfig, bundle: DatasetBundle,
                        metadata: Dict[str, Any]) -> Path:
    """Write the run's best weights into ``dest`` with sd_zoo's Hub exporter (safetensors + timm config.json,
    folded to train scaling, swapped in atomically), so ``timm.create_model`` loads them as they were trained."""
    in_chans = cfg.in_chans or bundle.in_chans
    data_config = dict(input_size=(in_chans, bundle.img_size, bundle.img_size), mean=tuple(bundle.mean),
                       std=tuple(bundle.std), crop_pct=1.0 if bundle.img_size < 64 else 0.875)
    card = (f'# Best-validation weights of `{cfg.output_dir}`\n\nEpoch {metadata["epoch"]}; a full model card: '
            f'`sd-zoo-export --run {cfg.output_dir} --tag <tag> --out <folder>`.\n')
    return export_model(model, dest, card, metadata=dict(training=metadata), data_config=data_config, overwrite=True)


def _best_metadata(cfg: TrainConfig, row: Dict[str, Any], pretrained: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return dict(dataset=cfg.dataset, epoch=row['epoch'], val_error=row['val_error'], test_error=row['test_error'],
                drop_path_rate=cfg.drop_path_rate, preset=cfg.preset, seed=cfg.seed, pretrained=pretrained)


def _exported_epoch(folder: Path) -> Optional[int]:
    """The epoch whose weights ``folder`` (a run's best_model/) holds; None if missing, unreadable or corrupt."""
    try:
        config = json.loads((folder / 'config.json').read_text())
        verify_file(folder / 'model.safetensors')
        return config['sd_zoo']['training']['epoch']
    except (OSError, ValueError, KeyError, TypeError, IntegrityError):
        return None


def _epoch_end_checkpoint(root: Path, epoch: int) -> Optional[Path]:
    """The intact checkpoint saved at the end of ``epoch`` (1-based), if it is still kept."""
    for path in complete_checkpoints(root):
        info = json.loads((path / 'trainer_state.json').read_text())
        if info['epoch'] == epoch and info['batches_done'] == 0 and verify_checkpoint(path) is None:
            return path
    return None


# --------------------------------------------------------------------------------------------- logging

class RunLogger:
    """Per-epoch metrics (CSV, JSON, TensorBoard), plots and ``results.json``; writes on the main process only."""

    def __init__(self, accelerator, cfg: TrainConfig, bundle: DatasetBundle, sd, resumed_from: Optional[Path],
                 started_from: Optional[Dict[str, Any]] = None):
        self.acc, self.cfg, self.bundle, self.sd = accelerator, cfg, bundle, sd
        self.out = Path(cfg.output_dir)
        self.resumed_from = resumed_from
        self.started_from = started_from  # --pretrained: what the weights were (sd_zoo.sources.StartingPoint)
        self.writer = None
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)

    def run_info(self) -> Dict[str, Any]:
        return dict(model=self.cfg.model, dataset=self.cfg.dataset, preset=self.cfg.preset,
                    drop_path_rate=self.cfg.drop_path_rate, drop_path_mode=self.cfg.drop_path_mode,
                    drop_path_schedule=self.cfg.drop_path_schedule, seed=self.cfg.seed,
                    num_blocks=self.sd.num_blocks, expected_depth=self.sd.expected_depth,
                    pretrained=self.started_from)

    def log_epoch(self, state: TrainState, every_row: bool = False) -> None:
        """metrics.csv/.json and the plots from the whole history; TensorBoard gets the last row (``every_row``:
        all rows again, replacing what a killed session left)."""
        if not self.acc.is_main_process:
            return
        rows = state.history
        fields = list(rows[-1].keys())
        table = io.StringIO(newline='')
        writer = csv.DictWriter(table, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.out / 'metrics.csv', table.getvalue())
        metrics = dict(run=self.run_info(), epochs=rows)
        write_text_atomic(self.out / 'metrics.json', json.dumps(metrics, indent=1))
        for row in (rows if every_row else rows[-1:]):
            self._tensorboard(row)
        self._plots(metrics)

    def _tensorboard(self, row: Dict[str, Any]) -> None:
        if self.cfg.log_with != 'tensorboard':
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed session logged past the checkpoint we resumed from
            self.writer = SummaryWriter(str(self.out / 'tensorboard'), purge_step=row['epoch'])
        for key, value in row.items():
            if key != 'epoch' and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, row['epoch'])
        self.writer.flush()

    def _plots(self, metrics: Dict[str, Any]) -> None:
        from .plots import load_metrics, plot_first_conv_grad, plot_test_error
        runs = [metrics]
        if self.cfg.compare_with:
            try:
                runs.append(load_metrics(self.cfg.compare_with))
            except (OSError, ValueError) as e:
                self.acc.print(f'warning: --compare-with={self.cfg.compare_with!r} unreadable ({e}); plotting one run')
        plot_test_error(runs, self.out / 'test_error.png')
        plot_first_conv_grad(runs, self.out / 'first_conv_grad.png')

    def write_results(self, state: TrainState, status: str, checkpoint: Optional[Path]) -> Dict[str, Any]:
        best = next((r for r in state.history if r['epoch'] == state.best_epoch), None)
        last = state.history[-1] if state.history else {}
        times = [r['epoch_time'] for r in state.history]
        results = dict(
            status=status, run=self.run_info(),
            best_epoch=state.best_epoch if best else None,
            best_val_error=best['val_error'] if best else None,
            test_error_at_best_val=best.get('test_error') if best else None,
            final_test_error=last.get('test_error'), epochs_completed=len(state.history),
            global_step=state.global_step, wall_time_s=state.train_time, train_time_s=sum(times),
            mean_images_per_s=sum(r['images_per_s'] for r in state.history) / max(len(times), 1),
            mean_active_depth=(sum(r['mean_active_depth'] for r in state.history) / len(times)) if times else None,
            num_processes=self.acc.num_processes, device=str(self.acc.device),
            data=self.bundle.info, resumed_from=str(self.resumed_from) if self.resumed_from else None,
            last_checkpoint=str(checkpoint) if checkpoint else None,
            best_weights=str(self.out / 'best_model') if best else None,
            may_change_on_resume=list(MAY_CHANGE_ON_RESUME), resumes=state.resumes,
            versions=dict(torch=torch.__version__, timm=timm.__version__, sd_zoo=sd_zoo.__version__),
            settings=dataclasses.asdict(self.cfg))
        if self.acc.is_main_process:
            write_text_atomic(self.out / 'results.json', json.dumps(results, indent=1))
        return results

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------- the loop

class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the next optimizer step."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> '_StopOnSignal':
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def _evaluate(ctx, loader) -> float:
    """Top-1 error of the full network (all blocks, eval scaling) over ``loader``, gathered over ranks."""
    ctx.model.eval()
    wrong, total = 0, 0
    with contextlib.closing(_batches(loader)) as batches:
        for x, y in batches:
            if ctx.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = ctx.model(x).argmax(dim=1)
            pred, y = ctx.acc.gather_for_metrics((pred, y))
            wrong += int((pred != y).sum())
            total += y.numel()
    ctx.model.train()
    return wrong / max(total, 1)


def _step_stats(ctx, loss: torch.Tensor, stop: _StopOnSignal,
                grad: Optional[torch.Tensor]) -> Tuple[float, float]:
    """Global mean loss of this micro-batch and, given the first convolution's gradient (on an optimizer
    step), its mean absolute value: one all-reduce and one device-to-host copy per step. A stop request on any
    rank reaches all ranks with it."""
    grad_stat = grad.detach().abs().mean().float() if grad is not None else torch.zeros((), device=loss.device)
    flag = torch.tensor(float(bool(stop.requested)), device=loss.device)
    loss_sum, grad_sum, flags = ctx.acc.reduce(torch.stack([loss.detach().float(), grad_stat, flag]),
                                               reduction='sum').tolist()
    if flags > 0:
        ctx.stop_reason = stop.requested or 'signal on another rank'
    return loss_sum / ctx.acc.num_processes, grad_sum / ctx.acc.num_processes


def _train_epoch(ctx, state: TrainState, epoch: int, stop: _StopOnSignal) -> Optional[str]:
    """Train until the epoch ends (None) or a reason to stop mid-epoch ('max_steps', a signal name)."""
    from tqdm.auto import tqdm
    cfg, acc, model, sd, sums = ctx.cfg, ctx.acc, ctx.model, ctx.sd, state.epoch_acc
    ctx.train_loader.set_epoch(epoch)
    ctx.bundle.train.set_epoch(epoch)
    loader = acc.skip_first_batches(ctx.train_loader, state.batches_done) if state.batches_done else ctx.train_loader
    bar = tqdm(total=len(ctx.train_loader), initial=state.batches_done, desc=f'epoch {epoch + 1}/{cfg.epochs}',
               disable=not (cfg.progress and acc.is_local_main_process), leave=False)
    model.train()
    start = time.perf_counter()
    with contextlib.closing(_batches(loader)) as batches:
        for x, y in batches:
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with acc.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                active = sum(sd.last_active) if sd.is_active and sd.last_active is not None else sd.num_blocks
                acc.backward(loss)
                grad = acc.unwrap_model(model).conv1.weight.grad if acc.sync_gradients else None
                loss_value, grad_mean = _step_stats(ctx, loss, stop, grad)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f'training loss became {loss_value} at epoch {epoch + 1}, optimizer step {state.global_step + 1}; '
                        f'stopped without saving. Last good checkpoint: {ctx.checkpointer.last_path or "none"}. '
                        f'Resume from it with a lower --lr, or without --mixed-precision fp16.')
                if acc.sync_gradients:
                    scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
                    _add(sums, first_conv_grad=grad_mean / scale, grad_steps=1)
                ctx.optimizer.step()
                ctx.optimizer.zero_grad(set_to_none=True)
            state.batches_done += 1
            _add(sums, loss=loss_value * len(y), seen=len(y), depth=active, forwards=1,
                 images=len(y) * acc.num_processes)
            bar.update(1)
            if acc.sync_gradients:
                state.global_step += 1
                bar.set_postfix(loss=f'{loss_value:.3f}', lr=f'{ctx.optimizer.param_groups[0]["lr"]:.3g}')
                reason = ctx.stop_reason or ('max_steps' if cfg.max_steps and state.global_step >= cfg.max_steps else None)
                at_end = state.batches_done >= len(ctx.train_loader)
                if reason and not at_end:
                    _add(sums, time=time.perf_counter() - start)
                    bar.close()
                    return reason
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and not at_end:
                    _add(sums, time=time.perf_counter() - start)
                    ctx.checkpointer.save(state, cfg)
                    start = time.perf_counter()
    _add(sums, time=time.perf_counter() - start)
    bar.close()
    return None


def _add(sums: Dict[str, float], **values: float) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value


def _finish_epoch(ctx, state: TrainState, epoch: int) -> bool:
    """Evaluate, record the epoch, step the schedule, checkpoint; True if this epoch is the best so far."""
    start = time.perf_counter()
    errors = [_evaluate(ctx, loader) for loader in ctx.eval_loaders]
    val_error, test_error = errors[0], (errors[1] if len(errors) > 1 else None)
    s = state.epoch_acc
    row = dict(epoch=epoch + 1, global_step=state.global_step, lr=ctx.optimizer.param_groups[0]['lr'],
               train_loss=s['loss'] / max(s['seen'], 1), val_error=val_error, test_error=test_error,
               epoch_time=s['time'], eval_time=time.perf_counter() - start,
               images_per_s=s['images'] / max(s['time'], 1e-9), mean_active_depth=s['depth'] / max(s['forwards'], 1),
               first_conv_grad=s.get('first_conv_grad', 0.0) / max(s.get('grad_steps', 1), 1))
    state.train_time += row['epoch_time'] + row['eval_time']
    row['wall_time'] = state.train_time
    state.history.append(row)
    is_best = val_error < state.best_val_error
    if is_best:
        state.best_val_error, state.best_epoch = val_error, epoch + 1
    ctx.scheduler.step()
    state.epoch, state.batches_done, state.epoch_acc = epoch + 1, 0, {}
    # the checkpoint is the commit point: everything written after it is derived from it, and a resume after a
    # kill at any later point rewrites it (_repair_outputs)
    ctx.checkpointer.save(state, ctx.cfg, is_best=is_best)
    fault_point('epoch:checkpointed')
    if is_best and ctx.acc.is_main_process:
        export_best_weights(ctx.acc.unwrap_model(ctx.model), Path(ctx.cfg.output_dir) / 'best_model',
                            ctx.cfg, ctx.bundle, _best_metadata(ctx.cfg, row, ctx.started_from))
    fault_point('epoch:best_exported')
    ctx.logger.log_epoch(state)
    fault_point('epoch:metrics_written')
    ctx.logger.write_results(state, 'running', ctx.checkpointer.last_path)
    fault_point('epoch:results_written')
    test_text = f', test error {100 * test_error:.2f}%' if test_error is not None else ''
    ctx.acc.print(f'epoch {epoch + 1}/{ctx.cfg.epochs}: loss {row["train_loss"]:.4f}, val error '
                  f'{100 * val_error:.2f}%{test_text}, {row["images_per_s"]:.0f} img/s, '
                  f'depth {row["mean_active_depth"]:.2f}/{ctx.sd.num_blocks}{" (best)" if is_best else ""}')
    return is_best


def _setup(cfg: TrainConfig):
    """Data, model, Accelerator, optimizer, schedule and loaders, prepared; returns a context namespace."""
    from types import SimpleNamespace

    from accelerate.utils import set_seed
    bundle = build_datasets(cfg)
    _check_data_fits_model(cfg, bundle)
    set_seed(cfg.seed)  # not device_specific: every rank builds the same model and gate generator
    model, started_from = _create_model(cfg, bundle)
    sd = model.stochastic_depth
    sd.manual_seed(cfg.seed)
    try:
        acc = _make_accelerator(cfg, model)
    except ValueError as e:
        raise ConfigError(f'--mixed-precision={cfg.mixed_precision!r}: {e}') from e
    _report_start(acc, started_from)
    shards = acc.num_processes * cfg.grad_accum
    if cfg.batch_size % shards:
        raise ConfigError(f'--batch-size={cfg.batch_size} must be divisible by processes x --grad-accum '
                          f'({acc.num_processes} x {cfg.grad_accum})')
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the state dict keeps its keys (no '_orig_mod.'), checkpoints load either way
        sd.compile_blocks = resolve_compile_blocks(cfg.compile_blocks, acc.device.type)
        model.compile()
        acc.print(f'torch.compile: on; gated blocks run {sd.compile_blocks} (--compile-blocks {cfg.compile_blocks})')
    optimizer = _make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))
    train_loader, eval_loaders = _make_loaders(cfg, bundle, cfg.batch_size // shards, acc.device.type == 'cuda')
    model, optimizer, train_loader, *eval_loaders = acc.prepare(model, optimizer, train_loader, *eval_loaders)
    return SimpleNamespace(cfg=cfg, bundle=bundle, acc=acc, model=model, sd=sd, optimizer=optimizer,
                           scheduler=scheduler, train_loader=train_loader, eval_loaders=eval_loaders,
                           stop_reason=None, started_from=started_from.record() if started_from else None)


def _check_model_name(cfg: TrainConfig) -> None:
    """Before any data is read: the model must be a registered sd_ model (the engine drives its stochastic depth)."""
    name = cfg.model.split(':')[-1]
    if timm.is_model(name) and not name.split('.')[0].startswith('sd_'):
        raise ConfigError(f'--model={cfg.model!r} is a timm model without sd_zoo\'s stochastic-depth controls; use '
                          f'an sd_ model, e.g. {", ".join(timm.list_models("sd_*")[:4])}')


def _prepare_folder(cfg: TrainConfig) -> Tuple[List[Path], Dict[str, Tuple[Any, Any]]]:
    """Before any data is read: the checkpoints a resume may start from (newest first) and the settings it
    changes; a fresh start in a folder holding a run, or a resume with other settings, is refused."""
    out = Path(cfg.output_dir)
    if not cfg.resume:
        check_new_run(out)
        return [], {}
    first = resolve_checkpoint(cfg.resume, out)
    if first is None:
        check_new_run(out)  # --resume latest with nothing to resume from: the folder must not hold a run
        return [], {}
    candidates = [first] if cfg.resume != 'latest' else complete_checkpoints(out / 'checkpoints')
    saved = None
    for path in candidates:
        try:
            saved = json.loads((path / 'trainer_state.json').read_text())['config']
            break
        except (OSError, ValueError, KeyError):
            continue
    now = cfg
    if cfg.pretrained and not cfg.model and saved:  # --pretrained without --model: the weights' architecture, which
        now = dataclasses.replace(cfg, model=saved.get('model', ''))  # _setup writes into cfg.model once it reads them
    allowed, refused = settings_changes(saved or {}, now)
    if refused:
        raise ConfigError(f'--resume={cfg.resume!r}: {path} was trained with other settings: '
                          f'{describe_refused(refused)}. Only --{", --".join(MAY_CHANGE_ON_RESUME)} may change on '
                          f'resume; start a run in a new --output-dir to change the others')
    allowed.pop('resume', None)
    return candidates, allowed


def _resume(ctx, state: TrainState, candidates: List[Path], changed: Dict[str, Tuple[Any, Any]]) -> Optional[Path]:
    """Load the newest intact checkpoint of ``candidates``; corrupt ones (sha256 mismatch, unreadable) are passed
    over with a message naming both, and set aside as ``corrupt-step_*``."""
    cfg, acc = ctx.cfg, ctx.acc
    if cfg.resume and not candidates:
        acc.print(f'--resume={cfg.resume}: no checkpoint in {Path(cfg.output_dir) / "checkpoints"} yet, '
                  f'starting from scratch')
    corrupt: List[Tuple[Path, str]] = []
    loaded = None
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                acc.load_state(str(path))
                loaded = path
                break
            except Exception as e:  # a truncated or garbled file of a checkpoint without sha256 records
                problem = f'cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        corrupt.append((path, problem))
    if corrupt:
        bad, why = corrupt[0]
        if loaded is None:
            raise TrainingError(f'--resume={cfg.resume!r}: checkpoint {bad} is corrupt ({why}) and no intact one '
                                f'is left' + (' in --output-dir' if cfg.resume == 'latest' else
                                              '; try --resume latest') + '; start again in a new --output-dir')
        acc.print(f'warning: checkpoint {bad} is corrupt ({why}); resumed from the previous intact checkpoint '
                  f'{loaded} instead')
        acc.wait_for_everyone()
        if acc.is_main_process:
            for path, _ in corrupt:
                os.replace(path, path.with_name(f'corrupt-{path.name}'))
    if loaded is None:
        return None
    ctx.checkpointer.last_path = loaded
    state.resumes.append(dict(global_step=state.global_step, checkpoint=loaded.name,
                              changed={k: list(v) for k, v in changed.items()},
                              corrupt_skipped=[p.name for p, _ in corrupt]))
    acc.print(f'resumed from {loaded}: epoch {state.epoch + 1}, batch {state.batches_done}, step {state.global_step}'
              + (f'; changed {changed}' if changed else ''))
    return loaded


def _repair_outputs(ctx, state: TrainState) -> None:
    """Make best_model/, metrics and plots agree with the resumed checkpoint: a run killed after its checkpoint
    and before (or while) writing them left them one epoch behind, or best_model/ half swapped."""
    out, cfg = Path(ctx.cfg.output_dir), ctx.cfg
    if not ctx.acc.is_main_process or not state.history:
        return
    for leftover in [*out.glob('.best_model.tmp-*'), *out.glob('.best_model.old-*')]:
        shutil.rmtree(leftover, ignore_errors=True)
    if state.best_epoch > 0 and _exported_epoch(out / 'best_model') != state.best_epoch:
        source = _epoch_end_checkpoint(ctx.checkpointer.root, state.best_epoch)
        if source is None:
            ctx.acc.print(f'warning: best_model/ does not hold epoch {state.best_epoch} and its checkpoint is gone; '
                          f'it cannot be repaired')
        else:
            from safetensors.torch import load_file
            model = copy.deepcopy(ctx.acc.unwrap_model(ctx.model))
            model.load_state_dict(load_file(str(source / 'model.safetensors')))
            row = next(r for r in state.history if r['epoch'] == state.best_epoch)
            export_best_weights(model, out / 'best_model', cfg, ctx.bundle, _best_metadata(cfg, row, ctx.started_from))
            write_text_atomic(ctx.checkpointer.root / 'best', source.name)
            ctx.acc.print(f'repaired best_model/: epoch {state.best_epoch}, from {source}')
    ctx.logger.log_epoch(state, every_row=True)


def _is_main_rank() -> bool:
    return int(os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))) == 0


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) one training run; returns what ``results.json`` holds."""
    import sys
    errors = validate_config(cfg)
    if errors:
        raise ConfigError('invalid settings:\n  ' + '\n  '.join(errors))
    _check_model_name(cfg)
    lock = RunLock(Path(cfg.output_dir)) if _is_main_rank() else None
    stale = lock.acquire(sys.argv) if lock else None  # also proves the folder writable, before any data is read
    if stale:
        print(f'note: {lock.path} was left by a run that is no longer alive (pid {stale.get("pid")}); taken over')
    try:
        return _train_locked(cfg)
    finally:
        if lock:
            lock.release()


def _train_locked(cfg: TrainConfig) -> Dict[str, Any]:
    candidates, changed = _prepare_folder(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = _setup(cfg)
    state = TrainState()
    ctx.acc.register_for_checkpointing(ctx.scheduler, ctx.sd, state)
    ctx.checkpointer = Checkpointer(ctx.acc, Path(cfg.output_dir) / 'checkpoints', cfg.keep_last)
    resumed_from = _resume(ctx, state, candidates, changed)
    ctx.logger = RunLogger(ctx.acc, cfg, ctx.bundle, ctx.sd, resumed_from, ctx.started_from)
    _repair_outputs(ctx, state)
    status = 'completed'
    with _StopOnSignal() as stop:
        session_start = time.perf_counter()
        for epoch in range(state.epoch, cfg.epochs):
            reason = _train_epoch(ctx, state, epoch, stop)
            if reason is None:
                _finish_epoch(ctx, state, epoch)
                reason = ctx.stop_reason or (
                    'max_steps' if cfg.max_steps and state.global_step >= cfg.max_steps else None)
            else:  # mid-epoch stop: the epoch's running sums travel with the checkpoint
                ctx.checkpointer.save(state, cfg)
            if reason is not None:
                status = 'max_steps' if reason == 'max_steps' else f'interrupted ({reason})'
                break
        ctx.acc.print(f'{status}: {time.perf_counter() - session_start:.1f}s in this session')
    results = ctx.logger.write_results(state, status, ctx.checkpointer.last_path)
    ctx.logger.close()
    ctx.acc.wait_for_everyone()
    return results


def _one_line(error: BaseException) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker, its own last line, not the traceback."""
    text = str(error)
    if 'Original Traceback' in text:
        text = text.strip().splitlines()[-1]
        text = text.split(': ', 1)[1] if text.split(': ', 1)[0].endswith('Error') else text
    return text


def run_cli(cfg: TrainConfig, parser: 'argparse.ArgumentParser') -> Dict[str, Any]:
    """:func:`train` for a script: bad settings go through ``parser.error``, data and run errors exit with
    their message (no traceback: the message says what is wrong and what to do). A run stopped by SIGINT or
    SIGTERM exits with status :data:`EXIT_INTERRUPTED` (75) after saving its checkpoint."""
    import sys
    try:
        results = train(cfg)
    except ConfigError as e:
        parser.error(str(e))
    except (DataError, TrainingError, RunFolderError) as e:
        raise SystemExit(f'error: {_one_line(e)}') from e
    except OSError as e:
        if not disk_full(e, Path(cfg.output_dir)):
            raise
        raise SystemExit(f'error: no space left on device while writing {e.filename or cfg.output_dir} '
                         f'({e.strerror or e}); free some space, then continue with --resume latest') from e
    if results['status'].startswith('interrupted'):
        print(f"{results['status']}: checkpoint saved in {results['last_checkpoint']}; continue with the same "
              f"command plus --resume latest (exit status {EXIT_INTERRUPTED})", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    return results
