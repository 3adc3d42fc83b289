"""Nothing lost, nothing mixed up in a training run: one live run per output folder (lock, settings check), SIGTERM
to the process group with DataLoader workers, a crash-consistent end of epoch (SIGKILL at every named point of
it, then resume), corrupt checkpoints passed over, run folders written before these checks still resumed, and
fail-fast errors (unwritable folder, disk full)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from sd_zoo import hub, publishing
from training import cifar
from training.run_folder import RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--preset', 'fashion_mnist', '--dataset', 'synthetic', '--limit', '32', '--val-size', '16',
        '--batch-size', '16', '--epochs', '2', '--no-progress', '--log-with', 'none', '--model', 'sd_resnet20_cifar',
        '--threads', '1']  # one thread in every process: runs split over processes agree to the last bit
STABLE_KEYS = ('epoch', 'global_step', 'lr', 'train_loss', 'val_error', 'test_error', 'mean_active_depth',
               'first_conv_grad')


def run(out: Path, *extra: str) -> Dict:
    return cifar.main(TINY + ['--output-dir', str(out), *extra])


def script(out: Path, *extra: str, fault: str = '', workers: int = 0, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', SD_ZOO_FAULT=fault)
    cmd = [sys.executable, str(ROOT / 'training' / 'cifar.py'), *TINY, '--workers', str(workers),
           '--output-dir', str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def rows(out: Path) -> List[Dict]:
    return [{k: r[k] for k in STABLE_KEYS} for r in json.loads((out / 'metrics.json').read_text())['epochs']]


def files(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (checkpoint every optimizer step)."""
    out, threads = tmp_path_factory.mktemp('ref') / 'run', torch.get_num_threads()
    res = run(out, '--checkpoint-every', '1')
    torch.set_num_threads(threads)
    return out, res


# --------------------------------------------------------------------------------------------- one run per folder

def test_second_run_in_a_live_runs_folder_is_refused(tmp_path):
    out = tmp_path / 'run'
    holder = RunLock(out)
    holder.acquire(['training/cifar.py', '--output-dir', str(out)])
    try:
        with pytest.raises(SystemExit, match=rf'in use by another live run \(pid {os.getpid()} .*cifar.py'):
            run(out, '--drop-path-rate', '0')
    finally:
        holder.release()
    assert sorted(p.name for p in out.iterdir()) == ['run.lock']  # nothing else was written


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    (out / 'run.lock').write_text(json.dumps(dict(pid=int(dead.stdout), host='h', state='running', argv=['x'])))
    res = run(out, '--epochs', '1')
    assert res['status'] == 'completed'
    assert f'no longer alive (pid {int(dead.stdout)})' in capsys.readouterr().out
    assert json.loads((out / 'run.lock').read_text())['state'] == 'released'


def test_fresh_start_in_a_finished_runs_folder_is_refused(tmp_path, reference):
    out = tmp_path / 'run'
    shutil.copytree(reference[0], out)
    before = files(out)
    with pytest.raises(SystemExit, match=r"already holds a run \(status 'completed', 2 epochs\).*--resume latest"):
        run(out, '--drop-path-rate', '0')
    after = files(out)
    after.pop('run.lock')
    before.pop('run.lock', None)
    assert after == before


def test_resume_with_other_settings_is_refused_and_allowed_changes_recorded(tmp_path, reference, capsys):
    out = tmp_path / 'run'
    shutil.copytree(reference[0], out)
    for flag, value in (('--lr', '0.05'), ('--milestones', '1'), ('--drop-path-scaling', 'test'),
                        ('--no-augment', None), ('--drop-path-rate', '0')):
        with pytest.raises(SystemExit) as exc:
            run(out, '--resume', 'latest', flag, *([value] if value else []))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag.replace('no-', '') in err and 'other settings' in err, err
    res = run(out, '--resume', 'latest', '--epochs', '3', '--eval-batch-size', '8', '--checkpoint-every', '1')
    assert res['status'] == 'completed' and res['epochs_completed'] == 3
    assert res['resumes'][-1]['changed'] == {'epochs': [2, 3], 'eval_batch_size': [256, 8],
                                             'output_dir': [str(reference[0]), str(out)]}  # the folder was copied
    assert 'epochs' in res['may_change_on_resume'] and 'lr' not in res['may_change_on_resume']


# --------------------------------------------------------------------------------------------- signals

def test_sigterm_to_the_process_group_with_workers_saves_and_exits_interrupted(tmp_path):
    out = tmp_path / 'run'
    proc = script(out, '--epochs', '200', '--checkpoint-every', '1', workers=2, start_new_session=True)
    latest = out / 'checkpoints' / 'latest'
    deadline = time.time() + 240
    while time.time() < deadline and not latest.is_file():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # inside the training loop, workers alive
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler or `timeout` sends: the workers get it too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert 'interrupted (SIGTERM)' in err and 'killed by signal' not in err
    res = json.loads((out / 'results.json').read_text())
    assert res['status'] == 'interrupted (SIGTERM)'
    assert latest.read_text().strip() == f"step_{res['global_step']:08d}"


