"Shared fixtures: a private biovis home per test, the shipped sample, a model trained once per session; helpers for real servers."
import os, subprocess, sys, time
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


def wait_until_up(proc, url: str, log_path, what: str = 'server', timeout: float = 120, poll: float = 0.3):
    "Wait until GET `url` answers 200; RuntimeError with the end of `log_path` if `proc` exits first, or after `timeout` s."
    from biovis.bench.fleet import wait_for
    wait_for(url, proc, timeout=timeout, what=what, log=log_path, poll=poll)


def stop_process(proc, log=None):
    "Terminate `proc` (kill it if it has not exited in 10 s) and close its log file."
    proc.terminate()
    try: proc.wait(10)
    except subprocess.TimeoutExpired: proc.kill()
    if log is not None: log.close()


def add_users(home):
    "The clinicians ana and bo and the admin root, through the real CLI, with the passwords '<name>-secret-pw'."
    for u, role in (('ana', 'clinician'), ('bo', 'clinician'), ('root', 'admin')):
        run_cli('users', 'add', u, '--role', role, home=home, check=0,
                env=dict(BIOVIS_NEW_PASSWORD=f'{u}-secret-pw', BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db'))


# --- a real PostgreSQL server -------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def pg_server():
    "One PostgreSQL server per test session (per xdist worker); each test that needs one makes its own database on it."
    from biovis.bench.fleet import PgCluster, pg_bin
    if pg_bin() is None: pytest.skip('PostgreSQL is not installed (apt-get install postgresql)')
    srv = PgCluster()
    yield srv
    srv.stop()


# --- how the two xdist workers share the suite -------------------------------------------------------------------

PER_TEST = {'test_notebooks.py'}     # independent tests (one notebook run each): spread one by one over the workers


def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup` (pyproject.toml), each test file stays whole on one worker, so its module fixtures (a trained
    model, a fleet of servers, a built docs site) are made once; the notebook runs, each independent and some long, go to
    whichever worker is free."""
    for item in items:
        if item.path.name not in PER_TEST: item.add_marker(pytest.mark.xdist_group(item.path.name))
