"Shared fixtures: a private biovis home per test, the shipped sample, a model trained once per session."
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent/'shared'/'data'
BIOVIS = Path(sys.executable).parent/'biovis'   # the installed console script


@pytest.fixture
def home(tmp_path, monkeypatch):
    "A fresh BIOVIS_HOME with its own registry and reports; the full data set hidden."
    monkeypatch.setenv('BIOVIS_HOME', str(tmp_path))
    for v in ('BIOVIS_MODELS', 'BIOVIS_REPORTS', 'BIOVIS_DATA'): monkeypatch.delenv(v, raising=False)
    return tmp_path


def run_cli(*args, home=None, env=None, timeout=900, check=None):
    "Run the real `biovis` command; returns the CompletedProcess."
    e = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    if home is not None: e['BIOVIS_HOME'] = str(home)
    e.update(env or {})
    r = subprocess.run([str(BIOVIS), *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout,
                       cwd=str(home or ROOT))
    if check is not None and r.returncode != check:
        raise AssertionError(f'biovis {" ".join(map(str, args))} exited {r.returncode}, expected {check}\n'
                             f'stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}')
    return r


@pytest.fixture(scope='session')
def sample_ds():
    from biovis.data import load_dataset
    return load_dataset('sample')


@pytest.fixture(scope='session')
def trained(tmp_path_factory, sample_ds):
    "A model trained for a few epochs on the sample, registered and promoted: (registry, learner, evaluation)."
    from biovis.registry import ModelRegistry
    from biovis.workflow import train_and_register
    reg = ModelRegistry(tmp_path_factory.mktemp('registry'))
    learn, ev, v = train_and_register(sample_ds, name='blood', epochs=8, registry=reg, progress=False, promote='always')
    return reg, learn, ev


@pytest.fixture(scope='session')
def predictor(trained):
    from biovis.inference import Predictor
    return Predictor.from_registry('blood', registry=trained[0], device='cpu')