# --------------------------------------------------------------------------------------------- crash-consistent epoch end

KILL_POINTS = ['checkpoint:state_saved', 'checkpoint:complete', 'checkpoint:renamed', 'checkpoint:latest',
               'epoch:checkpointed', 'inside_best_model_swap', 'epoch:best_exported', 'epoch:metrics_written',
               'epoch:results_written']
DEFAULT_KILL_POINTS = ('epoch:checkpointed', 'inside_best_model_swap', 'epoch:metrics_written')  # the three


def improving_errors(ctx, loader) -> float:
    """Stands in for the evaluation: error 0.5 after epoch 1, 0.25 after epoch 2, so epoch 2 is a new best (its
    export replaces epoch 1's) whatever two steps of training do."""
    return [0.5, 0.25][ctx.scheduler.last_epoch]


FAULT_RUNNER = """
import os, signal, sys
sys.path.insert(0, os.environ['PYTHONPATH'])
from training import engine
engine._evaluate = lambda ctx, loader: [0.5, 0.25][ctx.scheduler.last_epoch]
if os.environ['SD_ZOO_FAULT'] == 'inside_best_model_swap':
    real_replace = os.replace
    def replace(src, dst, *a, **k):  # SIGKILL between the two renames of best_model/'s swap
        real_replace(src, dst, *a, **k)
        if os.path.basename(str(dst)).startswith('.best_model.old-'):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'), {'__name__': '__main__', '__file__': sys.argv[0]})
"""


@pytest.fixture(scope='module')
def improving_reference(tmp_path_factory):
    """An uninterrupted 2-epoch run with the stand-in evaluation (checkpoint every optimizer step)."""
    from training import engine
    out, threads = tmp_path_factory.mktemp('ref') / 'run', torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, '_evaluate', improving_errors)
        res = run(out, '--checkpoint-every', '1')
    torch.set_num_threads(threads)
    assert res['best_epoch'] == 2
    return out, res


