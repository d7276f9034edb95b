"Champion against challenger: McNemar and DeLong computed for real, and the paired tests in a promotion decision and the alias log."
import io, json, math, shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from biovis.compare import mcnemar, delong, paired_comparison, paired_summary, describe_paired, _components
from conftest import run_cli


def _softmax(l):
    e = np.exp(l - l.max(1, keepdims=True)); return e / e.sum(1, keepdims=True)


def _noisy_pair(rng, n, k, signal=1.0, noise_a=1.0, noise_b=1.0):
    "Labels and two models' probabilities that share a common part (as two models of the same data do)."
    y = rng.integers(0, k, n)
    base = rng.normal(0, 1, (n, k)); base[np.arange(n), y] += signal
    return y, _softmax(base + rng.normal(0, noise_a, (n, k))), _softmax(base + rng.normal(0, noise_b, (n, k)))


def _boot_se(y, pa, pb, auc, reps, seed=7):
    g, d = np.random.default_rng(seed), []
    for _ in range(reps):
        i = g.integers(0, len(y), len(y))
        d.append(auc(y[i], pa[i]) - auc(y[i], pb[i]))
    return float(np.std(d, ddof=1))


# --- McNemar ---------------------------------------------------------------------------------------------------

def test_mcnemar_hand_table_is_the_binomial_test():
    "50 both right, 3 only A, 11 only B, 6 neither: p = 2 P(X <= 3), X ~ Bin(14, 1/2), whatever the concordant cells hold."
    a = np.array([1] * 50 + [1] * 3 + [0] * 11 + [0] * 6, bool)
    b = np.array([1] * 50 + [0] * 3 + [1] * 11 + [0] * 6, bool)
    r = mcnemar(a, b)
    assert (r['n'], r['both'], r['a_only'], r['b_only'], r['neither']) == (70, 50, 3, 11, 6)
    expected = 2 * sum(math.comb(14, j) for j in range(4)) / 2 ** 14
    assert r['p_value'] == pytest.approx(expected, rel=1e-12) and 0.05 < expected < 0.06
    assert r['accuracy_a'] == pytest.approx(53 / 70) and r['accuracy_b'] == pytest.approx(61 / 70)
    assert mcnemar(b, a)['p_value'] == pytest.approx(expected, rel=1e-12)                      # symmetric
    more = mcnemar(np.r_[a, np.ones(500, bool)], np.r_[b, np.ones(500, bool)])               # concordant pairs change nothing
    assert more['p_value'] == pytest.approx(expected, rel=1e-12)
    a2, b2 = np.r_[a, np.zeros(4, bool)], np.r_[b, np.ones(4, bool)]                          # 3 against 15: significant
    p2 = 2 * sum(math.comb(18, j) for j in range(4)) / 2 ** 18
    assert mcnemar(a2, b2)['p_value'] == pytest.approx(p2, rel=1e-12) and p2 < 0.01
    assert mcnemar(a, a)['p_value'] == 1.0
    with pytest.raises(ValueError, match='same items'): mcnemar(a, b[:10])


# --- DeLong -----------------------------------------------------------------------------------------------------

def _delong_var_by_pairs(y, a, b):
    "DeLong et al. (1988) from the definition: psi over every (positive, negative) pair, the 2x2 covariance matrices S10 and S01."
    P, N = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    psi = lambda s: (s[P][:, None] > s[N][None, :]) + 0.5 * (s[P][:, None] == s[N][None, :])
    pa, pb = psi(a), psi(b)
    S10 = np.cov(np.vstack([pa.mean(1), pb.mean(1)]))
    S01 = np.cov(np.vstack([pa.mean(0), pb.mean(0)]))
    L = np.array([1.0, -1.0])
    return float(L @ (S10 / len(P) + S01 / len(N)) @ L)


