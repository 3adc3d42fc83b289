"""The wheel and sdist hold what they must, an installed wheel makes timm see sd_ models without an import, and
every public function works from the installed wheel alone (no checkout on the path).

One build (sdist + wheel from it, ``python -m build --no-isolation``: offline, with the installed setuptools)
and one fresh virtual environment (the wheel installed with ``--no-deps``) are shared by the tests of this module.
The test venv sees the packages of the interpreter that runs the tests (torch, timm, ...) through a ``.pth`` file
listing its site-packages folders: ``--system-site-packages`` would show the *base* interpreter's instead, which
in a user's plain venv has no torch. About 15-25 s on 2 cores.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_COPY = {'.git', 'build', 'dist', '.venv', '.pytest_cache', '__pycache__', 'runs', 'output', 'results'}


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
    return proc


def _setuptools_builds_wheels() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(p) for p in setuptools.__version__.split('.')[:2]) >= (70, 1)


@pytest.fixture(scope='module')
def dists(tmp_path_factory):
    """sdist and wheel built from a copy of the working tree (build/ and egg-info stay out of the repo)."""
    tmp = tmp_path_factory.mktemp('pkg')
    src = tmp / 'src'
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP_COPY or n.endswith('.egg-info')])
    # offline build with the installed setuptools when it can make wheels by itself (>= 70.1), else isolated
    offline = ['--no-isolation', '--skip-dependency-check'] if _setuptools_builds_wheels() else []
    _run([sys.executable, '-m', 'build', *offline, '--outdir', str(tmp / 'dist'), str(src)])
    (wheel,) = (tmp / 'dist').glob('*.whl')
    (sdist,) = (tmp / 'dist').glob('*.tar.gz')
    return dict(tmp=tmp, wheel=wheel, sdist=sdist)


def outer_site_packages():
    """The site-packages folders on this interpreter's path (its own, its base's if the venv shares them, and those
    a .pth file added), in order; plain paths, so their .pth files (an editable sd_zoo) are not run again."""
    return [p for p in dict.fromkeys(sys.path) if p and Path(p).is_dir() and Path(p).name in ('site-packages',
                                                                                             'dist-packages')]


@pytest.fixture(scope='module')
def venv_python(dists):
    env_dir = dists['tmp'] / 'venv'
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / 'bin' / 'python'
    site_dir = next((env_dir / 'lib').glob('python*/site-packages'))
    (site_dir / '_outer_packages.pth').write_text(''.join(f'{p}\n' for p in outer_site_packages()))
    # --ignore-installed: an sd_zoo seen through the system site or PYTHONPATH (an editable checkout) must not
    # make pip skip the wheel
    _run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index', '-q',
          '--ignore-installed', str(dists['wheel'])])
    return python


def test_wheel_contents(dists):
    names = set(zipfile.ZipFile(dists['wheel']).namelist())
    for module in ('__init__', 'sd_resnet', 'stochastic_depth', 'pretrained', 'cards', 'hub', '_autoload',
                   'load_errors', 'publishing', 'cli', '_version', 'datasets', 'sources', 'evaluate'):
        assert f'sd_zoo/{module}.py' in names
    assert 'sd_zoo-autoload.pth' in names  # at the wheel root: installed into site-packages itself
    assert not any(n.startswith(('tests/', 'training/', 'hub_cards/', 'tools/', 'results/')) for n in names)
    assert 'sd_zoo/readme.py' not in names  # repository tooling (tools/readme.py) stays out of the wheel
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    text = zipfile.ZipFile(dists['wheel']).read(entry_points).decode()
    assert 'sd-zoo-publish = sd_zoo.cli:publish_main' in text and 'sd-zoo-export = sd_zoo.cli:export_main' in text
    assert 'sd-zoo-hub = sd_zoo.cli:main' in text
    assert 'sd-zoo-eval = sd_zoo.evaluate:main' in text


def test_sdist_contents(dists):
    names = {n.split('/', 1)[1] for n in tarfile.open(dists['sdist']).getnames() if '/' in n}
    for required in ('pyproject.toml', 'setup.py', 'MANIFEST.in', 'sd_zoo-autoload.pth', 'sd_zoo/hub.py',
                     'tests/test_hub.py', 'tests/test_packaging.py', 'tools/readme.py', 'tools/cards.py'):
        assert required in names, required
    assert any(n.startswith('training/') and n.endswith('.py') for n in names)
    cards = {n for n in names if n.startswith('hub_cards/') and n.endswith('.md')}
    assert cards == {f'hub_cards/{p.name}' for p in (ROOT / 'hub_cards').glob('*.md')} and cards


def _fresh(python: Path, code: str, cwd: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'SD_ZOO_NO_AUTOIMPORT')}
    return _run([str(python), '-c', code], cwd=cwd, env={**clean, **env}).stdout.strip()


def test_installed_wheel_registers_models_when_timm_is_imported(venv_python, dists):
    cwd = dists['tmp']  # not the repository: sd_zoo must come from the installed wheel
    out = _fresh(venv_python, "import timm, sys; m = timm.create_model('sd_resnet152'); "
                              "print(type(m).__name__, sys.modules['sd_zoo'].__file__)", cwd)
    name, location = out.splitlines()[-1].split()
    assert name == 'SDResNet' and str(venv_python.parent.parent) in location


def test_autoimport_costs_nothing_without_timm_and_can_be_disabled(venv_python, dists):
    cwd = dists['tmp']
    out = _fresh(venv_python, "import sys, json; print(json.dumps(['torch' in sys.modules, 'sd_zoo' in sys.modules, "
                              "[type(f).__name__ for f in sys.meta_path].count('AutoImportFinder')]))", cwd)
    assert out.splitlines()[-1] == '[false, false, 1]'
    out = _fresh(venv_python, "import sys, timm; print('sd_zoo' in sys.modules, timm.is_model('sd_resnet152'))", cwd,
                 SD_ZOO_NO_AUTOIMPORT='1')
    assert out.splitlines()[-1] == 'False False'


def test_broken_hook_target_cannot_break_timm(venv_python, dists):
    site = next((venv_python.parent.parent / 'lib').glob('python*/site-packages'))
    init = site / 'sd_zoo' / '__init__.py'
    original = init.read_text()
    init.write_text('raise ImportError("simulated breakage")\n')
    try:
        proc = subprocess.run([str(venv_python), '-W', 'always', '-c', 'import timm; print(timm.__name__)'],
                              cwd=dists['tmp'], capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    finally:
        init.write_text(original)
    assert proc.returncode == 0 and proc.stdout.strip() == 'timm'
    assert 'simulated breakage' in proc.stderr  # reported as a warning, not raised


def test_every_public_function_works_from_the_installed_wheel(venv_python, dists, tmp_path):
    """tests/wheel_smoke.py calls each public function of every sd_zoo module once, offline, from outside the
    checkout; the cards and the weights table it renders from the wheel equal the committed ones."""
    from test_hub import fake_run
    run, baseline, work = tmp_path / 'run', tmp_path / 'baseline', tmp_path / 'work'
    fake_run(run)
    fake_run(baseline, drop_path_rate=0.0, test_error=0.0912, wall=800.0)
    work.mkdir()
    args = dict(work=str(work), run=str(run), baseline=str(baseline), bin=str(venv_python.parent),
                export=str(ROOT / 'results' / 'fashion_mnist' / 'export'), cache=str(tmp_path / 'cache'))
    clean = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'SD_ZOO_NO_AUTOIMPORT', 'SD_ZOO_HUB_ORG')}
    proc = _run([str(venv_python), str(ROOT / 'tests' / 'wheel_smoke.py'), json.dumps(args)], cwd=work,
                env={**clean, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': args['cache']})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report['public']) > 50 and set(report['public']) - set(report['used']) == set()
    site = str(venv_python.parent.parent)
    assert all(path.startswith(site) for path in report['files'].values()), report['files']
    committed = {p.name: p.read_text(encoding='utf-8') for p in (ROOT / 'hub_cards').glob('*.md')}
    rendered = {p.name: p.read_text(encoding='utf-8') for p in (work / 'cards').glob('*.md')}
    assert rendered == committed and committed
    readme = (ROOT / 'README.md').read_text()
    block = readme.split('<!-- BEGIN weights -->\n')[1].split('\n<!-- END weights -->')[0]
    assert (work / 'table.md').read_text() == block
