"""An output folder belongs to one run: the lock, the settings check and the checkpoint integrity of a run folder.

* :class:`RunLock`: ``<output-dir>/run.lock``, held with ``flock`` by the live run (the kernel releases it when the
  process dies, so a lock left by a killed run is stale and taken over; the file names the last holder).
* :func:`check_new_run` / :func:`settings_changes`: a folder that holds a run is continued only with ``--resume``
  and the same settings; what may change on resume is :data:`MAY_CHANGE_ON_RESUME` (recorded in results.json).
* :func:`checkpoint_files` / :func:`verify_checkpoint` / :func:`complete_checkpoints`: the sha256 of every file of a
  checkpoint is written into its ``trainer_state.json``; a resume walks back from the newest to the newest intact
  one. Checkpoints written before these records existed are accepted unverified.
* :func:`disk_full`: recognises "no space left" in the several forms torch and safetensors report it.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['RunFolderError', 'RunLock', 'MAY_CHANGE_ON_RESUME', 'check_new_run', 'settings_changes',
           'checkpoint_files', 'verify_checkpoint', 'complete_checkpoints', 'disk_full', 'fault_point']

LOCK_FILE = 'run.lock'
FAULT_ENV = 'SD_ZOO_FAULT'

# Settings that do not change what is trained: a resumed run may change them (each change is recorded).
MAY_CHANGE_ON_RESUME = ('epochs', 'max_steps', 'checkpoint_every', 'keep_last', 'resume', 'progress', 'log_with',
                        'threads', 'workers', 'data_dir', 'download', 'compare_with', 'output_dir', 'eval_batch_size',
                        'compile', 'compile_blocks')


class RunFolderError(RuntimeError):
    """The output folder is in use, holds another run, or cannot be written; the message says what to do."""


_FAULT_HITS: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here if ``SD_ZOO_FAULT`` is ``name`` or ``name@N`` (the N-th time this point
    is reached): the fault-injection tests' named kill points."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted.split('@')[0] != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(wanted.split('@')[1] if '@' in wanted else 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def disk_full(error: BaseException, path: Path) -> bool:
    """True if ``error`` (raised while writing under ``path``) means the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if 'No space left' in text or 'os error 28' in text:
        return True
    if 'inline_container' in text or 'file write failed' in text:  # torch.save's report of a short write
        try:
            usage = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists()))
        except (OSError, StopIteration):
            return False
        return usage.free < max(64 << 20, usage.total // 100)
    return False


# ------------------------------------------------------------------------------------------------ the lock

class RunLock:
    """``flock`` on ``<folder>/run.lock`` for the life of the run; also the first write into the folder."""

    def __init__(self, folder: Path):
        self.folder, self.path, self._fd = Path(folder), Path(folder) / LOCK_FILE, None

    def acquire(self, argv: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
        """Take the lock; return the record of a stale holder taken over (None if there was none)."""
        import fcntl
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunFolderError(
                f'--output-dir={self.folder} is in use by another live run ({_describe(holder)}); wait for it to '
                f'finish or stop it, or choose another --output-dir') from None
        previous = self._read(fd)
        record = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S'),
                      argv=list(argv), state='running')
        try:
            self._write(fd, record)
        except OSError as e:
            os.close(fd)
            raise self._unwritable(e) from e
        self._fd = fd
        return previous if previous.get('state') == 'running' else None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        record = self._read(self._fd)
        try:
            self._write(self._fd, dict(record, state='released', released=time.strftime('%Y-%m-%d %H:%M:%S')))
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _unwritable(self, e: OSError) -> RunFolderError:
        if disk_full(e, self.folder):
            return RunFolderError(f'--output-dir={self.folder}: no space left on device ({e.strerror}); free '
                                  f'some space or choose another folder')
        return RunFolderError(f'--output-dir={self.folder} is not writable ({type(e).__name__}: {e}); choose a '
                              f'folder you can write to')

    @staticmethod
    def _read(fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            return json.loads(os.read(fd, 1 << 16).decode() or '{}')
        except ValueError:
            return {}

    @staticmethod
    def _write(fd: int, record: Dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return 'no details recorded'
    argv = ' '.join(holder.get('argv') or []) or '?'
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {argv}"


# ------------------------------------------------------------------------------------------------ one run per folder

def _folder_holds_run(folder: Path) -> List[str]:
    found = [name for name in ('results.json', 'metrics.json') if (folder / name).is_file()]
    steps = sorted((folder / 'checkpoints').glob('step_*')) if (folder / 'checkpoints').is_dir() else []
    return found + ([f'checkpoints/{steps[-1].name}'] if steps else [])


def check_new_run(folder: Path) -> None:
    """Refuse to start a run from scratch in a folder that holds one (its outputs would be overwritten and its
    checkpoints mixed with the new run's)."""
    found = _folder_holds_run(folder)
    if not found:
        return
    status = ''
    try:
        results = json.loads((folder / 'results.json').read_text())
        status = f" (status {results.get('status')!r}, {results.get('epochs_completed')} epochs)"
    except (OSError, ValueError):
        pass
    raise RunFolderError(f'--output-dir={folder} already holds a run{status}: {", ".join(found)}. Continue it with '
                         f'--resume latest (same settings), or choose another --output-dir')


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


def settings_changes(saved: Dict[str, Any], cfg: Any) -> Tuple[Dict[str, Tuple[Any, Any]], Dict[str, Tuple[Any, Any]]]:
    """(allowed, refused) changes of ``cfg`` against a run's ``saved`` settings, each ``{name: (saved, now)}``.

    A setting missing from ``saved`` (added to :class:`TrainConfig` after the run started) counts as its default."""
    allowed, refused = {}, {}
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        before, now = _normal(saved.get(f.name, default)), _normal(getattr(cfg, f.name))
        if before != now:
            (allowed if f.name in MAY_CHANGE_ON_RESUME else refused)[f.name] = (before, now)
    return allowed, refused


def describe_refused(changes: Dict[str, Tuple[Any, Any]]) -> str:
    return '; '.join(f"--{k.replace('_', '-')}: {v[0]!r} in the run, {v[1]!r} now" for k, v in changes.items())


# ------------------------------------------------------------------------------------------------ checkpoint integrity

def checkpoint_files(folder: Path) -> Dict[str, str]:
    """sha256 of every file in a checkpoint folder (its ``trainer_state.json`` aside), by relative path."""
    from sd_zoo.hub import file_sha256
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != 'trainer_state.json'}


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None if ``folder`` is intact (or has no sha256 records: written before they existed), else what is wrong."""
    from sd_zoo.hub import file_sha256
    try:
        info = json.loads((folder / 'trainer_state.json').read_text())
    except (OSError, ValueError) as e:
        return f'trainer_state.json unreadable ({e})'
    for name, digest in (info.get('files') or {}).items():
        path = folder / name
        if not path.is_file():
            return f'{name} is missing'
        if file_sha256(path) != digest:
            return f'{name} has sha256 {file_sha256(path)[:16]}..., {digest[:16]}... was recorded'
    return None


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under ``root``, newest first (the one ``latest`` names first)."""
    if not root.is_dir():
        return []
    done = sorted((p for p in root.glob('step_*') if (p / 'trainer_state.json').is_file()), reverse=True)
    pointer = root / 'latest'
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return ([named] if named in done else []) + [p for p in done if p != named]