def test_delong_binary_against_definition_sklearn_and_bootstrap():
    rng = np.random.default_rng(11)
    n = 400
    y = rng.integers(0, 2, n)
    a = np.round(y + rng.normal(0, 1, n), 1)                       # ties within and across the classes
    b = 0.7 * y + 0.6 * (a - y) + rng.normal(0, 0.8, n)            # correlated with a
    r = delong(y, a, b)
    assert r['auc_a'] == pytest.approx(roc_auc_score(y, a), abs=1e-12) and r['auc_b'] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert r['se'] ** 2 == pytest.approx(_delong_var_by_pairs(y, a, b), rel=1e-10)
    assert r['z'] == pytest.approx(r['difference'] / r['se']) and r['p_value'] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(r['z']) / 2 ** 0.5))))
    boot = _boot_se(y, a, b, roc_auc_score, 1000)
    assert abs(r['se'] / boot - 1) < 0.15, (r['se'], boot)


def test_delong_identical_is_one_and_clearly_better_is_tiny():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    weak = y + rng.normal(0, 1.5, 300)
    strong = y + rng.normal(0, 0.3, 300)
    same = delong(y, weak, weak)
    assert (same['p_value'], same['z'], same['difference']) == (1.0, 0.0, 0.0)
    r = delong(y, strong, weak)
    assert r['p_value'] < 1e-8 and r['z'] > 0 and r['difference'] > 0.1
    assert delong(y, weak, strong)['z'] == pytest.approx(-r['z'])
    with pytest.raises(ValueError, match='labels 0 and 1'): delong(y + 1, weak, strong)
    with pytest.raises(ValueError, match='two classes'): delong(np.zeros(5, int), np.arange(5.0), np.arange(5.0))


def test_delong_multiclass_macro():
    "The macro one-vs-rest AUC of biovis.evaluate, its variance from per-image influences: sklearn's AUCs, the binary test with two classes, a bootstrap."
    from biovis.evaluate import classification_metrics
    rng = np.random.default_rng(5)
    y, pa, pb = _noisy_pair(rng, 500, 5, signal=1.5, noise_a=0.5, noise_b=1.0)
    r = delong(y, pa, pb)
    assert r['classes'] == 5
    assert r['auc_a'] == pytest.approx(roc_auc_score(y, pa, multi_class='ovr'), abs=1e-12)
    assert r['auc_b'] == pytest.approx(roc_auc_score(y, pb, multi_class='ovr'), abs=1e-12)
    boot = _boot_se(y, pa, pb, lambda y, p: roc_auc_score(y, p, multi_class='ovr'), 400)
    assert abs(r['se'] / boot - 1) < 0.2, (r['se'], boot)
    assert r['p_value'] < 1e-4 and r['z'] > 0
    # a class absent from the labels has no AUC and is left out of the mean, as biovis.evaluate leaves it out
    keep = y != 4
    r4 = delong(y[keep], pa[keep], pb[keep])
    names = list('abcde')
    assert r4['classes'] == 4
    assert r4['auc_a'] == pytest.approx(classification_metrics(y[keep], pa[keep], names)['auc'], abs=1e-12)
    # two classes whose probabilities sum to one: exactly the binary test
    y2 = rng.integers(0, 2, 300)
    s_a, s_b = y2 + rng.normal(0, 1, 300), 0.5 * y2 + rng.normal(0, 1, 300)
    sig = lambda s: 1 / (1 + np.exp(-s))
    two = delong(y2, np.stack([1 - sig(s_a), sig(s_a)], 1), np.stack([1 - sig(s_b), sig(s_b)], 1))
    assert two['z'] == pytest.approx(delong(y2, s_a, s_b)['z'], rel=1e-9)


def test_delong_multiclass_keeps_its_level_under_the_null():
    "Two equally good models (independent noise of the same size): p < 0.05 in about 5 % of the data sets. Without summing each image's influences before squaring it is about 10 %."
    rng = np.random.default_rng(3)
    hits = sum(delong(*_noisy_pair(rng, 300, 5))['p_value'] < 0.05 for _ in range(400))
    assert 0.02 <= hits / 400 <= 0.085, hits / 400


