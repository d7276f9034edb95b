"""Conformal prediction sets ("refer" sets, issue 16) for real: the session's model trained on the shipped sample, its
test split, a real `biovis serve` on a loopback port, and a real SQLite feedback store."""
import io, math, os, subprocess
from collections import Counter

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import BIOVIS, run_cli, wait_until_up, stop_process, spawn_cli

LEVELS = (0.9, 0.95)


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def _bound(level, n):
    "Lowest coverage a test split of `n` images should show at `level`: three binomial standard deviations below it."
    return level - 3 * math.sqrt(level * (1 - level) / n)


@pytest.fixture(scope='module')
def test_split(sample_ds):
    return sample_ds.tensors('test')


def test_coverage_on_the_test_split_meets_the_level(trained):
    "The registered metrics: coverage on the held-out test split at 0.90 and 0.95 within binomial spread of the level; larger sets at 0.95."
    reg, learn, ev = trained
    m = reg.metadata('blood')['metrics']
    n = m['n']
    assert n == 320 and m['split'] == 'test'
    for lvl in LEVELS:
        k = round(lvl * 100)
        assert m[f'conformal_coverage_{k}'] >= _bound(lvl, n), (lvl, m[f'conformal_coverage_{k}'])
    assert m['conformal_set_size_95'] >= m['conformal_set_size_90'] > 0.5
    assert m['conformal_set_size_90'] < len(learn.biovis['classes']) / 2      # informative sets, not every class
    conf = reg.metadata('blood')['conformal']
    assert conf['fitted_on'] == 'valid' and conf['n'] == 240 and conf['randomized'] is False and conf['method'] == 'lac-mondrian'
    assert all(len(conf['thresholds'][mode][k]) == len(learn.biovis['classes']) for mode in ('plain', 'tta') for k in ('0.9', '0.95'))


def test_served_sets_are_the_librarys_sets(trained, sample_ds):
    "The thresholds stored in the metadata give, without crepes, exactly crepes' own Mondrian (per-class) sets on the test split; a class with too few calibration images, crepes' pooled set."
    from crepes import ConformalClassifier
    from biovis.conformal import lac_scores, prediction_sets, threshold_for
    from biovis.models import predict_proba
    from biovis.policy import policy_from_dict
    reg, learn, ev = trained
    conf = reg.metadata('blood')['conformal']
    xv, yv = sample_ds.tensors('valid')                  # the split the sets were calibrated on, as the evaluation saw it (TTA)
    pv = predict_proba(learn.model, xv, tta=ev.tta, temperature=learn.biovis['calibration']['temperature'],
                       views=policy_from_dict(learn.biovis['policy']).tta_views)
    s = lac_scores(pv)[np.arange(len(yv)), yv]
    mondrian, pooled = ConformalClassifier().fit(s, bins=yv), ConformalClassifier().fit(s)
    st, K = lac_scores(ev.probs), len(learn.biovis['classes'])
    for lvl in LEVELS:
        ours = prediction_sets(ev.probs, threshold_for(conf, lvl, tta=ev.tta)).astype(int)
        small = set(conf['thresholds']['tta' if ev.tta else 'plain']['pooled'].get(f'{lvl:g}', []))
        for k in range(K):
            lib = (pooled.predict_set(st[:, [k]], confidence=lvl, smoothing=False) if k in small else
                   mondrian.predict_set(st[:, [k]], bins=np.full(len(st), k), confidence=lvl, smoothing=False))[:, 0]
            assert (ours[:, k] == lib).all(), (lvl, k)
        assert len(small) < K / 2, small


def test_predictor_returns_set_and_refer(predictor, test_split, sample_ds):
    "Each prediction has its set (the predicted class first when it is in) and refer exactly when the set is not the predicted class alone; the served (plain) sets cover the test split too."
    x, y = test_split
    preds = predictor.predict_batch(list(x))
    assert all(p.set is not None and (p.label not in p.set or p.set[0] == p.label) for p in preds)
    assert all(p.refer is (p.set != [p.label] or p.ood) for p in preds)        # or out of distribution: tests/test_ood.py
    assert any(p.refer for p in preds) and not all(p.refer for p in preds)
    assert all(set(p.set) <= set(sample_ds.classes) for p in preds)
    cov = np.mean([sample_ds.classes[t] in p.set for p, t in zip(preds, y)])
    assert cov >= _bound(0.9, len(y)), cov
    d = predictor.predict(_png(x[0])).to_dict()
    assert d['set'] == preds[0].set and d['refer'] == preds[0].refer


