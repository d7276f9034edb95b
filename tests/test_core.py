"biovis.core: settings from the environment, atomic writes that survive kill -9."
import json, signal, subprocess, sys, textwrap, time
from pathlib import Path

from biovis.core import get_settings, atomic_write, write_json, read_json


def test_settings_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('BIOVIS_HOME', str(tmp_path)); monkeypatch.setenv('BIOVIS_DATA', '/data/x')
    monkeypatch.setenv('BIOVIS_MODELS', str(tmp_path/'reg'))
    s = get_settings()
    assert s.home == tmp_path and s.data_root == Path('/data/x') and s.models_dir == tmp_path/'reg'
    assert s.reports_dir == tmp_path/'reports'


def test_atomic_write_survives_kill(tmp_path):
    "A process rewriting a 2 MB JSON file in a loop is killed: the file is always one whole version."
    code = textwrap.dedent('''
        import sys
        from biovis.core import write_json
        i = 0
        print('ready', flush=True)
        while True:
            write_json(sys.argv[1], {'i': i, 'pad': 'x' * 2_000_000}); i += 1
    ''')
    f = tmp_path/'state.json'
    for delay in (0.2, 0.45, 0.8):
        p = subprocess.Popen([sys.executable, '-c', code, str(f)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == 'ready'
        time.sleep(delay); p.send_signal(signal.SIGKILL); p.wait()
        d = read_json(f)
        assert len(d['pad']) == 2_000_000
    assert [x.name for x in tmp_path.iterdir() if not x.name.endswith('.tmp')] == ['state.json']