def kill_at(out: Path, point: str, tmp_path: Path) -> subprocess.Popen:
    """Run the tiny 2-epoch run and SIGKILL it at ``point`` of the second epoch end (2 steps per epoch and a
    checkpoint after each: the 4th checkpoint ends epoch 2); returns the finished process."""
    (tmp_path / 'fault_runner.py').write_text(FAULT_RUNNER)
    fault = point if point == 'inside_best_model_swap' else f"{point}@{2 if point.startswith('epoch:') else 4}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', SD_ZOO_FAULT=fault)
    proc = subprocess.Popen([sys.executable, str(tmp_path / 'fault_runner.py'), str(ROOT / 'training' / 'cifar.py'),
                             *TINY, '--output-dir', str(out), '--checkpoint-every', '1'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stderr_text = proc.communicate(timeout=600)[1]
    return proc


@pytest.mark.parametrize('point', [p if p in DEFAULT_KILL_POINTS else pytest.param(p, marks=pytest.mark.slow)
                                   for p in KILL_POINTS])
def test_kill_at_every_point_of_the_epoch_end_then_resume_agrees(tmp_path, improving_reference, monkeypatch, point):
    from training import engine
    ref_out, ref = improving_reference
    out = tmp_path / 'run'
    proc = kill_at(out, point, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr_text[-3000:]
    if point == 'epoch:checkpointed':  # the case: best_model/ one best epoch behind
        assert json.loads((out / 'best_model' / 'config.json').read_text())['sd_zoo']['training']['epoch'] == 1
    if point == 'inside_best_model_swap':  # the case: best_model/ gone
        assert not (out / 'best_model').exists() and list(out.glob('.best_model.old-*'))
    monkeypatch.setattr(engine, '_evaluate', improving_errors)
    res = run(out, '--checkpoint-every', '1', '--resume', 'latest')
    assert res['status'] == 'completed' and res['global_step'] == ref['global_step']
    assert rows(out) == rows(ref_out)  # metrics: every epoch, the same numbers
    assert len((out / 'metrics.csv').read_text().strip().splitlines()) == 3
    assert res['best_epoch'] == ref['best_epoch'] == 2
    config = json.loads((out / 'best_model' / 'config.json').read_text())
    assert config['sd_zoo']['training']['epoch'] == 2
    assert (out / 'best_model' / 'model.safetensors').read_bytes() == \
        (ref_out / 'best_model' / 'model.safetensors').read_bytes()
    assert (out / 'checkpoints' / 'best').read_text().strip() == 'step_00000004'
    assert not list(out.glob('.best_model*')) and not list((out / 'checkpoints').glob('.tmp-*'))
    publishing.export_run(out, tmp_path / 'export', tag='t', suggest_entry=False)  # consistent: export accepts it


# --------------------------------------------------------------------------------------------- corrupt checkpoints

def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_with_flipped_bytes_falls_back_to_the_previous_one(tmp_path, reference, capsys):
    ref_out, ref = reference
    out = tmp_path / 'run'
    run(out, '--checkpoint-every', '1', '--max-steps', '3')
    flip_byte(out / 'checkpoints' / 'step_00000003' / 'model.safetensors')
    res = run(out, '--checkpoint-every', '1', '--resume', 'latest')
    printed = capsys.readouterr().out
    assert 'step_00000003 is corrupt (model.safetensors has sha256' in printed and 'step_00000002 instead' in printed
    assert res['resumed_from'].endswith('step_00000002') and res['resumes'][-1]['corrupt_skipped'] == ['step_00000003']
    assert (out / 'checkpoints' / 'corrupt-step_00000003').is_dir()
    assert rows(out) == rows(ref_out)  # exact resume from the intact checkpoint: the same run


def test_truncated_checkpoint_without_records_falls_back_naming_both(tmp_path, capsys):
    out = tmp_path / 'run'
    run(out, '--checkpoint-every', '1', '--max-steps', '3')
    last = out / 'checkpoints' / 'step_00000003'
    info = json.loads((last / 'trainer_state.json').read_text())
    del info['files']  # as written before sha256 records existed
    (last / 'trainer_state.json').write_text(json.dumps(info))
    optimizer = last / 'optimizer.bin'
    optimizer.write_bytes(optimizer.read_bytes()[:200])
    res = run(out, '--checkpoint-every', '1', '--resume', 'latest')
    printed = capsys.readouterr().out
    assert 'step_00000003 is corrupt (cannot be loaded' in printed and 'step_00000002 instead' in printed
    assert res['status'] == 'completed'


# --------------------------------------------------------------------------------------------- older run folders

def make_old_format(out: Path) -> None:
    """Strip what this code adds to a run folder: the lock, sha256 records, the resume log."""
    (out / 'run.lock').unlink()
    for state in (out / 'checkpoints').glob('step_*/trainer_state.json'):
        info = json.loads(state.read_text())
        info.pop('files', None), info.pop('best_epoch', None)
        state.write_text(json.dumps(info, indent=1))
    for pkl in (out / 'checkpoints').glob('step_*/custom_checkpoint_2.pkl'):
        train_state = torch.load(pkl, weights_only=False)
        train_state.pop('resumes', None)
        torch.save(train_state, pkl)
    results = json.loads((out / 'results.json').read_text())
    results.pop('resumes', None), results.pop('may_change_on_resume', None)
    (out / 'results.json').write_text(json.dumps(results))
    config = json.loads((out / 'best_model' / 'config.json').read_text())
    config['sd_zoo'].pop('files', None)
    (out / 'best_model' / 'config.json').write_text(json.dumps(config))


def test_run_folder_of_the_previous_code_resumes_and_exports(tmp_path, capsys):
    out = tmp_path / 'run'
    run(out, '--checkpoint-every', '1', '--max-steps', '3')
    make_old_format(out)
    res = run(out, '--checkpoint-every', '1', '--resume', 'latest', '--epochs', '3')
    assert res['status'] == 'completed' and res['resumed_from'].endswith('step_00000003')
    assert 'corrupt' not in capsys.readouterr().out  # missing records: unverified, accepted
    make_old_format(out)
    publishing.export_run(out, tmp_path / 'export', tag='t', suggest_entry=False)
    assert hub.verify_file(tmp_path / 'export' / 'model.safetensors')  # the new export carries its sha256


# --------------------------------------------------------------------------------------------- fail fast

def test_unwritable_output_folder_fails_before_data_loading(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(SystemExit, match=r'--output-dir=.*a_file/run is not writable'):
        cifar.main(['--preset', 'cifar10', '--data-dir', str(tmp_path / 'no_data'), '--output-dir',
                    str(blocker / 'run')])


def test_disk_full_says_no_space_left_and_names_the_path(tmp_path, monkeypatch):
    """torch.save's report of a full disk (seen on a full tmpfs: no errno, no 'space'), raised by the checkpoint
    save on a disk that is then nearly full; test_real_full_disk fills a real one where it may mount a tmpfs."""
    real_error = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
    from accelerate import Accelerator

    from training import run_folder
    monkeypatch.setattr(run_folder.shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10 << 30, (10 << 30) - 1024, 1024))

    def full_disk(self, output_dir=None, **kwargs):
        raise real_error
    monkeypatch.setattr(Accelerator, 'save_state', full_disk)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match=r'no space left on device while writing checkpoint .*\.tmp-step_00000001'):
        run(out, '--checkpoint-every', '1')
    assert not list((out / 'checkpoints').glob('.tmp-*'))


@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a small tmpfs needs root')
def test_real_full_disk(tmp_path):
    mnt = tmp_path / 'small'
    mnt.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        proc = script(mnt / 'run', '--checkpoint-every', '1')
        _, err = proc.communicate(timeout=300)
    finally:
        subprocess.run(['umount', str(mnt)], check=False)
    assert proc.returncode == 1 and 'error: no space left on device while writing' in err, err[-2000:]
    assert 'inline_container' not in err.splitlines()[-1]
