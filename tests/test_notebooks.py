"The notebooks are the source: clean, in sync with the library, and each runs top to bottom."
import filecmp, importlib, io, os, pkgutil, shutil, subprocess, sys
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


@pytest.fixture(scope='session')
def biovis_modules():
    "Every biovis module, imported once per worker before any notebook runs (so that `module_tables` sees all of them)."
    import biovis
    for m in pkgutil.walk_packages(biovis.__path__, 'biovis.'):
        if '.migrations' not in m.name: importlib.import_module(m.name)      # (Alembic's env.py runs only under Alembic)
    return [m for n, m in sys.modules.items() if n == 'biovis' or n.startswith('biovis.')]


def _tables(modules) -> list:
    "The module-level dicts, lists and sets of `modules`: the registries a notebook's export cells add to when it runs them again."
    return [(o, o.copy()) for m in modules for k, o in vars(m).items() if type(o) in (dict, list, set) and not k.startswith('__')]


@pytest.fixture
def clean_process(tmp_path, biovis_modules):
    """What a notebook sees and leaves behind: a private BIOVIS_HOME and no other BIOVIS_* variable; afterwards the
    environment, the working directory, PyTorch's thread count and every biovis registry are put back (a notebook's export cells register their own
    copies of the classes, `@register_kind` say, which must not outlive it)."""
    import torch
    saved, cwd, tables, threads = dict(os.environ), os.getcwd(), _tables(biovis_modules), torch.get_num_threads()
    for k in [k for k in os.environ if k.startswith('BIOVIS_')]: del os.environ[k]
    os.environ['BIOVIS_HOME'] = str(tmp_path)
    yield tmp_path
    os.environ.clear(); os.environ.update(saved); os.chdir(cwd); torch.set_num_threads(threads)
    for o, before in tables:
        o.clear()
        if isinstance(o, list): o.extend(before)
        else: o.update(before)


@pytest.mark.parametrize('nb', NBS + TUTORIALS)
def test_notebook_runs(nb, clean_process, monkeypatch):
    """Each notebook, module or tutorial (nbs/tutorials/, found by its file name), runs top to bottom as `nbdev-test` runs it
    (nbdev's own `test_nb`, the `tst_flags` cells skipped), but in this worker process: PyTorch, fastai and Gradio are
    imported once per worker instead of once per notebook (7 s of CPU each), which is what made the notebook runs slow."""
    from nbdev.config import get_config
    from nbdev.test import test_nb
    cfg = get_config(ROOT)
    flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags or [])
    fn = ROOT/'nbs'/nb if (ROOT/'nbs'/nb).exists() else ROOT/'nbs'/'tutorials'/nb
    if 'sys.modules' in fn.read_text():          # it checks what importing loads: only a fresh process can tell
        r = subprocess.run([BIN/'nbdev-test', '--file-glob', nb], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return
    err = io.StringIO()
    monkeypatch.setattr(sys, '__stderr__', err)          # where test_nb writes the failing cell's traceback
    ok, secs = test_nb(fn, skip_flags=flags, basepath=cfg.config_path, cell_timeout=600)
    print(f'{nb}: {secs:.1f} s')
    assert ok, err.getvalue()[-6000:]
