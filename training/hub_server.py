"""A local Hugging Face Hub over real HTTP, for the tests and the demo: `olah` serving git repositories offline.

`olah <https://pypi.org/project/olah/>`_ (pinned: :data:`OLAH_VERSION`) is a self-hosted Hub mirror. With
``offline = true`` and a ``mirrors-path`` holding ``models/<org>/<name>`` git repositories it answers the real
``huggingface_hub`` client, and so ``timm.create_model(..., pretrained=True)``, with no internet::

    with LocalHubServer(tmp_dir) as hub:
        hub.add_repo('sd-zoo/sd_resnet20_cifar.fashion_mnist', export_folder)
        with hub.client(cache_dir):
            model = timm.create_model('sd_resnet20_cifar.fashion_mnist', pretrained=True)

Each repository is a plain (non-LFS) git repository with one commit. Two seed files per repository in olah's
cache (``resolved_commit.json`` of ``main``) make a missing file answer 404 (so timm's safetensors-then-bin
fallback works) instead of 401 "repository not found". Known gaps of olah 0.5.4, offline: ``model_info()``
answers 401 and uploads are refused; publishing is tested elsewhere against a local cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

__all__ = ['OLAH_VERSION', 'HubServerError', 'LocalHubServer', 'olah_available']

OLAH_VERSION = '0.5.4'
_GIT_ID = ['-c', 'user.name=sd_zoo', '-c', 'user.email=sd_zoo@localhost', '-c', 'commit.gpgsign=false']


class HubServerError(RuntimeError):
    """The local Hub server cannot be set up or started; the message says why."""


def olah_available() -> Optional[str]:
    """None when olah (at the pinned version) and git can run here, else the reason they cannot."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        found = version('olah')
    except PackageNotFoundError:
        return f'olah is not installed: pip install olah=={OLAH_VERSION} (in the dev extra)'
    if found != OLAH_VERSION:
        return f'olah {found} is installed; the local Hub server is tested with olah=={OLAH_VERSION}'
    if shutil.which('git') is None:
        return 'git is not installed (olah serves git repositories)'
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class LocalHubServer:
    """An olah process serving the repositories added with :meth:`add_repo` at :attr:`endpoint`."""

    def __init__(self, root: Union[str, Path], port: Optional[int] = None, start_timeout: float = 60.0):
        self.root = Path(root).resolve()  # olah runs with its cwd there: every path it is given is absolute
        self.mirrors, self.cache = self.root / 'mirrors', self.root / 'olah_cache'
        self.port = port or _free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        self.start_timeout = start_timeout
        self.process: Optional[subprocess.Popen] = None
        self.repos: Dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ repositories

    def add_repo(self, repo_id: str, files: Union[Path, Dict[str, Union[Path, bytes]]]) -> str:
        """Serve ``files`` (a folder's files, or ``{name: path or bytes}``) as ``repo_id``; returns the commit."""
        org, _, name = repo_id.partition('/')
        if not org or not name or '/' in name:
            raise HubServerError(f'repo_id={repo_id!r}: expected "org/name"')
        repo = self.mirrors / 'models' / org / name
        if repo.exists():
            shutil.rmtree(repo)
        repo.mkdir(parents=True)
        items = {p.name: p for p in sorted(Path(files).iterdir()) if p.is_file()} if isinstance(files, Path) \
            else dict(files)
        if not items:
            raise HubServerError(f'{repo_id}: no files to serve')
        for filename, content in items.items():
            if isinstance(content, bytes):
                (repo / filename).write_bytes(content)
            else:
                shutil.copyfile(content, repo / filename)
        self._git(repo, 'init', '-q', '-b', 'main')
        self._git(repo, 'add', '-A')
        self._git(repo, *_GIT_ID, 'commit', '-q', '-m', f'sd_zoo test repository {repo_id}')
        commit = self._git(repo, 'rev-parse', 'HEAD').strip()
        seed = self.cache / 'api' / 'models' / org / name / 'revision' / 'main'
        seed.mkdir(parents=True, exist_ok=True)
        (seed / 'resolved_commit.json').write_text(
            json.dumps({'status_code': 200, 'headers': {}, 'content': commit.encode().hex()}))
        self.repos[repo_id] = commit
        return commit

    @staticmethod
    def _git(repo: Path, *args: str) -> str:
        try:
            return subprocess.run(['git', *args], cwd=repo, check=True, capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as e:
            raise HubServerError(f'git {" ".join(args)} failed in {repo}: {e.stderr.strip()}') from e

    # ------------------------------------------------------------------------------------------ process

    def _write_config(self) -> Path:
        netloc = f'127.0.0.1:{self.port}'
        config = self.root / 'olah.toml'
        config.write_text('\n'.join([
            '[basic]', 'host = "127.0.0.1"', f'port = {self.port}', f'repos-path = "{self.cache}"',
            f'mirrors-path = ["{self.mirrors}"]', f'mirror-netloc = "{netloc}"', f'mirror-lfs-netloc = "{netloc}"',
            '[accessibility]', 'offline = true', '']))
        return config

    def start(self) -> 'LocalHubServer':
        reason = olah_available()
        if reason:
            raise HubServerError(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.mirrors / 'models').mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        olah = shutil.which('olah-cli') or str(Path(sys.executable).with_name('olah-cli'))
        log = open(self.root / 'olah.log', 'wb')
        self.process = subprocess.Popen([olah, '-c', str(config)], cwd=self.root, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # olah answers 500 on "/": probe the API route of a repository instead (any HTTP answer means it is up)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HubServerError(f'olah exited with status {self.process.returncode} at start; see '
                                     f'{self.root / "olah.log"}:\n{self.log_tail()}')
            try:
                urllib.request.urlopen(f'{self.endpoint}/api/models/sd-zoo/probe/revision/main', timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        self.stop()
        raise HubServerError(f'olah did not answer on {self.endpoint} within {self.start_timeout:.0f}s; see '
                             f'{self.root / "olah.log"}:\n{self.log_tail()}')

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / 'olah.log'
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:]) if path.is_file() else ''

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> 'LocalHubServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ clients

    def env(self, cache_dir: Union[str, Path]) -> Dict[str, str]:
        """Environment for a client process: this endpoint, an own cache, online."""
        return {**os.environ, 'HF_ENDPOINT': self.endpoint, 'HF_HUB_CACHE': str(cache_dir), 'HF_HUB_OFFLINE': '0',
                'HF_HUB_DISABLE_TELEMETRY': '1'}

    @contextlib.contextmanager
    def client(self, cache_dir: Union[str, Path]) -> Iterator[None]:
        """Point this process's ``huggingface_hub`` at the server (and a fresh cache) for the block.

        huggingface_hub reads ``HF_ENDPOINT`` and friends at import, so the constants are patched here."""
        from huggingface_hub import constants
        names: List[str] = ['ENDPOINT', 'HUGGINGFACE_CO_URL_TEMPLATE', 'HF_HUB_CACHE', 'HF_HUB_OFFLINE']
        saved = {n: getattr(constants, n) for n in names}
        constants.ENDPOINT = self.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.endpoint + '/{repo_id}/resolve/{revision}/{filename}'
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), False
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(constants, n, v)
