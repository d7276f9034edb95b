"Drift detection: each test on synthetic windows with known answers, the reference stored at registration, the drift-events table, and end to end: images through the real server, then `biovis drift check`."
import io, json, sqlite3
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import stats

from conftest import run_cli
from biovis.drift import (DriftError, DriftReference, TESTS, class_shift_test, drift_test, ks_test, load_reference,
                          mmd_test)
from biovis.feedback import FeedbackError, FeedbackStore
from biovis.inference import Predictor
from biovis.drift import IMAGE_STATS


def _uniform_ish(ps):
    "p-values of a true null: not piled up near 0, and not distinguishable from uniform."
    ps = np.asarray(ps)
    assert (ps < 0.05).mean() <= 0.2, ps
    assert stats.kstest(ps, 'uniform').pvalue > 0.001, ps


def test_mmd_null_is_uniform_ish_and_a_shift_is_tiny():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16))
    _uniform_ish([mmd_test(ref, rng.normal(size=(100, 16)), n_perm=100, seed=i)['p_value'] for i in range(40)])
    # a mean shift of 0.5 sd in every dimension, and a change of scale only: the smallest p a permutation test can give
    assert mmd_test(ref, rng.normal(0.5, 1, size=(100, 16)), n_perm=200)['p_value'] == pytest.approx(1 / 201)
    assert mmd_test(ref, rng.normal(0, 2, size=(100, 16)), n_perm=200)['p_value'] < 0.01


def test_ks_null_is_uniform_ish_and_a_shift_is_tiny():
    rng = np.random.default_rng(1)
    ref = rng.dirichlet(np.ones(5), size=1000)
    ps = [ks_test(ref, rng.dirichlet(np.ones(5), size=200))['p_value'] for _ in range(60)]
    # Bonferroni over 5 classes: conservative, so no more small p-values than a uniform would give
    assert (np.asarray(ps) < 0.05).mean() <= 0.1 and np.median(ps) > 0.3, ps
    r = ks_test(ref, rng.dirichlet([5, 1, 1, 1, 1], size=200), names=list('abcde'))
    assert r['p_value'] < 1e-10 and r['per_feature']['a']['p_value'] < 1e-10
    # a constant feature (e.g. image height) that stays constant is no evidence; one that changes is
    assert ks_test(np.full((50, 1), 28.), np.full((40, 1), 28.))['p_value'] == 1.0
    assert ks_test(np.full((50, 1), 28.), np.full((40, 1), 480.))['p_value'] < 1e-10


def test_chi2_null_is_uniform_ish_and_a_prior_shift_is_tiny():
    rng = np.random.default_rng(2)
    pri = np.array([0.3, 0.3, 0.2, 0.1, 0.1]); cls = list('abcde')
    ref = rng.choice(5, 1500, p=pri)
    _uniform_ish([class_shift_test(ref, rng.choice(5, 200, p=pri), cls)['p_value'] for _ in range(60)])
    shifted = np.concatenate([np.full(100, 4), rng.choice(5, 100, p=pri)])     # half the window one class
    r = class_shift_test(ref, shifted, cls)
    assert r['p_value'] < 1e-10 and r['recent']['e'] > 0.5 and r['reference']['e'] == pytest.approx(0.1, abs=0.03)


