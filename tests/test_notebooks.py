"The notebooks are the source: clean, in sync with the library, and each runs top to bottom."
import filecmp, shutil, subprocess, sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent
NBS = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))
TUTORIALS = sorted(p.name for p in (ROOT/'nbs'/'tutorials').glob('*.ipynb'))


def _copy_project(dest):
    for f in ('pyproject.toml', 'settings.ini', 'setup.py', 'README.md'): shutil.copy(ROOT/f, dest/f)
    shutil.copytree(ROOT/'nbs', dest/'nbs'); shutil.copytree(ROOT/'biovis', dest/'biovis', ignore=shutil.ignore_patterns('__pycache__'))


def test_notebooks_are_clean(tmp_path):
    _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev-clean'], cwd=tmp_path, check=True, capture_output=True)
    changed = [n for n in NBS + [f'tutorials/{t}' for t in TUTORIALS] if not filecmp.cmp(ROOT/'nbs'/n, tmp_path/'nbs'/n, shallow=False)]
    assert not changed, f'nbdev-clean would change {changed}: run nbdev-clean and commit'


def test_library_is_exported_from_notebooks(tmp_path):
    _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev-export'], cwd=tmp_path, check=True, capture_output=True)
    py = sorted(p.relative_to(ROOT) for p in (ROOT/'biovis').rglob('*.py') if '__pycache__' not in p.parts)
    changed = [str(p) for p in py if not filecmp.cmp(ROOT/p, tmp_path/p, shallow=False)]
    new = sorted(set(p.relative_to(tmp_path) for p in (tmp_path/'biovis').rglob('*.py') if '__pycache__' not in p.parts) - set(py))
    assert not changed and not new, f'nbdev-export changes {changed} / adds {new}: export and commit'


def test_readme_is_generated_from_index():
    r = subprocess.run([BIN/'jupyter', 'nbconvert', '--to', 'markdown', '--stdout', ROOT/'nbs'/'index.ipynb'],
                       capture_output=True, text=True, check=True)
    assert r.stdout == (ROOT/'README.md').read_text(), 'README.md is out of date: regenerate it from nbs/index.ipynb'


@pytest.mark.parametrize('nb', NBS + TUTORIALS)
def test_notebook_runs(nb, tmp_path):
    "Each notebook, module or tutorial (nbs/tutorials/, found by its file name), runs top to bottom under nbdev-test."
    env = {k: v for k, v in __import__('os').environ.items() if not k.startswith('BIOVIS_')}
    env['BIOVIS_HOME'] = str(tmp_path)
    r = subprocess.run([BIN/'nbdev-test', '--file-glob', nb, '--do-print'], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
