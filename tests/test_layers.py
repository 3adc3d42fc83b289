"""The layers of sd_zoo only look down: importing the models loads no Hub, card or command-line code, the model
file explains build errors on its own, and the import-linter contracts of pyproject.toml hold and can fail."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path = ROOT) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SD_ZOO_NO_AUTOIMPORT='1')
    proc = subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_import_sd_zoo_loads_only_the_rule_the_models_and_the_weights_table():
    loaded = json.loads(_python(
        "import json, sys, sd_zoo; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sd_zoo', 'training', 'benchmarks', 'tools'))))"))
    assert loaded == ['sd_zoo', 'sd_zoo._version', 'sd_zoo.load_errors', 'sd_zoo.pretrained', 'sd_zoo.sd_resnet',
                      'sd_zoo.stochastic_depth']


def test_timm_build_errors_are_explained_without_the_hub_layer():
    out = json.loads(_python(
        "import json, sys, timm, sd_zoo\n"
        "try:\n"
        "    timm.create_model('sd_resnet20_cifar.nope', pretrained=True)\n"
        "except Exception as e:\n"
        "    print(json.dumps([type(e).__module__, type(e).__name__, 'sd_zoo.hub' in sys.modules, str(e)]))"))
    module, name, hub_loaded, message = out
    assert (module, name, hub_loaded) == ('sd_zoo.load_errors', 'PretrainedWeightsError', False)
    assert 'sd_resnet152.a1h_in1k' in message  # the available weights are named


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    code = 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())'
    return subprocess.run([sys.executable, '-c', code, '--no-cache'], cwd=tree, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, PYTHONPATH=str(tree)))


def test_import_contracts_hold_and_catch_an_upward_import(tmp_path):
    pytest.importorskip('importlinter', reason='import-linter comes with the dev extra')
    tree = tmp_path / 'tree'
    for name in ('sd_zoo', 'training', 'benchmarks', 'tools'):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns('__pycache__', 'results'))
    shutil.copy(ROOT / 'pyproject.toml', tree)
    kept = _lint_imports(tree)
    assert kept.returncode == 0 and 'Contracts: 2 kept, 0 broken.' in kept.stdout, kept.stdout[-2000:]

    model_file = tree / 'sd_zoo' / 'sd_resnet.py'
    model_file.write_text(model_file.read_text() + '\nfrom .hub import load_weights  # noqa: E402,F401\n')
    cards = tree / 'sd_zoo' / 'cards.py'
    cards.write_text(cards.read_text() + '\nfrom tools import readme  # noqa: E402,F401\n')
    broken = _lint_imports(tree)
    assert broken.returncode != 0 and 'Contracts: 0 kept, 2 broken.' in broken.stdout, broken.stdout[-2000:]
    assert 'sd_zoo.sd_resnet is not allowed to import sd_zoo.hub' in broken.stdout
    assert 'sd_zoo.cards -> tools.readme' in broken.stdout