def _synthetic_reference(rng, n=600, k=8, C=4):
    logits = rng.normal(size=(n, C)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    st = np.column_stack([np.full(n, 28.), np.full(n, 28.), np.full(n, 3.), rng.normal(.6, .05, n), rng.normal(.2, .03, n), rng.normal(.15, .02, n)])
    return DriftReference(np.eye(16, k, dtype=np.float32), rng.normal(size=(n, k)).astype(np.float32), probs.astype(np.float32),
                          st.astype(np.float32), probs.argmax(1), list('abcd'))


def _window(R, rng, m=200):
    ix = rng.choice(len(R.probs), m, replace=False)
    # a fresh draw from the same distributions as the reference
    logits = rng.normal(size=(m, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    st = np.column_stack([np.full(m, 28.), np.full(m, 28.), np.full(m, 3.), rng.normal(.6, .05, m), rng.normal(.2, .03, m), rng.normal(.15, .02, m)])
    return probs, np.concatenate([rng.normal(size=(m, R.k)), st], 1)


def test_drift_test_flags_the_test_that_sees_the_shift():
    rng = np.random.default_rng(3)
    R = _synthetic_reference(rng)
    reps = [drift_test(R, *_window(R, rng), seed=i) for i in range(20)]
    assert sum(r['detected'] for r in reps) <= 3
    assert set(reps[0]['p_values']) == set(TESTS) and reps[0]['threshold'] == pytest.approx(0.05 / 4)
    p, f = _window(R, rng)
    f2 = f.copy(); f2[:, R.k + 3] *= 1.3                     # brighter images only
    assert drift_test(R, p, f2)['flagged'] == ['image_stats_ks']
    f3 = f.copy(); f3[:, :R.k] += 1.0                         # embeddings moved only
    assert drift_test(R, p, f3)['flagged'] == ['embedding_mmd']
    p4 = p.copy(); p4[:100] = np.eye(4)[0] * 0.97 + 0.01       # half the window confidently class a
    assert {'softmax_ks', 'class_proportions_chi2'} <= set(drift_test(R, p4, f)['flagged'])
    with pytest.raises(DriftError, match='drift features'): drift_test(R, p, f[:, :R.k])
    with pytest.raises(DriftError, match='probabilities'): drift_test(R, p[:, :3], f)
    # JSON-ready: what is written to reports/ and to the store
    json.dumps(drift_test(R, p, f), allow_nan=False)


def test_speed_of_a_window_of_1000():
    import time
    rng = np.random.default_rng(4)
    R = _synthetic_reference(rng, n=1700, k=32, C=8)
    R = DriftReference(np.eye(64, 32, dtype=np.float32), rng.normal(size=(1700, 32)).astype(np.float32), R.probs, R.stats, R.labels, list('abcdefgh'))
    logits = rng.normal(size=(1000, 8)); p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    f = np.concatenate([rng.normal(size=(1000, 32)), R.stats[:1000]], 1)
    drift_test(R, p, f)
    t0 = time.perf_counter(); drift_test(R, p, f); secs = time.perf_counter() - t0
    assert secs < 3, secs        # target < 1 s (see reports/benchmarks/drift.md); 3 s leaves room for a shared CPU


def test_reference_is_stored_at_registration_on_held_out_data(trained, sample_ds):
    reg, learn, ev = trained
    meta = reg.metadata('blood')
    assert meta['drift']['split'] == 'valid' and 'valid' not in meta['dataset']['train_splits']
    assert (reg.path('blood')/'drift.npz').exists() and meta['drift']['n'] == int((sample_ds.splits == 'valid').sum())
    R = load_reference('blood', registry=reg)
    assert R.emb.shape == (meta['drift']['n'], 32) and R.stats.shape[1] == len(IMAGE_STATS)
    # the served Predictor reduces with the same projection: its features of the valid images are the reference's
    p = Predictor.from_registry('blood', registry=reg, device='cpu')
    xv, yv = sample_ds.tensors('valid')
    probs, emb = p.features(xv)
    np.testing.assert_allclose(emb, R.emb, atol=1e-3)
    np.testing.assert_allclose(probs, R.probs, atol=1e-5)
    np.testing.assert_array_equal(R.labels, yv)


def test_drift_events_table_on_a_real_sqlite_file(tmp_path):
    url = f'sqlite:///{tmp_path}/fb.db'
    s = FeedbackStore(url, uploads_dir=tmp_path/'up')
    a = s.record_drift('blood', 'v1', False, {'p_values': {'embedding_mmd': 0.5}})
    b = s.record_drift('blood', 'v1', True, {'p_values': {'embedding_mmd': 0.001}})
    s.close()
    s2 = FeedbackStore(url, uploads_dir=tmp_path/'up')          # a new process would see the same
    assert [e['id'] for e in s2.drift_events('blood')] == [a, b]
    assert [e['id'] for e in s2.drift_flags('blood')] == [b] and s2.drift_flags('other') == []
    assert s2.drift_flags(since=datetime(2100, 1, 1, tzinfo=timezone.utc)) == []
    with pytest.raises(FeedbackError): s2.record_drift('blood', 'v1', True, {'x': float('inf')})
    with pytest.raises(FeedbackError): s2.record_drift('blood', 'v1', True, ['not a dict'])
    assert len(s2.drift_events()) == 2                        # the refused ones left nothing


def test_an_older_database_gains_the_table_and_keeps_its_rows(tmp_path):
    url = f'sqlite:///{tmp_path}/old.db'
    s = FeedbackStore(url, uploads_dir=tmp_path/'up')
    sha = s.save_image(b'\x89PNG\r\n\x1a\n' + bytes(64))
    pid = s.log_prediction('blood', 'v1', sha, 'a', {'a': 1.0}); s.close()
    with sqlite3.connect(tmp_path/'old.db') as c: c.execute('DROP TABLE drift_events')   # as written before drift checks
    s = FeedbackStore(url, uploads_dir=tmp_path/'up')
    assert [r['id'] for r in s.history()] == [pid] and s.drift_flags() == []
    s.record_drift('blood', 'v1', True, {}); assert len(s.drift_flags()) == 1


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def _shifted(a):
    "Another microscope: out of focus and brighter."
    im = Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.0))
    return np.clip(np.asarray(im).astype(np.float32) * 1.3, 0, 255).astype(np.uint8)


def test_shifted_uploads_through_the_real_server_are_flagged(trained, sample_ds, tmp_path):
    from test_serve import Server
    reg = trained[0]
    x, _ = sample_ds.tensors('test')
    srv = Server(tmp_path, reg.root)
    env = dict(BIOVIS_MODELS=str(reg.root), BIOVIS_DB_URL=srv.env['BIOVIS_DB_URL'])
    try:
        c = httpx.Client(base_url=srv.url, timeout=120)
        def send(imgs):
            for i in range(0, len(imgs), 50):
                r = c.post('/predict', files=[('files', (f'{j}.png', _png(a), 'image/png')) for j, a in enumerate(imgs[i:i + 50])])
                assert r.status_code == 200, r.text
        send(x[:150])
        # too few predictions for a window: a clear error, exit code 3, nothing recorded
        r = run_cli('drift', 'check', '--model', 'blood', '--window', '150', home=tmp_path, env=dict(env, BIOVIS_DB_URL=f'sqlite:///{tmp_path}/empty.db'))
        assert r.returncode == 3 and 'at least' in r.stderr
        r = run_cli('drift', 'check', '--model', 'blood', '--window', '150', '--alpha', '0.01', home=tmp_path, env=env, check=0)
        assert 'no drift detected' in r.stdout, r.stdout
        t_shift = datetime.now(timezone.utc).isoformat()
        send(np.stack([_shifted(a) for a in x[150:300]]))
        r = run_cli('drift', 'check', '--model', 'blood', '--window', '150', '--alpha', '0.01', home=tmp_path, env=env, check=0)
        assert 'DRIFT DETECTED' in r.stdout and 'image_stats_ks' in r.stdout, r.stdout
        r2 = run_cli('drift', 'check', '--since', t_shift, '--json', '--no-record', home=tmp_path, env=env, check=0)
        rep = json.loads(r2.stdout)
        assert rep['detected'] and rep['n'] == 150 and rep['version'] == 'v1' and rep['p_values']['image_stats_ks'] < 1e-6
        assert json.loads(open(rep['path']).read())['p_values'] == rep['p_values']
    finally:
        srv.stop()
    store = FeedbackStore(srv.env['BIOVIS_DB_URL'], uploads_dir=tmp_path/'data'/'uploads')
    events = store.drift_events('blood')
    assert [e['detected'] for e in events] == [False, True]        # --no-record left no third event
    assert [e['id'] for e in store.drift_flags('blood')] == [events[1]['id']]
    assert events[1]['report']['window']['size'] == 150 and events[1]['report']['flagged']
