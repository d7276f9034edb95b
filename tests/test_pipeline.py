"Scheduled retraining end to end: the real `biovis` command, a real feedback store, papermill, W&B offline runs read back."
import io, json, shutil, subprocess, sys, time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, BIOVIS, run_cli

NAME = 'bloodmnist'


@pytest.fixture(scope='module')
def base_models(tmp_path_factory):
    "A registry holding one weak production model (1 epoch on the sample), copied into each test's home."
    from biovis.data import load_dataset
    from biovis.registry import ModelRegistry
    from biovis.workflow import train_and_register
    root = tmp_path_factory.mktemp('base')/'models'
    train_and_register(load_dataset('sample'), name=NAME, epochs=1, registry=ModelRegistry(root), progress=False,
                       promote='always', tta=False)
    return root


@pytest.fixture
def rhome(home, base_models):
    shutil.copytree(base_models, home/'models')
    return home


def _store(home):
    from biovis.feedback import FeedbackStore
    return FeedbackStore(f"sqlite:///{home/'data'/'biovis.db'}", uploads_dir=home/'data'/'uploads')


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def _seed(home, n_new, n_test=0):
    "Corrections of `n_new` images not in the sample (mirrored training images) and `n_test` test images; returns (store, images, labels)."
    from biovis.data import load_dataset
    ds, st = load_dataset('sample'), _store(home)
    tr, te = ds.idxs('train'), ds.idxs('test')
    imgs = [np.ascontiguousarray(ds.array[i][:, ::-1]) for i in tr[:n_new]] + [ds.array[i] for i in te[:n_test]]
    labels = [ds.classes[int(l)] for l in ds.labels[tr[:n_new]]] + [ds.classes[int(l)] for l in ds.labels[te[:n_test]]]
    pids = []
    for a, lab in zip(imgs, labels):
        sha = st.save_image(_png(a))
        pid = st.log_prediction(NAME, 'v1', sha, ds.classes[0], {c: 1 / len(ds.classes) for c in ds.classes})
        st.add_feedback(pid, lab); pids.append(pid)
    return st, imgs, labels, pids


def _registry_state(home):
    from biovis.registry import ModelRegistry
    reg = ModelRegistry(home/'models')
    return reg.versions(NAME), reg.aliases(NAME)


def test_below_threshold_does_nothing(rhome):
    _seed(rhome, 5)
    before = _registry_state(rhome)
    r = run_cli('retrain', home=rhome, env={'BIOVIS_FB_THRESH': '20'}, check=0)
    assert 'skip: 5 new feedback' in r.stdout and '< FB_THRESH 20' in r.stdout
    assert _registry_state(rhome) == before
    assert not (rhome/'reports'/'runs').exists() or not list((rhome/'reports'/'runs').glob('*/retrain.ipynb'))


def test_drift_flag_triggers_retrain(rhome):
    st, *_ = _seed(rhome, 2)
    st.record_drift(NAME, 'v1', detected=False, report={'p': 0.5})
    r = run_cli('retrain', '--dry-run', home=rhome, env={'BIOVIS_FB_THRESH': '20'}, check=0)
    assert 'skip' in r.stdout                                  # a check that found no drift is no trigger
    st.record_drift(NAME, 'v1', detected=True, report={'p': 1e-6})
    r = run_cli('retrain', '--dry-run', home=rhome, env={'BIOVIS_FB_THRESH': '20'}, check=0)
    assert 'proceed: drift flagged (1 flag(s)); 2 new feedback' in r.stdout


