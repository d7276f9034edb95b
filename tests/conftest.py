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
    import httpx
    t0 = time.time()
    while True:
        if proc.poll() is not None: raise RuntimeError(f'{what} died: {Path(log_path).read_text()[-3000:]}')
        try:
            if httpx.get(url, timeout=2).status_code == 200: return
        except httpx.HTTPError: pass
        if time.time() - t0 > timeout: raise RuntimeError(f'{what} did not start in {timeout:.0f} s')
        time.sleep(poll)


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

def free_port() -> int:
    "A TCP port free on 127.0.0.1 now."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class PgServer:
    """A throw-away PostgreSQL cluster (Debian's `postgresql` package): `initdb` + `pg_ctl` in a temp folder, as an
    unprivileged user (PostgreSQL refuses to run as root), listening on a free loopback port, trust auth for `biovis`."""
    def __init__(self):
        import pwd, shutil, tempfile
        bins = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb')) or [Path(p) for p in [shutil.which('initdb')] if p]
        if not bins: pytest.skip('PostgreSQL is not installed (apt-get install postgresql)')
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix='biovis-pg-'))
        self.as_user = []
        if os.geteuid() == 0:           # run the server as the package's `postgres` user (or nobody)
            user = next((u for u in ('postgres', 'nobody') if _has_user(u)), None)
            pw = pwd.getpwnam(user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ['runuser', '-u', user, '--']
        self.port, self.data = free_port(), self.dir/'data'
        self._pg('initdb', '-D', self.data, '-U', 'biovis', '--auth=trust', '-E', 'UTF8', '--no-sync')
        self._pg('pg_ctl', '-D', self.data, '-l', self.dir/'log', '-w', '-t', '60', '-o',
                 f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.dir}' -c max_connections=200",
                 'start')
        self._n = 0

    def _pg(self, tool, *args):
        r = subprocess.run([*self.as_user, str(self.bin/tool), *map(str, args)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = (self.dir/'log').read_text()[-2000:] if (self.dir/'log').exists() else ''
            raise RuntimeError(f'{tool} failed ({r.returncode}): {r.stderr[-2000:]}{log}')
        return r

    def url(self, db: str = 'postgres') -> str:
        return f'postgresql+psycopg://biovis@127.0.0.1:{self.port}/{db}'

    def new_database(self) -> str:
        "A fresh, empty database; returns its SQLAlchemy URL."
        import psycopg
        self._n += 1
        name = f't{os.getpid()}_{self._n}'
        with psycopg.connect(f'host=127.0.0.1 port={self.port} user=biovis dbname=postgres', autocommit=True) as c:
            c.execute(f'CREATE DATABASE {name}')
        return self.url(name)

    def stop(self):
        import shutil
        try: self._pg('pg_ctl', '-D', self.data, '-m', 'fast', '-w', 'stop')
        except Exception: pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name):
    import pwd
    try: pwd.getpwnam(name); return True
    except KeyError: return False


@pytest.fixture(scope='session')
def pg_server():
    "One PostgreSQL server per test session (per xdist worker); each test that needs one makes its own database on it."
    srv = PgServer()
    yield srv
    srv.stop()


def local_nginx_conf(d: Path, hosts: list, port: int, extra_api: str = '') -> Path:
    """deploy/nginx/nginx.conf (what a team runs) for a test: its two hosts replaced by `hosts` ('127.0.0.1:PORT'), listening
    on `port`, its pid, logs and temporary files in `d`; `extra_api` added to the API's location. Returns the file."""
    import re
    conf = (ROOT/'deploy'/'nginx'/'nginx.conf').read_text()
    conf = conf.replace('biovis-1:7860', hosts[0]).replace('biovis-2:7860', hosts[1]).replace('listen 80;', f'listen 127.0.0.1:{port};')
    conf = re.sub(r'^pid .*?;', f'pid {d}/nginx.pid;', conf, flags=re.M)
    conf = conf.replace('access_log /dev/stdout;', f'access_log {d}/access.log;').replace('error_log /dev/stderr warn;', f'error_log {d}/error.log warn;')
    (d/'tmp').mkdir(parents=True, exist_ok=True)
    os.chmod(d/'tmp', 0o777)              # nginx's workers run as nobody when the master runs as root
    conf = conf.replace('http {', 'http {\n' + ''.join(f'    {k}_temp_path {d}/tmp/{k};\n' for k in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi')), 1)
    if extra_api:
        conf = conf.replace('            proxy_pass http://biovis_api;\n', f'            proxy_pass http://biovis_api;\n            {extra_api}\n', 1)
    (d/'nginx.conf').write_text(conf)
    return d/'nginx.conf'
