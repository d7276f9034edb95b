"biovis.registry: versions, aliases, rollback, delete; atomic under kill -9 and concurrent writers."
import json, os, signal, subprocess, sys, textwrap, time

import pytest
import torch

from biovis.models import create_model
from biovis.registry import ModelRegistry, RegistryError, ModelNotFoundError
from biovis.kinds import load_model
from conftest import run_cli

META = dict(arch='cnn_small', classes=['a', 'b', 'c'], input_size=[28, 28], channels=3, metrics=dict(accuracy=0.5))


def test_versions_aliases_rollback(tmp_path):
    reg = ModelRegistry(tmp_path)
    vs = [reg.register('m', create_model('cnn_small', 3), META) for _ in range(3)]
    assert vs == ['v1', 'v2', 'v3'] and reg.versions('m') == vs
    assert reg.aliases('m')['candidate'] == 'v3'
    with pytest.raises(ModelNotFoundError, match='no production'): reg.resolve('m')
    reg.promote('m', 'v1'); reg.promote('m', 'v2'); reg.promote('m', '3')
    assert reg.resolve('m') == 'v3'
    assert reg.rollback('m') == 'v2' and reg.rollback('m') == 'v1'
    with pytest.raises(RegistryError, match='no earlier'): reg.rollback('m')
    with pytest.raises(ModelNotFoundError): reg.resolve('m', 'v9')
    with pytest.raises(ModelNotFoundError): reg.resolve('other')
    with pytest.raises(RegistryError, match='invalid model name'): reg.register('../evil', create_model('cnn_small', 3), META)


def test_metadata_and_card(tmp_path):
    reg = ModelRegistry(tmp_path)
    v = reg.register('m', create_model('cnn_small', 3), dict(META, dataset=dict(version='abc123', name='d')))
    m = reg.metadata('m', v)
    for k in ('classes', 'input_size', 'channels', 'arch', 'backend', 'created', 'git_commit', 'weights_sha256',
              'dataset', 'metrics', 'biovis_version', 'torch_version'):
        assert k in m, k
    card = (reg.path('m', v)/'MODEL_CARD.md').read_text()
    assert 'Model card: m v1' in card and 'not be used for diagnosis' in card


def test_loaded_model_equals_saved(tmp_path):
    reg = ModelRegistry(tmp_path)
    model = create_model('cnn_small', 3).eval()
    v = reg.register('m', model, META)
    loaded, _ = load_model('m', v, registry=reg)
    x = torch.rand(4, 3, 28, 28)
    assert torch.allclose(model(x), loaded(x))


def test_delete_rules_and_rollback_skips_deleted(tmp_path):
    reg = ModelRegistry(tmp_path)
    for _ in range(3): reg.register('m', create_model('cnn_small', 3), META, alias=None)
    reg.promote('m', 'v1'); reg.promote('m', 'v2'); reg.promote('m', 'v3')
    with pytest.raises(RegistryError, match='production'): reg.delete('m', 'v3')
    reg.delete('m', 'v2')
    assert reg.versions('m') == ['v1', 'v3'] and reg.rollback('m') == 'v1'


def test_corrupt_or_missing_weights_refused(tmp_path):
    reg = ModelRegistry(tmp_path)
    v = reg.register('m', create_model('cnn_small', 3), META)
    w = reg.path('m', v)/'model.pt'
    data = w.read_bytes(); w.write_bytes(data[:-10])
    with pytest.raises(RegistryError, match='SHA-256'): load_model('m', v, registry=reg)
    w.unlink()
    with pytest.raises(RegistryError, match='missing'): load_model('m', v, registry=reg)


_WRITER = textwrap.dedent('''
    import sys, torch
    from biovis.models import create_model
    from biovis.registry import ModelRegistry
    reg = ModelRegistry(sys.argv[1])
    meta = dict(arch='cnn_wide', classes=['a', 'b'], input_size=[28, 28], channels=3)
    m = create_model('cnn_wide', 2)
    print('ready', flush=True)
    while True:
        v = reg.register('m', m, meta)
        reg.promote('m', v)
''')


def _check_consistent(reg):
    al = reg.aliases('m')
    log = reg.history('m')
    for a in ('production', 'candidate'):       # the alias log agrees with the aliases: a move and its entry are one write
        moves = [e for e in log if e['alias'] == a]
        assert (moves[-1]['version'] if moves else None) == al.get(a), (a, al, moves[-1:])
    for v in reg.versions('m'):
        model, meta = load_model('m', v, registry=reg)     # every listed version is whole and its weights verify
        assert meta['version'] == v
    for a in ('production', 'candidate'):
        if a in al: assert al[a] in reg.versions('m')