def test_retrain_end_to_end(rhome):
    from biovis.data import load_dataset, from_npz
    from biovis.registry import ModelRegistry
    from biovis.tracking import read_run, epoch_metrics
    st, imgs, labels, pids = _seed(rhome, 22, n_test=3)
    st.add_feedback(pids[0], 'platelet')                       # a second correction of one image: the latest wins
    env = {'BIOVIS_FB_THRESH': '20'}
    t0 = time.time()
    r = run_cli('retrain', '--epochs', '2', '--no-tta', '--json', home=rhome, env=env, check=0)
    res = json.loads(r.stdout)
    assert res['status'] == 'done' and res['decision']['new_feedback'] == 26 and res['version'] == 'v2'
    # the dataset version: base + corrections, deduplicated, latest label, holdout untouched
    info = res['dataset']
    assert info['feedback']['added'] == 22 and info['feedback']['in_holdout'] == 3 and info['feedback']['images'] == 25
    ds = from_npz(info['path'], classes=info['classes'])
    base = load_dataset('sample')
    assert ds.version == info['version'] == res['dataset_version']
    assert (Path(info['path']).parent/'manifest.csv').read_text().startswith(f"# dataset {NAME} version {ds.version}")
    xt, yt = ds.tensors('test'); bt, byt = base.tensors('test')
    assert np.array_equal(xt, bt) and np.array_equal(yt, byt)
    x, y = ds.tensors('train')
    assert len(y) == (base.splits == 'train').sum() + 22
    hit = [i for i in range(len(x)) if np.array_equal(x[i], imgs[0])]
    assert len(hit) == 1 and ds.classes[y[hit[0]]] == 'platelet'
    # the executed notebook and its HTML, with the evaluation figures
    run_dir = Path(res['run_dir'])
    assert run_dir.parent == rhome/'reports'/'runs'
    nb = nbformat.read(run_dir/'retrain.ipynb', as_version=4)
    assert nb.metadata['papermill']['parameters']['epochs'] == 2
    assert not [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
    html = (run_dir/'retrain.html').read_text()
    for s in ('Confusion matrix', 'Per-class metrics', 'Reliability (ECE', 'candidate against production'.capitalize()):
        assert s in html, s
    # the W&B offline run, read back from its .wandb file
    wb = read_run(res['wandb_dir'])
    assert Path(res['wandb_dir']).is_relative_to(rhome/'reports') and Path(res['wandb_dir']).name.startswith('offline-run-')
    assert wb['config']['dataset_version'] == ds.version and len(wb['config']['git_commit'] or 'x' * 40) == 40
    acc = epoch_metrics(wb)
    assert [e for e, _ in acc] == [1, 2] and abs(acc[-1][1] - res['epochs'][-1]['accuracy']) < 1e-6
    assert abs(wb['summary']['test/accuracy'] - res['metrics']['accuracy']) < 1e-9
    sm = wb['summary']
    assert sm['test/per_class/_type'] == 'table-file' and sm['test/samples/nrows'] == 16 and sm['test/confusion_matrix_table/nrows'] > 0
    pc = json.loads((Path(res['wandb_dir'])/'files'/sm['test/per_class/path']).read_text())
    assert [row[0] for row in pc['data']] == ds.classes and 'recall' in pc['columns']
    arts = [a for a in wb['artifacts'] if a['type'] == 'model']
    assert arts and {'candidate', 'production', 'registry-v2'} <= set(arts[0]['aliases'])
    # the registry: candidate v2, promoted over the weaker v1, with the feedback cut-off recorded
    reg = ModelRegistry(rhome/'models')
    al = reg.aliases(NAME)
    assert res['promoted'] and al['candidate'] == 'v2' and al['production'] == 'v2'
    meta = reg.metadata(NAME, 'v2')
    assert meta['dataset']['version'] == ds.version and meta['retrain']['feedback_until'] and meta['promotion']['production_version'] == 'v1'
    # the paired tests: on the holdout (decided on) and on the 25 verified corrections (reported), in the reason and the alias log
    prom = meta['promotion']
    assert prom['paired']['n'] == len(yt) and prom['feedback_set']['n'] == 25 and 'McNemar p=' in res['reason']
    entry = [e for e in reg.history(NAME) if (e['action'], e['version']) == ('promote', 'v2')][-1]
    assert entry['detail']['holdout']['mcnemar_p'] == prom['paired']['mcnemar']['p_value'] and entry['detail']['feedback_set']['n'] == 25
    print(f'retrain run: {time.time() - t0:.1f} s')
    # nothing new since: the next check does nothing
    r = run_cli('retrain', home=rhome, env=env, check=0)
    assert 'skip: 0 new feedback' in r.stdout and reg.versions(NAME) == ['v1', 'v2']
    # a candidate that is worse than production by more than the margin stays a candidate, and says why
    r = run_cli('retrain', '--force', '--epochs', '1', '--no-tta', '--margin', '-1', home=rhome, env=env, check=0)
    assert 'production unchanged' in r.stdout and 'worse than production' in r.stdout
    al = reg.aliases(NAME)
    assert al['candidate'] == 'v3' and al['production'] == 'v2'
    # the comparison report of the runs, and the offline runs waiting for a sync
    r = run_cli('report', 'runs', home=rhome, check=0)
    cmp = json.loads((rhome/'reports'/'runs'/'compare.json').read_text())
    assert [c['version'] for c in cmp] == ['v2', 'v3'] and (rhome/'reports'/'runs'/'compare.html').stat().st_size > 100_000
    assert len(cmp[0]['epochs']) == 2
    r = run_cli('wandb', 'sync', '--dry-run', home=rhome, check=0)
    assert '2 offline run(s) to sync' in r.stdout
    # rollback restores the previous production
    run_cli('models', 'rollback', NAME, home=rhome, check=0)
    assert reg.aliases(NAME)['production'] == 'v1'


def test_failing_notebook_exits_nonzero_and_registers_nothing(rhome, tmp_path):
    "The notebook registers a version and then raises: the run fails and the registry is as it was."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# parameters\nname = 'x'\nregistry = None"),
                nbformat.v4.new_code_cell('from biovis.registry import ModelRegistry\nfrom biovis.kinds import load_model\nreg = ModelRegistry(registry)\n'
                                          'm, meta = load_model(name, registry=reg)\nprint(reg.register(name, m, meta))'),
                nbformat.v4.new_code_cell("raise RuntimeError('boom in the pipeline')")]
    bad = tmp_path/'bad.ipynb'; nbformat.write(nb, bad)
    before = _registry_state(rhome)
    r = run_cli('retrain', '--force', '--notebook', bad, home=rhome)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'boom in the pipeline' in r.stderr
    assert _registry_state(rhome) == before
    runs = list((rhome/'reports'/'runs').glob('*/bad.html'))
    assert len(runs) == 1 and 'boom in the pipeline' in runs[0].read_text()
    assert not list(runs[0].parent.glob('result.json'))


