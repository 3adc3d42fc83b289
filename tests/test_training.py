"""The training engine and scripts: a run end to end, exact resume (also after SIGKILL), signals, bad input,
weight decay of dropped blocks, two gloo processes against a single-process reference, and every paper preset's
command on stand-in data."""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sd_zoo  # noqa: F401
from training import cifar, imagenet
from training.data import build_datasets
from training.engine import lr_factor
from training.recipes import PAPER_RUNS, PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')
SYNTHETIC = ['--preset', 'fashion_mnist', '--dataset', 'synthetic', '--limit', '64', '--val-size', '32',
             '--batch-size', '16', '--epochs', '2', '--no-progress', '--log-with', 'none']


def run(out: Path, *extra: str) -> Dict:
    return cifar.main(SYNTHETIC + ['--output-dir', str(out), *extra])


def checkpoint_tensors(out: Path, step: int) -> Dict[str, torch.Tensor]:
    return load_file(str(out / 'checkpoints' / f'step_{step:08d}' / 'model.safetensors'))


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_synthetic_leaves_every_output(tmp_path):
    out = tmp_path / 'run'
    res = run(out, '--log-with', 'tensorboard', '--drop-path-scaling', 'test')
    assert res['status'] == 'completed' and res['epochs_completed'] == 2 and res['global_step'] == 8
    for name in ('metrics.csv', 'metrics.json', 'results.json', 'test_error.png', 'first_conv_grad.png',
                 'best_model/model.safetensors', 'best_model/config.json'):
        assert (out / name).is_file(), name
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    rows = json.loads((out / 'metrics.json').read_text())['epochs']
    assert [r['epoch'] for r in rows] == [1, 2]
    best = min(rows, key=lambda r: r['val_error'])
    assert res['best_epoch'] == best['epoch'] and res['test_error_at_best_val'] == best['test_error']
    assert all(0 < r['mean_active_depth'] < 9 and r['first_conv_grad'] > 0 and r['images_per_s'] > 0 for r in rows)
    assert len((out / 'metrics.csv').read_text().strip().splitlines()) == 3

    # the exported best weights load through timm and reproduce the recorded test error (test scaling folded)
    cfg = TrainConfig(**res['settings'])
    model = timm.create_model('sd_resnet20_cifar', pretrained=True, num_classes=10, in_chans=3,
                              pretrained_cfg_overlay=dict(file=str(out / 'best_model' / 'model.safetensors'))).eval()
    test = build_datasets(cfg).test
    x, y = torch.stack([test[i][0] for i in range(len(test))]), torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        error = (model(x).argmax(1) != y).float().mean().item()
    assert error == pytest.approx(res['test_error_at_best_val'], abs=1e-6)
    config = json.loads((out / 'best_model' / 'config.json').read_text())
    assert config['architecture'] == 'sd_resnet20_cifar' and config['model_args']['drop_path_scaling'] == 'train'


def test_bf16_gradient_accumulation_channels_last(tmp_path):
    res = run(tmp_path, '--mixed-precision', 'bf16', '--grad-accum', '2', '--channels-last', '--epochs', '1')
    rows = json.loads((tmp_path / 'metrics.json').read_text())['epochs']
    assert res['status'] == 'completed' and res['global_step'] == 4  # 8 micro-batches of 8, 2 per step
    assert math.isfinite(rows[0]['train_loss']) and 0 < rows[0]['mean_active_depth'] < 9
    assert (tmp_path / 'best_model' / 'model.safetensors').is_file()


@pytest.mark.skipif(not (FASHION_DIR / 'train-images-idx3-ubyte.gz').is_file(), reason='dataset-fashion-mnist missing')
def test_train_fashion_mnist_subset(tmp_path):
    res = cifar.main(['--preset', 'fashion_mnist', '--limit', '384', '--epochs', '1', '--batch-size', '32',
                      '--lr', '0.02', '--no-progress', '--log-with', 'none', '--output-dir', str(tmp_path)])
    assert res['status'] == 'completed'
    assert res['data']['train_size'] == 384 and res['data']['val_size'] == 384 and res['data']['test_size'] == 384
    assert res['run']['expected_depth'] == pytest.approx(6.5)  # (3L - 1) / 4 for L = 9, p_L = 0.5
    assert res['test_error_at_best_val'] < 0.8  # chance is 0.9; 12 steps on real images reach about 0.67


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    # 4 steps per epoch: stop at step 5 (inside epoch 2), resume to 10 (into epoch 3)
    args = ['--epochs', '3', '--checkpoint-every', '2']
    run(tmp_path / 'full', *args, '--max-steps', '10')
    first = run(tmp_path / 'part', *args, '--max-steps', '5')
    assert first['status'] == 'max_steps' and first['global_step'] == 5
    second = run(tmp_path / 'part', *args, '--max-steps', '10', '--resume', 'latest')
    assert second['resumed_from'].endswith('step_00000005')
    assert_same_tensors(checkpoint_tensors(tmp_path / 'full', 10), checkpoint_tensors(tmp_path / 'part', 10))
    optim = [torch.load(p / 'checkpoints/step_00000010/optimizer.bin', weights_only=False)
             for p in (tmp_path / 'full', tmp_path / 'part')]
    for a, b in zip(optim[0]['state'].values(), optim[1]['state'].values()):
        assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])
    full, part = (json.loads((p / 'metrics.json').read_text())['epochs'] for p in (tmp_path / 'full', tmp_path / 'part'))
    for key in ('train_loss', 'val_error', 'test_error', 'mean_active_depth', 'first_conv_grad', 'lr'):
        assert [r[key] for r in full] == [r[key] for r in part], key