from biovis.bench.fleet import free_port as _free_port     # noqa: E402  (one definition, the fleet's)


def test_biovis_serve_answers_with_set_and_refer(trained, predictor, test_split, tmp_path):
    "A real `biovis serve`: /predict JSON carries the same set and refer as the Predictor, for each image of a request."
    x, _ = test_split
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    env.update(BIOVIS_HOME=str(tmp_path), BIOVIS_MODELS=str(trained[0].root), BIOVIS_RATE_LIMIT='0', GRADIO_ANALYTICS_ENABLED='False',
               BIOVIS_DB_URL=f'sqlite:///{tmp_path}/data/biovis.db')
    log = open(tmp_path/'server.log', 'w')
    proc = spawn_cli('serve', '--port', port, env=env, cwd=tmp_path, log=log)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_until_up(proc, url + '/ping', tmp_path/'server.log')
        idx = range(12)
        r = httpx.post(url + '/predict', files=[('files', (f'cell{i}.png', _png(x[i]), 'image/png')) for i in idx], timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()['predictions']
        want = predictor.predict_batch(list(x[list(idx)]))
        assert [g['set'] for g in got] == [w.set for w in want]
        assert [g['refer'] for g in got] == [w.refer for w in want] == [w.set != [w.label] or w.ood for w in want]
    finally: stop_process(proc, log)


def test_production_coverage_from_real_store_rows(predictor, test_split, sample_ds, tmp_path):
    "Predictions and corrections logged in a real SQLite store: coverage and set sizes computed from the stored rows equal the hand count."
    from biovis.feedback import FeedbackStore
    from biovis.conformal import production_coverage
    x, y = test_split
    store = FeedbackStore(f'sqlite:///{tmp_path}/fb.db', uploads_dir=tmp_path/'up')
    preds, ids = predictor.predict_batch(list(x[:60])), []
    for i, p in enumerate(preds):
        sha = store.save_image(_png(x[i]))
        ids.append(store.log_prediction('blood', predictor.version, sha, p.label, p.probs))
    truth = [sample_ds.classes[t] for t in y[:60]]
    # clinicians correct the wrong answers and confirm some right ones; one prediction is corrected twice (the last counts)
    fixed = [i for i in range(60) if truth[i] != preds[i].label] + list(range(0, 60, 7))
    wrong_first = next(i for i in range(60) if truth[i] != preds[i].label)
    store.add_feedback(ids[wrong_first], preds[wrong_first].label)     # first: a mistaken confirmation ...
    for i in fixed: store.add_feedback(ids[i], truth[i])               # ... then the right label
    fixed = sorted(set(fixed))
    conf = predictor.meta['conformal']
    got = production_coverage(store, 'blood', predictor.version, conf, 0.9, window=50)
    hand_in = sum(truth[i] in preds[i].set for i in fixed)
    wrong = [i for i in fixed if truth[i] != preds[i].label]
    assert got['corrections'] == len(fixed) and got['misses'] == len(fixed) - hand_in
    assert got['coverage'] == pytest.approx(hand_in / len(fixed))
    assert (got['wrong'], got['wrong_in_set']) == (len(wrong), sum(truth[i] in preds[i].set for i in wrong))
    assert got['recent'] == 50 and got['set_sizes'] == dict(sorted(Counter(len(p.set) for p in preds[-50:]).items()))
    assert got['refer_rate'] == pytest.approx(np.mean([p.refer for p in preds[-50:]]))
    assert 0 < got['wrong']
    store.close()


def test_model_without_sets_still_predicts(trained, test_split, tmp_path):
    "A version registered before the sets existed: it predicts as before, with no set and no refer, in the Predictor and in the service's answer."
    from biovis.registry import ModelRegistry
    from biovis.inference import Predictor
    from biovis.feedback import FeedbackStore
    from biovis.serve.pool import ModelPool
    from biovis.serve.service import PredictionService
    from biovis.conformal import card_line
    reg, learn, _ = trained
    old_meta = {k: v for k, v in reg.metadata('blood').items()
                if k not in ('conformal', 'name', 'version', 'created', 'weights', 'weights_sha256')}
    old_meta['metrics'] = {k: v for k, v in old_meta['metrics'].items() if not k.startswith('conformal')}
    old = ModelRegistry(tmp_path/'models')
    old.register('legacy', learn.model, old_meta); old.promote('legacy', 'v1')
    x, _ = test_split
    p = Predictor.from_registry('legacy', registry=old, device='cpu').predict(_png(x[0]))
    assert p.set is None and p.refer is None and p.label in learn.biovis['classes']
    svc = PredictionService(ModelPool(old), FeedbackStore(f'sqlite:///{tmp_path}/fb.db', uploads_dir=tmp_path/'up'))
    a = svc.predict(_png(x[0]), filename='cell.png')
    assert a['set'] is None and a['refer'] is None and a['label'] == p.label
    assert card_line(old.metadata('legacy')) is None
    line = card_line(reg.metadata('blood'))
    m = reg.metadata('blood')['metrics']
    assert f"{m['conformal_coverage_90']:.1%}" in line and f"{m['conformal_coverage_95']:.1%}" in line
    svc.store.close()


def test_recalibrate_on_an_audit_sample_through_the_cli(trained, sample_ds, tmp_path):
    "`biovis models recalibrate`: a new version with the same weights file, thresholds fitted on the audit sample (crepes' Mondrian sets on it), the drift reference kept, stale coverage dropped, the move in the alias log; production unchanged until promoted."
    import shutil
    from crepes import ConformalClassifier
    from biovis.conformal import lac_scores, prediction_sets, threshold_for
    from biovis.registry import ModelRegistry
    shutil.copytree(trained[0].root, tmp_path/'models')
    reg = ModelRegistry(tmp_path/'models')
    v1 = reg.aliases('blood')['production']
    r = run_cli('models', 'recalibrate', 'blood', '--data', 'sample', '--split', 'test', '--reason', 'audit of November',
                '--models-dir', tmp_path/'models', home=tmp_path, check=0)
    v2 = reg.aliases('blood')['candidate']
    assert v2 != v1 and reg.aliases('blood')['production'] == v1 and f'blood {v2}' in r.stdout
    m1, m2 = reg.metadata('blood', v1), reg.metadata('blood', v2)
    assert m2['weights_sha256'] == m1['weights_sha256'] and m2['recalibrated_from'] == v1 and m2['conformal']['n'] == 320
    assert (reg.path('blood', v2)/'drift.npz').read_bytes() == (reg.path('blood', v1)/'drift.npz').read_bytes()
    assert not any(k.startswith('conformal_') for k in m2['metrics']) and 'conformal_coverage_90' in m1['metrics']
    assert reg.history('blood')[-1]['reason'] == 'audit of November' and reg.history('blood')[-1]['version'] == v2
    # the thresholds are crepes' Mondrian thresholds on the audit sample's plain probabilities
    x, y = sample_ds.tensors('test')
    from biovis.kinds import load_model
    from biovis.models import predict_proba
    model, meta = load_model('blood', v2, registry=reg)        # as recalibrate_version computes them (the Predictor's fused layers differ in the last bits)
    probs = predict_proba(model, x, temperature=meta['calibration']['temperature'])
    q = threshold_for(m2['conformal'], 0.9)
    assert q != threshold_for(m1['conformal'], 0.9)
    s = lac_scores(probs)[np.arange(len(y)), y]
    cc = ConformalClassifier().fit(s, bins=y)
    pooled = set(m2['conformal']['thresholds']['plain']['pooled'].get('0.9', []))
    ours = prediction_sets(probs, q).astype(int)
    for k in set(range(len(sample_ds.classes))) - pooled:
        lib = cc.predict_set(lac_scores(probs)[:, [k]], bins=np.full(len(y), k), confidence=0.9, smoothing=False)[:, 0]
        assert (ours[:, k] == lib).all(), k
    assert abs(ours[np.arange(len(y)), y].mean() - 0.9) < 0.05       # in-sample: on the level by construction