def test_killed_writer_never_leaves_a_half_version(tmp_path):
    "kill -9 a process that registers and promotes in a loop, at several moments: the registry stays consistent."
    reg = ModelRegistry(tmp_path/'reg')
    for delay in (0.3, 0.7, 1.1, 1.6, 2.2):
        p = subprocess.Popen([sys.executable, '-c', _WRITER, str(reg.root)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == 'ready'
        time.sleep(delay)
        p.send_signal(signal.SIGKILL); p.wait()
        _check_consistent(reg)
    assert len(reg.versions('m')) >= 1
    reg.gc()
    assert not [d for d in (reg.root/'m').iterdir() if d.name.startswith(('.staging', '.trash'))]


def test_concurrent_writers_get_distinct_versions(tmp_path):
    code = textwrap.dedent('''
        import sys
        from biovis.models import create_model
        from biovis.registry import ModelRegistry
        reg = ModelRegistry(sys.argv[1])
        meta = dict(arch='cnn_small', classes=['a', 'b'], input_size=[28, 28], channels=3)
        print(' '.join(reg.register('m', create_model('cnn_small', 2), meta) for _ in range(5)))
    ''')
    ps = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    got = [v for p in ps for v in p.communicate(timeout=300)[0].split()]
    assert sorted(got, key=lambda v: int(v[1:])) == [f'v{i}' for i in range(1, 16)]
    assert ModelRegistry(tmp_path).versions('m') == [f'v{i}' for i in range(1, 16)]


def test_alias_log_who_why_metrics(tmp_path):
    "Every alias move is logged with time, action, who, why and the metrics of the version it points to."
    reg = ModelRegistry(tmp_path)
    v1 = reg.register('m', create_model('cnn_small', 3), META)
    v2 = reg.register('m', create_model('cnn_small', 3), dict(META, metrics=dict(accuracy=0.9, auc=0.99, note='text')))
    reg.promote('m', v1, reason='first')
    reg.promote('m', v2, by='ana@clinic', reason='better on the holdout')
    reg.promote('m', v2)                                            # no move, no entry
    reg.rollback('m', reason='v2 misreads smears from the new scanner')
    reg.delete('m', v2, force=True)
    log = reg.history('m')
    assert [(e['action'], e['alias'], e['version'], e['previous']) for e in log] == [
        ('register', 'candidate', 'v1', None), ('register', 'candidate', 'v2', 'v1'), ('promote', 'production', 'v1', None),
        ('promote', 'production', 'v2', 'v1'), ('rollback', 'production', 'v1', 'v2'), ('delete', 'candidate', None, 'v2')]
    assert log[3]['by'] == 'ana@clinic' and log[3]['reason'] == 'better on the holdout'
    assert log[3]['metrics'] == dict(accuracy=0.9, auc=0.99)                 # numbers only
    assert log[2]['by'].endswith(f'pid {os.getpid()}') and '@' in log[2]['by']
    assert all(e['time'].endswith('+00:00') for e in log) and 'log' not in reg.aliases('m')
    assert reg.aliases('m')['production'] == 'v1' and 'candidate' not in reg.aliases('m')


def test_cli_models_commands(tmp_path):
    reg = ModelRegistry(tmp_path/'models')
    for _ in range(2): reg.register('m', create_model('cnn_small', 3), META)
    r = run_cli('models', 'list', home=tmp_path, check=0)
    assert 'v1' in r.stdout and 'v2' in r.stdout and 'candidate' in r.stdout
    run_cli('models', 'promote', 'm', 'v1', home=tmp_path, check=0)
    run_cli('models', 'promote', 'm', 'v2', home=tmp_path, check=0)
    r = run_cli('models', 'rollback', 'm', home=tmp_path, check=0)
    assert 'v1' in r.stdout and reg.resolve('m') == 'v1'
    assert json.loads(run_cli('models', 'show', 'm', home=tmp_path, check=0).stdout)['version'] == 'v1'
    assert 'Model card' in run_cli('models', 'show', 'm', 'v2', '--card', home=tmp_path, check=0).stdout
    assert run_cli('models', 'rollback', 'm', home=tmp_path).returncode == 1        # nothing earlier
    assert run_cli('models', 'delete', 'm', 'v1', home=tmp_path).returncode == 1    # production
    assert run_cli('models', 'delete', 'm', 'v2', home=tmp_path).returncode == 1    # candidate
    run_cli('models', 'delete', 'm', 'v2', '--force', home=tmp_path, check=0)
    assert run_cli('models', 'show', 'm', 'v2', home=tmp_path).returncode == 4
    assert run_cli('models', 'frobnicate', home=tmp_path).returncode == 2
    r = run_cli('models', 'history', 'm', home=tmp_path, check=0)
    assert 'rollback' in r.stdout and 'by hand (biovis models rollback)' in r.stdout
    events = [json.loads(l) for l in run_cli('models', 'history', 'm', '--json', home=tmp_path, check=0).stdout.splitlines()]
    assert [e['action'] for e in events] == ['register', 'register', 'promote', 'promote', 'rollback', 'delete']