def test_concurrent_retrain_refuses_or_waits(rhome):
    from biovis.pipeline import retrain_lock
    from biovis.registry import ModelRegistry
    before = _registry_state(rhome)
    with retrain_lock(NAME, ModelRegistry(rhome/'models')):
        r = run_cli('retrain', '--force', home=rhome)
        assert r.returncode == 1 and 'another retrain' in r.stderr and f'pid ' in r.stderr
        t0 = time.time()
        r = run_cli('retrain', '--force', '--wait', '2', home=rhome)
        assert r.returncode == 1 and 'another retrain' in r.stderr and time.time() - t0 >= 2
    assert _registry_state(rhome) == before


def test_schedule_logs_each_decision(rhome):
    _seed(rhome, 3)
    r = run_cli('schedule', '--every', '1s', '--max-runs', '2', home=rhome, env={'BIOVIS_FB_THRESH': '20'}, check=0)
    recs = [json.loads(l) for l in (rhome/'reports'/'runs'/'schedule.log').read_text().splitlines()]
    assert [x['status'] for x in recs] == ['skipped', 'skipped'] and '3 new feedback' in recs[0]['reason']
    r = run_cli('schedule', '--cron', 'not a cron', '--max-runs', '1', home=rhome)
    assert r.returncode == 3 and 'bad cron expression' in r.stderr
    assert len((rhome/'reports'/'runs'/'schedule.log').read_text().splitlines()) == 2     # nothing was checked


def test_airflow_dag_file_compiles():
    src = (ROOT/'apps'/'airflow_retrain_dag.py').read_text()
    compile(src, 'airflow_retrain_dag.py', 'exec')
    assert 'PapermillOperator' in src and 'retrain.ipynb' in src


def test_distributed_training_two_cpu_processes(home):
    "fastai DDP through torchrun: two CPU processes, gloo, sharded epochs, identical replicas, gathered metrics."
    torchrun = Path(sys.executable).parent/'torchrun'
    e = {k: v for k, v in __import__('os').environ.items() if not k.startswith('BIOVIS_')}
    e.update(BIOVIS_HOME=str(home), OMP_NUM_THREADS='1')
    r = subprocess.run([str(torchrun), '--standalone', '--nproc_per_node', '2', str(BIOVIS), 'pipeline', 'distributed',
                        '--epochs', '1', '--out', str(home)], capture_output=True, text=True, env=e, cwd=str(home), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((home/'distributed.json').read_text())
    assert rec['world_size'] == 2 and rec['backend'] == 'gloo' and rec['replicas_identical'] is True
    assert rec['batches_per_epoch_per_rank'] == 8 and len(rec['valid_accuracy']) == 1 and rec['test']['n'] == 320
    out = r.stdout + r.stderr
    assert 'rank 0/2: backend gloo' in out and 'rank 1/2: backend gloo' in out


def test_killed_retrain_leaves_registry_and_lock(rhome):
    "SIGKILL the whole retrain (CLI and kernel) while the notebook trains: the registry is as it was and the lock is free."
    import os, signal
    from biovis.pipeline import retrain_lock
    from biovis.registry import ModelRegistry
    before = _registry_state(rhome)
    e = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    e['BIOVIS_HOME'] = str(rhome)
    p = subprocess.Popen([str(BIOVIS), 'retrain', '--force', '--epochs', '3', '--no-tta'], cwd=str(rhome), env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not list((rhome/'reports'/'runs').glob('*/params.json')) and time.time() - t0 < 120: time.sleep(0.2)
        assert p.poll() is None, 'the retrain ended before it could be killed'
        time.sleep(3)                                              # papermill has started the kernel
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait(timeout=30)
    assert _registry_state(rhome) == before
    with retrain_lock(NAME, ModelRegistry(rhome/'models')): pass  # the kernel released the dead process's lock
    assert not list((rhome/'models'/NAME).glob('v*/')) or ModelRegistry(rhome/'models').versions(NAME) == before[0]