def test_sigkill_then_resume(tmp_path):
    out, steps = tmp_path / 'killed', 10
    cmd = [sys.executable, str(ROOT / 'training' / 'cifar.py'), *SYNTHETIC, '--epochs', '3',
           '--checkpoint-every', '1', '--output-dir', str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / 'checkpoints' / 'latest'
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (latest.is_file() and int(latest.read_text()[5:]) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL at an arbitrary moment, possibly inside a checkpoint write
        proc.wait()
    resumed = run(out, '--epochs', '3', '--resume', 'latest', '--max-steps', str(steps))
    assert 3 <= int(Path(resumed['resumed_from']).name[5:]) < steps and resumed['global_step'] == steps
    run(tmp_path / 'reference', '--epochs', '3', '--max-steps', str(steps))
    assert_same_tensors(checkpoint_tensors(out, steps), checkpoint_tensors(tmp_path / 'reference', steps))


def test_sigint_saves_a_checkpoint_and_stops(tmp_path):
    out = tmp_path / 'interrupted'

    def interrupt_after_first_checkpoint():
        deadline = time.time() + 60
        while time.time() < deadline and not (out / 'checkpoints' / 'latest').is_file():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_checkpoint, daemon=True).start()
    with pytest.raises(SystemExit) as exc:  # an interrupted run does not exit 0
        run(out, '--epochs', '50', '--checkpoint-every', '1')
    assert exc.value.code == 75
    res = json.loads((out / 'results.json').read_text())
    assert res['status'] == 'interrupted (SIGINT)' and res['global_step'] < 200
    latest = (out / 'checkpoints' / 'latest').read_text().strip()
    assert latest == f"step_{res['global_step']:08d}"
    assert json.loads((out / 'results.json').read_text())['status'] == 'interrupted (SIGINT)'


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / 'nan'
    with pytest.raises(SystemExit, match='loss became (nan|inf)'):
        run(out, '--lr', '1e30', '--checkpoint-every', '1', '--momentum', '0', '--no-nesterov')
    latest = (out / 'checkpoints' / 'latest').read_text().strip()
    weights = load_file(str(out / 'checkpoints' / latest / 'model.safetensors'))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize('argv, flag', [
    (['--drop-path-rate', '1.5'], '--drop-path-rate'),
    (['--epochs', '0'], '--epochs'),
    (['--milestones', '9,3'], '--milestones'),
    (['--batch-size', '10', '--grad-accum', '3'], '--batch-size'),
    (['--model', 'sd_nonexistent'], '--model'),
    (['--drop-path-mode', 'row'], '--drop-path-mode'),
    (['--milestones', 'a,b'], '--milestones'),
])
def test_invalid_flags_name_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, *argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_dataset_names_path_and_remedy(tmp_path):
    with pytest.raises(SystemExit, match=r'cifar-10-batches-py.*--download'):
        cifar.main(['--preset', 'cifar10', '--data-dir', str(tmp_path), '--output-dir', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match=str(tmp_path / 'nowhere')):
        cifar.main(['--preset', 'svhn', '--data-dir', str(tmp_path / 'nowhere'), '--output-dir', str(tmp_path / 'o')])


def test_lr_schedule_multistep_and_warmup():
    cfg = TrainConfig(**PRESETS['cifar10_1202'])
    assert [lr_factor(cfg, e) * cfg.lr for e in (0, 9)] == [pytest.approx(0.01)] * 2
    assert [lr_factor(cfg, e) * cfg.lr for e in (10, 149, 150, 225)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def _initial_model(res: Dict) -> torch.nn.Module:
    from accelerate.utils import set_seed
    set_seed(res['settings']['seed'])
    return timm.create_model('sd_resnet20_cifar', num_classes=10, in_chans=3, drop_path_rate=0.9,
                             zero_init_last=False)


@pytest.mark.parametrize('decay_dropped', [True, False])
def test_dropped_blocks_get_weight_decay_by_default(tmp_path, decay_dropped):
    flag = '--decay-dropped' if decay_dropped else '--no-decay-dropped'
    res = run(tmp_path, '--drop-path-rate', '0.9', '--max-steps', '1', '--weight-decay', '0.01', flag)
    gates = torch.load(tmp_path / 'checkpoints/step_00000001/custom_checkpoint_1.pkl', weights_only=False)
    dropped = [i for i, active in enumerate(gates['last_active']) if not active]
    assert dropped, 'p_L = 0.1 should drop some block in the first step'
    model = _initial_model(res)
    before, after = model.state_dict(), checkpoint_tensors(tmp_path, 1)
    block = list(model.sd_blocks())[dropped[0]]
    prefix = next(name for name, module in model.named_modules() if module is block)
    for name, _ in block.named_parameters():
        key = f'{prefix}.{name}'
        # first SGD step with a zero gradient: buf = wd * p; Nesterov: p -= lr * (wd * p + 0.9 * buf)
        expected = before[key] * (1 - 0.1 * 0.01 * 1.9) if decay_dropped else before[key]
        assert torch.allclose(after[key], expected, rtol=1e-6, atol=1e-9), key


# --------------------------------------------------------------------------------------------- two processes

DDP_WORKER = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from sd_zoo.stochastic_depth import StochasticDepth
from training import cifar

gates, draw = [], StochasticDepth._draw

def recording_draw(self, x):  # record the gates of every training forward on this rank
    draw(self, x)
    gates.append(list(self.last_active))

StochasticDepth._draw = recording_draw
cifar.main(sys.argv[1:])
Path(sys.argv[sys.argv.index('--output-dir') + 1], f'gates_{PartialState().process_index}.json').write_text(
    json.dumps(gates))
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch_two_cpu_processes(tmp_path: Path, argv: List[str]) -> None:
    """``accelerate launch`` with two gloo ranks on the CPU (a fresh interpreter each: forking a process whose
    OpenMP pool has run can hang)."""
    worker = tmp_path / 'ddp_worker.py'
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, ACCELERATE_USE_CPU='1', PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), str(worker), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _reference_steps(res: Dict, gates: List[List[bool]]) -> Dict[str, torch.Tensor]:
    """The single-process update on the same global batches: each half-batch is normalised on its own (as on
    its rank), both halves use the step's one gate draw, the gradient is the mean of the two halves'.

    Runs on one thread like the ranks (OMP_NUM_THREADS=1): the CPU convolutions' weight gradients are summed in
    a thread-dependent order, and from step 2 on such last-bit differences can move a ReLU input that lies near
    zero to the other side, which changes the gradients of all layers below it by ~1e-3.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps_one_thread(res, gates)
    finally:
        torch.set_num_threads(threads)


def _reference_steps_one_thread(res: Dict, gates: List[List[bool]]) -> Dict[str, torch.Tensor]:
    from accelerate.utils import set_seed
    cfg = TrainConfig(**res['settings'])
    train = build_datasets(cfg).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    set_seed(cfg.seed)
    model = timm.create_model('sd_resnet20_cifar', num_classes=10, in_chans=3, drop_path_rate=0.5,
                              zero_init_last=False).train()
    model.stochastic_depth.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    half = cfg.batch_size // 2
    for step in range(len(gates)):
        state = model.stochastic_depth.generator.get_state()
        for rank in range(2):
            model.stochastic_depth.generator.set_state(state)
            idx = order[(2 * step + rank) * half:(2 * step + rank + 1) * half]
            x, y = torch.stack([train[i][0] for i in idx]), torch.tensor([train[i][1] for i in idx])
            (F.cross_entropy(model(x), y) / 2).backward()
            assert model.stochastic_depth.last_active == gates[step]
        opt.step()
        opt.zero_grad(set_to_none=False)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.fixture(scope='module')
def train_ddp_run(tmp_path_factory):
    """Two gloo ranks, two optimizer steps (checkpoint after each), gates recorded on each rank."""
    tmp = tmp_path_factory.mktemp('ddp')
    out = tmp / 'ddp'
    _launch_two_cpu_processes(tmp, SYNTHETIC + ['--output-dir', str(out), '--max-steps', '2', '--checkpoint-every',
                                                '1', '--drop-path-rate', '0.5', '--weight-decay', '0.01'])
    gates = [json.loads((out / f'gates_{r}.json').read_text()) for r in range(2)]
    return out, json.loads((out / 'results.json').read_text()), gates


def test_two_gloo_processes_agree_and_match_single_process(train_ddp_run):
    out, res, gates = train_ddp_run
    assert len(gates[0]) == 2 and gates[0] == gates[1]
    assert not all(gates[0][0]), 'no block dropped in step 1: the test would not exercise unused parameters'
    assert res['num_processes'] == 2 and res['global_step'] == 2
    trained = checkpoint_tensors(out, 1)
    reference = _reference_steps(res, gates[0][:1])
    for key, value in reference.items():  # dropped blocks included: weight decay + momentum as in one process
        assert torch.allclose(trained[key], value, rtol=1e-5, atol=1e-6), key


def test_two_gloo_processes_match_single_process_over_two_steps(train_ddp_run):
    out, res, gates = train_ddp_run
    trained, reference = checkpoint_tensors(out, 2), _reference_steps(res, gates[0])
    for key, value in reference.items():
        assert torch.allclose(trained[key], value, rtol=1e-5, atol=1e-6), key


# --------------------------------------------------------------------------------------------- the paper's commands

HEAVY_PRESETS = {'cifar10_1202', 'imagenet_resnet152'}  # 1202 layers / ResNet-152 at 224 px: minutes on a CPU


def _stand_in(writers, dataset: str, root: Path) -> Path:
    if dataset in ('cifar10', 'cifar100'):
        return writers.cifar(root, int(dataset[5:]), n_train=5008, n_test=8)
    if dataset == 'svhn':
        pytest.importorskip('scipy')
        return writers.svhn(root, train_per_class=401, extra_per_class=201, n_test=8)
    return writers.image_folder(root, per_class=2)


@pytest.mark.parametrize('paper_run', [
    pytest.param(r, id=r['preset'], marks=[pytest.mark.slow] if r['preset'] in HEAVY_PRESETS else [])
    for r in PAPER_RUNS])
def test_paper_command_finishes_on_stand_in_data(tmp_path, train_data_writers, paper_run):
    """The README's command for each row of the paper, verbatim except for the data folder, output folder
    and length (--epochs 1 --limit 8), on a stand-in dataset in the real format (full-size validation split)."""
    argv = shlex.split(paper_run['command'])
    start = next(i for i, a in enumerate(argv) if a.endswith('.py'))
    script = {'training/cifar.py': cifar, 'training/imagenet.py': imagenet}[argv[start]]
    args = argv[start + 1:]
    dataset = PRESETS[paper_run['preset']]['dataset']
    args[args.index('--data-dir') + 1] = str(_stand_in(train_data_writers, dataset, tmp_path / 'data'))
    args[args.index('--output-dir') + 1] = str(tmp_path / 'out')
    res = script.main(args + ['--epochs', '1', '--limit', '8', '--no-progress', '--log-with', 'none'])
    assert res['status'] == 'completed' and res['epochs_completed'] == 1
    assert res['settings']['preset'] == paper_run['preset'] and res['best_epoch'] == 1
    assert (tmp_path / 'out' / 'best_model' / 'model.safetensors').is_file()


@pytest.mark.parametrize('where', ['loop_body', 'early_stop'])
def test_batches_shuts_its_workers_down_however_the_loop_ends(where):
    """Workers ignore SIGTERM (a scheduler's signal to the process group is for the main process), so they
    must be shut down when iteration ends: an error in the loop body, or leaving the loop early."""
    import contextlib
    import multiprocessing

    from torch.utils.data import DataLoader, TensorDataset

    from training.engine import _batches, _ignore_stop_signals
    loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,
                        worker_init_fn=_ignore_stop_signals)
    with contextlib.suppress(ZeroDivisionError):
        with contextlib.closing(_batches(loader)) as batches:
            for i, _ in enumerate(batches):
                assert multiprocessing.active_children()
                if i == 2:
                    if where == 'loop_body':
                        raise ZeroDivisionError
                    break
    assert not multiprocessing.active_children(), multiprocessing.active_children()


def test_compile_flag_trains_like_eager_and_keeps_plain_keys(tmp_path, capsys):
    """--compile: the same draws and (to float tolerance) the same training as eager, the gated blocks run as
    recommended for the device, and checkpoints and exports keep the model's own keys (no '_orig_mod.')."""
    eager = run(tmp_path / 'eager', '--epochs', '1')
    compiled = run(tmp_path / 'compiled', '--epochs', '1', '--compile')
    assert 'torch.compile: on; gated blocks run regions (--compile-blocks auto)' in capsys.readouterr().out
    assert compiled['settings']['compile'] is True and eager['settings']['compile'] is False
    [e], [c] = (json.loads((tmp_path / n / 'metrics.json').read_text())['epochs'] for n in ('eager', 'compiled'))
    assert c['mean_active_depth'] == e['mean_active_depth']  # the same gates
    # four SGD steps at lr 0.1 amplify float differences of the compiled stem and head (per-step gradients are
    # compared tightly in tests/test_compile.py)
    assert c['train_loss'] == pytest.approx(e['train_loss'], rel=5e-3)
    a, b = (load_file(str(tmp_path / n / 'best_model' / 'model.safetensors')) for n in ('eager', 'compiled'))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the model's own keys
    assert all(torch.isfinite(t).all() for t in b.values())
