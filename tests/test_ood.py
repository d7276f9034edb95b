"""The out-of-distribution flag (issue 16) for real: the session's model trained on the shipped sample with its drift
reference (the validation split), its test split, images of other kinds (noise, flat grey, chest X-rays from
PneumoniaMNIST when ../shared/data has them), the ONNX kind, and a real `biovis serve` on a loopback port."""
import io, math, os, shutil, subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import BIOVIS, SHARED_DATA, wait_until_up, stop_process, spawn_cli
from biovis.bench.fleet import free_port

ALPHA = 0.05          # for a count that means something on 320 test images (the default, 0.01, expects 3)


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def _upper(alpha, n_test, n_ref):
    "Highest flag rate of in-distribution images to accept: alpha plus three standard deviations of the test count and of the reference's own draw."
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / (n_ref + 1)))


@pytest.fixture(scope='module')
def test_split(sample_ds):
    return sample_ds.tensors('test')


@pytest.fixture(scope='module')
def pred05(trained):
    "A Predictor of this module's own (the session's is shared) flagging at p < 0.05."
    from biovis.inference import Predictor
    p = Predictor.from_registry('blood', registry=trained[0], device='cpu')
    p.ood_alpha = ALPHA
    return p


def _foreign() -> dict:
    """Images no blood-cell model has seen, by kind: uniform noise, flat grey levels, and when the shared data is there
    (../shared/data, on CI too) road-crack photographs (CrackForest) resized to 28 px and 28-px chest X-rays (PneumoniaMNIST)."""
    rng = np.random.default_rng(0)
    out = dict(noise=[rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(20)],
               flat=[np.full((28, 28, 3), v, np.uint8) for v in (0, 64, 128, 192, 255)])
    cracks = sorted((SHARED_DATA/'crackforest'/'image').glob('*.jpg'))[:20]
    if cracks: out['crack'] = [np.asarray(Image.open(f).convert('RGB').resize((28, 28), Image.BILINEAR)) for f in cracks]
    f = SHARED_DATA/'pneumoniamnist'/'pneumoniamnist.npz'
    if f.exists():
        with np.load(f) as z: out['xray'] = list(z['test_images'][:40])          # 28 x 28 grayscale
    return out


def test_scorer_on_synthetic_data():
    "Fresh points of the reference's mixture are flagged about alpha of the time, points of other clusters always; the p-values are (1 + #reference scores >= score) / (N + 1) over leave-one-out scores."
    from biovis.ood import OODScorer, unit_rows
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 32))
    draw = lambda n, c=centres: c[rng.integers(len(c), size=n)] + 0.35 * rng.standard_normal((n, 32))
    R = draw(1500); sc = OODScorer(k=10).fit(R)
    U = unit_rows(R); D = np.sqrt(np.maximum(2 - 2 * U @ U.T, 0)); np.fill_diagonal(D, np.inf)
    assert np.allclose(sc.ref_scores, np.sort(D, 1)[:, 9], atol=1e-9)               # the 10th neighbour, itself left out
    same, far = draw(10000), draw(1000, rng.standard_normal((6, 32)))
    s = sc.scores(same)
    p = sc.p_values(s)
    assert np.array_equal(p, (1 + (sc.ref_scores[None] >= s[:, None]).sum(1)) / (len(R) + 1))
    for a in (0.01, 0.05):
        assert (p < a).mean() <= _upper(a, len(same), len(R)), (a, (p < a).mean())
        assert (p < a).mean() >= a - 3 * math.sqrt(a / len(R)) - 0.003, (a, (p < a).mean())
    assert sc.test(far, 0.01)[0].all()


def test_reference_is_the_held_out_validation_split(trained, predictor):
    "The scorer of the served version is fitted on its drift reference: the 240 validation images the model did not train on."
    reg = trained[0]
    info = reg.metadata('blood')['drift']
    assert info['split'] == 'valid' and info['n'] == 240
    sc = predictor._ood_scorer()
    assert sc is not None and (sc.n, sc.dim, sc.k) == (240, info['k'], 10)


def test_test_images_flagged_at_about_alpha(pred05, test_split, trained):
    """The sample's test images (exchangeable with its validation images) are flagged at a rate within binomial spread of
    alpha; each p-value is the one computed by hand from the stored reference and the image's embedding; refer is the set's
    refer or the flag."""
    x, _ = test_split
    preds = pred05.predict_batch(list(x))
    flags = np.array([q.ood for q in preds])
    assert flags.dtype == bool and len(flags) == 320
    rate = flags.mean()
    assert 0 < rate <= _upper(ALPHA, len(x), 240), rate
    # by hand: leave-one-out 10th-neighbour distances of the normalised reference embeddings, the images' 10th neighbour
    with np.load(trained[0].path('blood', 'production')/'drift.npz') as z: R = z['emb'].astype(np.float64)
    R /= np.linalg.norm(R, axis=1, keepdims=True)
    D = np.sqrt(np.maximum(2 - 2 * R @ R.T, 0)); np.fill_diagonal(D, np.inf); ref = np.sort(D, 1)[:, 9]
    _, E = pred05.features(x)
    E = E.astype(np.float64) / np.linalg.norm(E, axis=1, keepdims=True)
    s = np.sort(np.sqrt(np.maximum(2 - 2 * E @ R.T, 0)), 1)[:, 9]
    hand = (1 + (ref[None] >= s[:, None] - 1e-9).sum(1)) / 241
    assert np.allclose([q.ood_p for q in preds], hand, atol=1.5 / 241)     # a rank off at most, from float rounding at a tie
    assert np.mean(np.isclose([q.ood_p for q in preds], hand)) > 0.97
    assert all(q.refer is (q.set != [q.label] or q.ood) for q in preds)
    # at the default level, 0.01, far fewer
    assert np.mean([q.ood_p < 0.01 for q in preds]) <= _upper(0.01, len(x), 240)