def test_paired_comparison_flags_a_significantly_worse_candidate():
    rng = np.random.default_rng(8)
    y, prod, _ = _noisy_pair(rng, 600, 4, signal=1.5, noise_a=0.5)
    base = np.log(prod)
    worse = _softmax(base + rng.normal(0, 2.5, prod.shape))
    r = paired_comparison(y, worse, prod)
    mc = r['mcnemar']
    assert r['candidate_worse'] and not r['candidate_better'] and mc['production_only'] > mc['candidate_only']
    assert r['accuracy_candidate'] == pytest.approx((worse.argmax(1) == y).mean())
    assert mc['p_value'] == pytest.approx(mcnemar(worse.argmax(1) == y, prod.argmax(1) == y)['p_value'])
    assert r['delong']['p_value'] == pytest.approx(delong(y, worse, prod)['p_value'])
    s = paired_summary(r)
    assert s['mcnemar_p'] == mc['p_value'] and s['delong_p'] == r['delong']['p_value'] and s['n'] == 600
    assert json.loads(json.dumps(r, allow_nan=False)) == r                                   # JSON-ready
    assert f"production alone on {mc['production_only']}" in describe_paired(r)
    same = paired_comparison(y, prod, prod)
    assert not same['candidate_worse'] and same['mcnemar']['p_value'] == 1.0 and same['delong']['p_value'] == 1.0
    one = paired_comparison(np.zeros(4, int), prod[:4], prod[:4])                           # one class: no AUC, McNemar still
    assert one['delong'] is None and one['auc_candidate'] is None and paired_summary(one)['delong_p'] is None


# --- in the pipeline ----------------------------------------------------------------------------------------------

def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


@pytest.fixture
def reg_and_store(trained, tmp_path, sample_ds):
    "A copy of the session's trained registry (production `blood` v1) and a feedback store with corrections of test images."
    from biovis.registry import ModelRegistry
    from biovis.feedback import FeedbackStore
    src, learn, ev = trained
    shutil.copytree(src.root, tmp_path/'models')
    reg = ModelRegistry(tmp_path/'models')
    st = FeedbackStore(f"sqlite:///{tmp_path/'fb.db'}", uploads_dir=tmp_path/'uploads')
    ds, te = sample_ds, sample_ds.idxs('test')
    used = []
    for k, i in enumerate(te[:12]):
        sha = st.save_image(_png(ds.image(i)))
        pid = st.log_prediction('blood', 'v1', sha, ds.classes[0], {c: 1 / len(ds.classes) for c in ds.classes})
        if k == 0: st.add_feedback(pid, ds.classes[(ds.labels[i] + 1) % len(ds.classes)])   # corrected twice: the later label wins
        if k == 1: st.add_feedback(pid, ds.classes[ds.labels[i]], held='second reviewer'); continue   # held: not verified
        st.add_feedback(pid, ds.classes[ds.labels[i]]); used.append(k)
    other = st.log_prediction('other', 'v1', st.save_image(_png(ds.image(te[20]))), ds.classes[0], {c: 1 / len(ds.classes) for c in ds.classes})
    st.add_feedback(other, ds.classes[0])                                                        # another model's
    return reg, st, learn, ev, [int(k) for k in used]


