"Shared fixtures: a private biovis home per test, the shipped sample, a model trained once per session; helpers for real servers."
import os, signal, subprocess, sys, time
from pathlib import Path

# Each xdist worker (and what it starts: commands, servers, notebook kernels) gets its share of the cores for PyTorch's and
# OpenBLAS's thread pools, set before either is imported: two workers with a pool of two threads each on two cores run four
# busy threads on two cores, whose OpenMP spin-waits and switches cost more than the second thread earns. `-n 0`: untouched.
if os.environ.get('PYTEST_XDIST_WORKER_COUNT') and 'OMP_NUM_THREADS' not in os.environ:
    os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // int(os.environ['PYTEST_XDIST_WORKER_COUNT'])))

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


_WARM = {}


def _warm_cli():
    "This worker's warm `biovis` process (tests/cli_zygote.py), started on first use; None where it cannot fork safely."
    if 'proc' not in _WARM:
        import atexit, json, threading
        p = subprocess.Popen([sys.executable, str(Path(__file__).with_name('cli_zygote.py'))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                             env={k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')})
        hello = json.loads(p.stdout.readline() or '{}')
        if not hello.get('ready'):
            print(f'warm biovis process not usable ({hello}): every command starts afresh', file=sys.stderr)
            p.kill(); p = None
        else: atexit.register(_close_warm, p)
        _WARM['proc'], _WARM['lock'] = p, threading.Lock()
    return _WARM['proc']


def _close_warm(p):
    "At exit: the warm process kills the servers still running (a failed test's) and ends; killed if it takes over 30 s."
    try: p.stdin.close(); p.wait(30)
    except Exception: p.kill()


def _ask(req: dict) -> dict:
    "One request to the warm process, one answer (a lock: tests may call from threads)."
    import json
    with _WARM['lock']:
        _WARM['proc'].stdin.write(json.dumps(req) + '\n'); _WARM['proc'].stdin.flush()
        return json.loads(_WARM['proc'].stdout.readline())


class WarmProcess:
    "A `biovis` command left running (a server), forked by the warm process: the part of `subprocess.Popen` the tests use."
    def __init__(self, args, env, cwd, log_path):
        self.args, self.returncode = [str(BIOVIS), *args], None
        self.pid = _ask(dict(op='spawn', args=list(args), env=env, cwd=cwd, out=str(log_path), err=str(log_path)))['pid']
    def poll(self):
        if self.returncode is None: self.returncode = _ask(dict(op='poll', pid=self.pid))['code']
        return self.returncode
    def wait(self, timeout=None):
        if self.returncode is None:
            r = _ask(dict(op='wait', pid=self.pid, timeout=1e9 if timeout is None else timeout))
            if r['timed_out']: raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = r['code']
        return self.returncode
    def send_signal(self, sig):
        if self.returncode is None: _ask(dict(op='signal', pid=self.pid, sig=int(sig)))
    def terminate(self): self.send_signal(signal.SIGTERM)
    def kill(self): self.send_signal(signal.SIGKILL)


def spawn_cli(*args, env, cwd, log):
    """`biovis ARGS` left running (a server), its output appended to the file `log` (a path or an open file): forked by the
    warm process like `run_cli`'s commands, else a new process. Returns a `subprocess.Popen` or a `WarmProcess`."""
    args, log_path = [str(a) for a in args], Path(getattr(log, 'name', log))
    if _warm_cli() is None:
        out = log if hasattr(log, 'write') else open(log_path, 'a')
        return subprocess.Popen([str(BIOVIS), *args], env=env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT)
    if hasattr(log, 'flush'): log.flush()
    return WarmProcess(args, dict(env), str(cwd), log_path)


def run_cli(*args, home=None, env=None, timeout=900, check=None, fresh=False):
    """Run the real `biovis` command; returns the CompletedProcess. By default the command runs in a child forked from this
    worker's warm process (tests/cli_zygote.py: the console script's entry point, in its own process, with this environment
    and working directory, less the start-up imports); `fresh=True` starts the installed console script itself, for the
    tests of what a new process imports or prints on start."""
    import json, tempfile
    e = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    if home is not None: e['BIOVIS_HOME'] = str(home)
    e.update(env or {})
    args, cwd = [str(a) for a in args], str(home or ROOT)
    warm = None if fresh else _warm_cli()
    if warm is None:
        r = subprocess.run([str(BIOVIS), *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
    else:
        with tempfile.TemporaryDirectory(prefix='biovis-cli-') as d:
            out, err = Path(d)/'stdout', Path(d)/'stderr'
            reply = _ask(dict(op='run', args=args, env=e, cwd=cwd, out=str(out), err=str(err), timeout=timeout))
            stdout, stderr = out.read_text(errors='replace'), err.read_text(errors='replace')
        if reply['timed_out']: raise subprocess.TimeoutExpired([str(BIOVIS), *args], timeout, stdout, stderr)
        r = subprocess.CompletedProcess([str(BIOVIS), *args], reply['code'], stdout, stderr)
    if check is not None and r.returncode != check:
        raise AssertionError(f'biovis {" ".join(args)} exited {r.returncode}, expected {check}\n'
                             f'stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}')
    return r


@pytest.fixture(scope='session')
def sample_ds():
    from biovis.data import load_dataset
    return load_dataset('sample')


@pytest.fixture(scope='session')
def trained(tmp_path_factory, sample_ds):
    """A model trained for a few epochs on the sample, registered and promoted: (registry, learner, evaluation).
    Trained once per test run: the first xdist worker to ask trains it under a file lock, the other loads what it saved (the
    registry folder, the model with its `biovis` metadata, the evaluation). The learner is then the part the tests use:
    `.model` and `.biovis`. Tests only read this registry (copy it to change it)."""
    import pickle, types
    import torch
    from filelock import FileLock
    from biovis.registry import ModelRegistry
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base      # the run's folder, above each worker's
    d = shared/'trained-model'
    with FileLock(str(shared/'trained-model.lock')):
        if not (d/'done').exists():
            from biovis.workflow import train_and_register
            d.mkdir(exist_ok=True)
            learn, ev, v = train_and_register(sample_ds, name='blood', epochs=8, registry=ModelRegistry(d/'registry'),
                                              progress=False, promote='always')
            torch.save(dict(model=learn.model, biovis=learn.biovis), d/'learner.pt')
            (d/'evaluation.pkl').write_bytes(pickle.dumps(ev)); (d/'done').touch()
    saved = torch.load(d/'learner.pt', weights_only=False)
    learn = types.SimpleNamespace(model=saved['model'].eval(), biovis=saved['biovis'])
    return ModelRegistry(d/'registry'), learn, pickle.loads((d/'evaluation.pkl').read_bytes())


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
# `--dist loadfile` (pyproject.toml) with the scheduler below: each test file is one unit of work, run whole on one worker,
# so its module fixtures (a fleet of servers, a built docs site) are made once; the notebook runs are independent and each is
# its own unit. The units are handed out longest first (a rough cost per unit, in seconds on a quiet 2-core machine; the
# rest count as short), so that no long one starts last while the other worker idles.
# (Not `--dist loadgroup` with an xdist_group per file: with pytest 9.2, xdist 3.8 fails to group and spreads every test,
# pytest-xdist issue 1386.)

PER_TEST = {'test_notebooks.py'}
COST = {'02_served_model_to_scheduled_retrain.ipynb': 160, 'test_serve.py': 160, 'test_serve_auth.py': 140, 'test_keras.py': 140,
        'test_docs.py': 120, 'test_pipeline.py': 110, 'test_train.py': 60, 'test_scaleout.py': 60, 'test_cli.py': 50,
        '01_folder_to_served_model.ipynb': 50, 'test_segment_retrain.py': 40, '03_train.ipynb': 40, 'test_registry.py': 40,
        'test_multilabel_serve.py': 40, 'test_observability.py': 40, 'test_feedback.py': 30, '07_workflow.ipynb': 30,
        'test_audit.py': 30, 'test_segment.py': 20, 'test_images_hostile.py': 20, 'test_dashboard.py': 20, 'test_compare.py': 20,
        '09i_bench.safety.ipynb': 20, 'test_policy.py': 20, '09_bench.classification.ipynb': 20, '06_inference.ipynb': 10,
        'test_rough_edges.py': 10, '04_evaluate.ipynb': 10}       # measured: --durations=0 of a whole run, 2 workers, 2026-12-03


def _unit(nodeid: str) -> str:
    "The unit of work of a test: its file, or itself for the independent notebook runs."
    path = nodeid.split('::', 1)[0]
    return nodeid if Path(path).name in PER_TEST else path


def _cost(nodeid: str) -> float:
    name = Path(nodeid.split('::', 1)[0]).name
    nb = nodeid.rsplit('[', 1)[-1].rstrip(']') if name in PER_TEST else name
    return COST.get(nb, 1)


try:
    from xdist.scheduler import LoadFileScheduling

    class FileOrNotebookScheduling(LoadFileScheduling):
        "Each test file is one unit; each notebook run is its own."
        def _split_scope(self, nodeid: str) -> str: return _unit(nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue('dist') == 'loadfile': return FileOrNotebookScheduling(config, log)
except ImportError: pass      # without pytest-xdist everything runs in this process


def pytest_collection_modifyitems(config, items):
    "The longest units first (the order of the items is the order the scheduler hands the units out with `--no-loadscope-reorder`)."
    items.sort(key=lambda it: -_cost(it.nodeid))          # stable: within a unit the file's own order