def test_foreign_images_are_flagged_and_referred(pred05, predictor):
    """Noise, flat grey images and crack photographs: at least 90 % flagged out of distribution and referred, at 0.05 and
    at the default 0.01. Chest X-rays are harder for this small model (their 32-number embeddings lie nearer the cells':
    about 60 % flagged at 0.05, 35 % at 0.01, measured): still flagged many times more often than the test images."""
    groups = _foreign()
    clear = groups['noise'] + groups['flat'] + groups.get('crack', [])
    for p, lvl in ((pred05, ALPHA), (predictor, predictor.ood_level)):
        preds = p.predict_batch(clear)
        flagged = [q.ood for q in preds]
        assert np.mean(flagged) >= 0.9, (lvl, np.mean(flagged), [round(q.ood_p, 4) for q in preds])
        assert all(q.refer and q.ood_p < lvl for q, f in zip(preds, flagged) if f)
        assert all(q.ood_p >= lvl for q, f in zip(preds, flagged) if not f)
    assert predictor.ood_level == 0.01                                           # the default setting
    if 'xray' in groups:
        rate = np.mean([q.ood for q in pred05.predict_batch(groups['xray'])])
        assert rate >= 5 * ALPHA, rate
    heat, img, pr = pred05.explain(_png(clear[0]))                              # the explanation's prediction carries it too
    assert pr.ood and pr.ood_p == pytest.approx(pred05.predict(clear[0]).ood_p)


def test_no_reference_no_flag(trained, test_split):
    "A version without a drift reference (registered before them, or built by hand) predicts as before: ood and ood_p None, refer from the set alone."
    from biovis.inference import Predictor
    reg, learn, _ = trained
    meta = reg.metadata('blood')
    bare = Predictor(learn.model, meta, device='cpu')                            # no drift_dir: not from the registry
    x, _ = test_split
    preds = bare.predict_batch(list(x[:20]))
    assert all(q.ood is None and q.ood_p is None and q.refer is (q.set != [q.label]) for q in preds)
    no_sets = Predictor(learn.model, {k: v for k, v in meta.items() if k != 'conformal'}, device='cpu')
    assert no_sets.predict(x[0]).refer is None


def test_onnx_kind_has_the_same_flag(trained, test_split, tmp_path):
    "The ONNX export carries the drift reference along: its predictions have the torch model's p-values (to a rank) and flags."
    pytest.importorskip('onnxruntime')
    from biovis.onnx_backend import register_onnx
    from biovis.kinds import load_predictor
    from biovis.registry import ModelRegistry
    shutil.copytree(trained[0].root, tmp_path/'reg')
    reg = ModelRegistry(tmp_path/'reg')
    dest, v, _ = register_onnx('blood', registry=reg, alias='production')
    onnx, torch_ = load_predictor(dest, v, registry=reg), load_predictor('blood', registry=reg, device='cpu')
    x = list(test_split[0][:60]) + _foreign()['noise'][:5] + _foreign()['flat']
    a, b = onnx.predict_batch(x), torch_.predict_batch(x)
    assert type(onnx).__name__ == 'OnnxPredictor' and all(q.ood_p is not None for q in a)
    assert np.allclose([q.ood_p for q in a], [q.ood_p for q in b], atol=1.5 / 241)
    assert np.mean([q.ood == w.ood for q, w in zip(a, b)]) >= 0.97


def test_biovis_serve_answers_with_ood(trained, test_split, tmp_path):
    "A real `biovis serve` at BIOVIS_OOD_ALPHA=0.05: /predict JSON carries ood and ood_p equal to the Predictor's, and refer with them; the store keeps neither."
    from biovis.inference import Predictor
    x, _ = test_split
    imgs = list(x[:12]) + _foreign()['noise'][:3] + _foreign()['flat'][:3]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    env.update(BIOVIS_HOME=str(tmp_path), BIOVIS_MODELS=str(trained[0].root), BIOVIS_RATE_LIMIT='0', GRADIO_ANALYTICS_ENABLED='False',
               BIOVIS_DB_URL=f'sqlite:///{tmp_path}/data/biovis.db', BIOVIS_OOD_ALPHA='0.05')
    log = open(tmp_path/'server.log', 'w')
    proc = spawn_cli('serve', '--port', port, env=env, cwd=tmp_path, log=log)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_until_up(proc, url + '/ping', tmp_path/'server.log')
        r = httpx.post(url + '/predict', files=[('files', (f'img{i}.png', _png(a), 'image/png')) for i, a in enumerate(imgs)], timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()['predictions']
    finally: stop_process(proc, log)
    want = Predictor.from_registry('blood', registry=trained[0], device='cpu')
    want.ood_alpha = ALPHA
    want = want.predict_batch(imgs)
    assert [g['ood'] for g in got] == [w.ood for w in want]
    assert [g['ood_p'] for g in got] == pytest.approx([w.ood_p for w in want])
    assert [g['refer'] for g in got] == [w.refer for w in want] == [w.set != [w.label] or w.ood for w in want]
    assert any(g['ood'] for g in got[12:]) and all(isinstance(g['ood_p'], float) for g in got)
    from biovis.feedback import FeedbackStore
    store = FeedbackStore(f'sqlite:///{tmp_path}/data/biovis.db', uploads_dir=tmp_path/'data'/'uploads')
    row = store.prediction(got[0]['id'])
    assert row is not None and 'ood' not in row and 'ood_p' not in row
    store.close()