def test_compare_with_production_on_a_real_registry(reg_and_store, sample_ds):
    from biovis.pipeline import compare_with_production, register_run, verified_feedback
    reg, st, learn, ev, used = reg_and_store
    # the candidate is production's own model: no discordant image on the holdout, nor on the verified feedback set
    d = compare_with_production(reg, 'blood', ev, sample_ds, store=st, candidate=learn)
    for k in ('promote', 'reason', 'metric', 'candidate', 'production', 'production_version', 'margin'): assert k in d
    h = d['paired']
    assert d['promote'] and d['production_version'] == 'v1' and h['n'] == len(ev.y_true)
    assert (h['mcnemar']['candidate_only'], h['mcnemar']['production_only'], h['mcnemar']['p_value']) == (0, 0, 1.0)
    assert h['accuracy_production'] == pytest.approx(d['production']) and h['accuracy_candidate'] == pytest.approx(ev.metrics['accuracy'])
    assert 'McNemar p=1.000' in d['reason'] and 'DeLong p=' in d['reason']
    fb, stats = verified_feedback(st, 'blood', sample_ds.classes)
    assert stats['rows'] == 12 and stats['images'] == 11 and stats['used'] == len(fb) == 11    # held and other model's left out
    fs = d['feedback_set']
    assert fs['n'] == 11 and 'trained on these corrections' in fs['note'] and 'not decided on' in fs['note']
    te = sample_ds.idxs('test')
    truth = sample_ds.labels[te[used]]
    assert fs['paired']['mcnemar']['p_value'] == 1.0
    assert fs['paired']['accuracy_production'] == pytest.approx((ev.probs[used].argmax(1) == truth).mean())   # the same images, scored again
    # registered and promoted: the alias log's promotion entry carries the p-values
    res = register_run(reg, 'blood', learn, ev, sample_ds, d)
    e = reg.history('blood')[-1]
    assert res['promoted'] and (e['action'], e['version']) == ('promote', res['version'])
    assert e['detail']['holdout']['mcnemar_p'] == 1.0 and e['detail']['holdout']['delong_p'] == pytest.approx(h['delong']['p_value'])
    assert e['detail']['feedback_set']['n'] == 11 and reg.history('blood')[-2]['detail'] == e['detail']        # the registration too
    assert reg.metadata('blood', res['version'])['promotion']['paired']['mcnemar']['p_value'] == 1.0
    out = run_cli('models', 'history', 'blood', home=reg.root.parent, check=0).stdout
    assert 'p_values' in out and 'McNemar 1.000, DeLong' in out
    events = [json.loads(l) for l in run_cli('models', 'history', 'blood', '--json', home=reg.root.parent, check=0).stdout.splitlines()]
    assert events[-1]['detail']['holdout']['mcnemar_p'] == 1.0 and 'detail' not in events[0]


def test_significantly_worse_candidate_is_not_promoted_inside_the_margin(reg_and_store, sample_ds):
    "An untrained network of the same architecture, scored for real: inside a margin of 1, but McNemar refuses it; history says why."
    import torch
    from biovis.evaluate import evaluate
    from biovis.models import create_model
    from biovis.pipeline import compare_with_production, register_run
    reg, st, learn, ev, used = reg_and_store
    torch.manual_seed(0)
    meta = learn.biovis
    weak = SimpleNamespace(model=create_model(meta['arch'], len(meta['classes']), meta['channels']).eval(), biovis=meta)
    wev = evaluate(weak, sample_ds, split='test', tta=False)            # production is re-evaluated as the candidate was: no TTA
    d = compare_with_production(reg, 'blood', wev, sample_ds, margin=1.0, store=st, candidate=weak)
    h = d['paired']
    assert not d['promote'] and h['candidate_worse'] and h['mcnemar']['p_value'] < 1e-6
    assert 'significantly worse' in d['reason'] and 'McNemar p=' in d['reason']
    assert h['mcnemar']['production_only'] - h['mcnemar']['candidate_only'] == round((d['production'] - d['candidate']) * h['n'])
    assert d['feedback_set']['paired']['accuracy_candidate'] == pytest.approx((wev.probs[used].argmax(1) == wev.y_true[used]).mean())
    res = register_run(reg, 'blood', weak, wev, sample_ds, d)
    assert not res['promoted'] and reg.aliases('blood')['production'] == 'v1'
    e = reg.history('blood')[-1]
    assert (e['action'], e['alias']) == ('register', 'candidate') and e['detail']['holdout']['mcnemar_p'] == h['mcnemar']['p_value']
    # without a production model, or with a segmentation evaluation (no probabilities), there is no paired test
    assert compare_with_production(reg, 'nobody', wev, sample_ds)['paired'] is None


def test_paired_needs_the_same_items_and_skips_evaluations_without_probabilities(trained):
    from biovis.pipeline import _paired, PipelineError
    from biovis.segment.metrics import seg_metrics
    _, _, ev = trained
    assert _paired(ev, ev)['mcnemar']['p_value'] == 1.0
    order = np.random.default_rng(0).permutation(len(ev.y_true))
    shuffled = SimpleNamespace(y_true=ev.y_true[order], probs=ev.probs[order])
    if not np.array_equal(shuffled.y_true, ev.y_true):
        with pytest.raises(PipelineError, match='other items'): _paired(ev, shuffled)
    m = np.zeros((8, 8), int); m[2:5, 2:5] = 1
    sev = seg_metrics([m], [m])
    assert _paired(sev, sev) is None
