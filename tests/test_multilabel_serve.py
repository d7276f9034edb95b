"Multi-label findings served for real (issue 15): /predict, /feedback/findings on the real SQLite store, the Findings tab in headless Chromium, `biovis drift check` per finding, the dashboard's view, and `biovis retrain` from corrected sets."
import io, json, re, sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli
from test_serve import Server

NAME = 'mosaics'


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


@pytest.fixture(scope='module')
def ml(tmp_path_factory):
    "A tiny multi-label model on BloodMNIST mosaics (1 epoch), registered in production in a temp home, served by `biovis serve`."
    from biovis.registry import ModelRegistry
    from biovis.multilabel import bloodmnist_mosaics, train_and_register_multilabel
    home = tmp_path_factory.mktemp('multilabel')
    ds = bloodmnist_mosaics(n=dict(train=96, valid=40, test=40), seed=0)
    train_and_register_multilabel(ds, name=NAME, epochs=1, registry=ModelRegistry(home/'models'), promote='always', progress=False,
                                  arch='cnn_small', pretrained=False)
    s = Server(home, home/'models', args=('--model', NAME))
    yield dict(home=home, ds=ds, server=s, url=s.url)
    s.stop()


def _store(home):
    from biovis.feedback import FeedbackStore
    return FeedbackStore(f'sqlite:///{home}/data/biovis.db', uploads_dir=home/'data'/'uploads')


def _predict(url, imgs):
    r = httpx.post(url + '/predict', files=[('files', (f'm{i}.png', _png(a), 'image/png')) for i, a in enumerate(imgs)], timeout=120)
    assert r.status_code == 200, r.text
    return r.json()['predictions']


def _feedback_of(home, pid) -> list:
    with sqlite3.connect(home/'data'/'biovis.db') as c:
        return [r[0] for r in c.execute('select correct_label from feedback where prediction_id=? order by id', (pid,))]


def test_the_store_and_the_family_agree_on_the_set_format():
    from biovis.feedback import findings
    from biovis.multilabel import data
    assert (findings.SEP, findings.NO_FINDING) == (data.SEP, data.NO_FINDING)


def test_predict_gives_the_findings_and_feedback_stores_the_corrected_set(ml):
    url, home, ds = ml['url'], ml['home'], ml['ds']
    x, y = ds.arrays('test')
    preds = _predict(url, x[:3])
    for p in preds:
        assert p['task'] == 'multilabel' and p['model'] == NAME and p['version'] == 'v1'
        assert [f['name'] for f in p['findings']] == ds.classes and set(p['findings'][0]) == {'name', 'probability', 'threshold', 'present'}
        assert all((f['probability'] >= f['threshold']) == f['present'] for f in p['findings'])
        assert p['present'] == [f['name'] for f in p['findings'] if f['present']] and p['label'] == ('|'.join(p['present']) or 'no finding')
    a, b, c = (p['id'] for p in preds)
    truth = ds.findings(int(ds.idxs('test')[0]))
    s = Server.db_count(ml['server'], 'feedback')
    # JSON: any order, repeated names: stored once each, in the model's order, read back from the real SQLite store
    r = httpx.post(url + '/feedback/findings', json=dict(prediction_id=a, findings=truth[::-1] + truth[:1], note='2 cells'), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()['findings'] == truth and _feedback_of(home, a) == ['|'.join(truth)]
    # a form with the field repeated
    r = httpx.post(url + '/feedback/findings', data={'prediction_id': b, 'findings': ['platelet', 'basophil']}, timeout=30)
    assert r.status_code == 200, r.text
    assert _feedback_of(home, b) == ['basophil|platelet']
    # the empty set is a correction of its own, unlike no feedback
    r = httpx.post(url + '/feedback/findings', json=dict(prediction_id=b, findings=[]), timeout=30)
    assert r.status_code == 200 and r.json()['label'] == 'no finding'
    assert _feedback_of(home, b) == ['basophil|platelet', 'no finding'] and _feedback_of(home, c) == []
    with _store(home) as st:
        rows = [r for r in st.feedback_rows(statuses=('accepted', 'held')) if r['prediction_id'] in (a, b)]
    assert [r['correct_label'] for r in rows] == ['|'.join(truth), 'basophil|platelet', 'no finding']
    n = Server.db_count(ml['server'], 'feedback')
    assert n == s + 3
    # refused, and nothing stored: an unknown finding, an unknown id, no findings at all, a label route, a mask route
    r = httpx.post(url + '/feedback/findings', json=dict(prediction_id=c, findings=['basophil', 'blast']), timeout=30)
    assert r.status_code == 400 and r.json()['error'] == 'invalid_label' and "'blast'" in r.json()['detail']
    r = httpx.post(url + '/feedback/findings', data={'prediction_id': c, 'findings': ['basophil', 'cat']}, timeout=30)
    assert r.status_code == 400
    assert httpx.post(url + '/feedback/findings', json=dict(prediction_id='0' * 32, findings=[]), timeout=30).status_code == 404
    r = httpx.post(url + '/feedback/findings', json=dict(prediction_id=c), timeout=30)
    assert r.status_code == 422 and 'findings is required' in r.text
    r = httpx.post(url + '/feedback', json=dict(prediction_id=c, label='basophil'), timeout=30)
    assert r.status_code == 422 and 'multilabel model' in r.json()['detail'], r.text
    r = httpx.post(url + '/feedback/mask', data={'prediction_id': c}, timeout=30)
    assert r.status_code == 422, r.text
    assert Server.db_count(ml['server'], 'feedback') == n and _feedback_of(home, c) == []


def test_browser_unticks_one_finding_ticks_another_and_saves(ml):
    """Headless Chromium: the Findings tab classifies an uploaded mosaic, shows a checklist pre-ticked with the present findings
    (probabilities in the labels) and a Grad-CAM; one finding is unticked, another ticked, saved; the store has that set."""
    if not Path('/usr/bin/chromium').exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    url, home, ds = ml['url'], ml['home'], ml['ds']
    x, _ = ds.arrays('test')
    preds = _predict(url, x[3:13])
    i = next(k for k, p in enumerate(preds) if 0 < len(p['present']) < len(ds.classes))   # one finding to untick, one to tick
    present = preds[i]['present']
    off, on = present[0], next(c for c in ds.classes if c not in present)
    expected = '|'.join(c for c in ds.classes if (c in present and c != off) or c == on)
    f = home/'upload.png'; f.write_bytes(_png(x[3 + i]))
    art = ROOT/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        try:
            page = b.new_page(viewport={'width': 1280, 'height': 1400})
            page.goto(url + '/ui/', wait_until='load')
            page.get_by_role('tab', name='Findings').click()
            page.wait_for_selector('#ml-upload input[type=file]', state='attached', timeout=60000)
            page.locator('#ml-upload input[type=file]').set_input_files(str(f))
            page.wait_for_timeout(500)
            page.locator('#ml-classify').click()
            page.wait_for_function("/prediction id [0-9a-f]{32}/.test((document.querySelector('#ml-info') || {}).innerText || '')", timeout=60000)
            pid = re.search(r'prediction id ([0-9a-f]{32})', page.locator('#ml-info').inner_text()).group(1)
            box = lambda name: page.locator('#ml-findings').get_by_role('checkbox', name=re.compile(rf'^{re.escape(name)} \(p = '))
            checked = [c for c in ds.classes if box(c).is_checked()]
            assert checked == present                                      # the same image, the same model: pre-ticked as predicted
            assert re.search(rf'{re.escape(on)} \(p = [01]\.\d{{3}}, threshold', page.locator('#ml-findings').inner_text())
            page.wait_for_function("() => { const i = document.querySelector('#ml-cam img'); return i && i.naturalWidth > 0; }", timeout=30000)
            box(off).uncheck(); box(on).check()
            page.locator('#ml-save').click()
            page.wait_for_function("() => ((document.querySelector('#ml-saved') || {}).innerText || '').includes('Saved')", timeout=30000)
            page.screenshot(path=str(art/'multilabel_findings.png'), full_page=True)
        finally: b.close()
    assert _feedback_of(home, pid) == [expected]
    with _store(home) as st:
        assert st.prediction(pid)['label'] == ('|'.join(present))


def test_drift_check_and_dashboard_per_finding(ml):
    "`biovis drift check` on the multi-label model: per-finding KS of the probabilities and rate tests; the dashboard's figures per finding."
    url, home, ds = ml['url'], ml['home'], ml['ds']
    x, _ = ds.arrays('test')
    _predict(url, x[:32])
    env = dict(BIOVIS_MODELS=str(home/'models'), BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db')
    r = run_cli('drift', 'check', '--model', NAME, '--no-record', home=home, env=env, check=0)
    assert 'per finding' in r.stdout and all(c[:40] in r.stdout for c in ds.classes), r.stdout
    rep = json.loads(Path(re.search(r'report: (\S+\.json)', r.stdout).group(1)).read_text())
    assert rep['decision'] == 'thresholds' and rep['n'] >= 32 and set(rep['per_class']) == set(ds.classes)
    assert all({'probability_ks_p', 'rate_p', 'rate_reference', 'rate_recent'} <= set(v) for v in rep['per_class'].values())
    assert set(rep['tests']['class_proportions_chi2']['per_class']) == set(ds.classes)
    from biovis.dashboard import load_drift, clear_cache, proportions_figure, per_class_figure
    clear_cache()
    d = load_drift(NAME, 200, models_dir=str(home/'models'), db_url=env['BIOVIS_DB_URL'])
    assert 'error' not in d and d['decision'] == 'thresholds' and set(d['recent_props']) == set(ds.classes)
    assert set(d['per_class']) == set(ds.classes)
    assert [t.name for t in proportions_figure(d['ref_props'], d['recent_props'], d['decision']).data] == ['reference', 'recent']
    assert list(per_class_figure(d['per_class'], d['threshold']).data[0].x) == ds.classes


def test_retrain_from_corrected_sets(ml):
    """Corrected finding sets sent to the server feed `biovis retrain`: FB_THRESH counts them, the new dataset version adds the new
    images with their sets and relabels a training mosaic (a held-out one left out), the candidate is registered with its macro AUC."""
    from biovis.registry import ModelRegistry
    from biovis.pipeline import retrain_decision, load_dataset_version
    from biovis.multilabel import bloodmnist_mosaics
    url, home, ds = ml['url'], ml['home'], ml['ds']
    new = bloodmnist_mosaics(n=dict(train=2), seed=9).array                     # mosaics the base does not have
    tr, te = int(ds.idxs('train')[0]), int(ds.idxs('test')[5])
    sets = [['platelet'], ['basophil', 'neutrophil'], [c for c in ds.classes if c not in ds.findings(tr)][:2], ['eosinophil']]
    for img, names in zip([new[0], new[1], ds.image(tr), ds.image(te)], sets):
        pid = _predict(url, [img])[0]['id']
        r = httpx.post(url + '/feedback/findings', json=dict(prediction_id=pid, findings=names), timeout=30)
        assert r.status_code == 200 and r.json()['status'] == 'saved', r.text
    reg = ModelRegistry(home/'models')
    with _store(home) as st:
        n = len([r for r in st.feedback_rows() if r['model'] == NAME])
        assert not retrain_decision(st, reg, NAME, threshold=n + 1).proceed
        d = retrain_decision(st, reg, NAME, threshold=n)
    assert d.proceed and d.task == 'multilabel' and f'{n} new corrected finding sets since' in d.reason
    env = dict(BIOVIS_MODELS=str(home/'models'), BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db', BIOVIS_FB_THRESH=str(n))
    r = run_cli('retrain', NAME, '--epochs', '1', '--json', home=home, env=env, check=0)
    res = json.loads(r.stdout)
    assert res['status'] == 'done' and res['decision']['task'] == 'multilabel' and res['decision']['new_feedback'] == n
    fb = res['dataset']['feedback']
    # the other corrected images (also those of the tests above) are test mosaics: left out of training
    assert res['dataset']['base_matches_recorded'] and (fb['added'], fb['relabelled'], fb['in_holdout']) == (2, 1, fb['images'] - 3), fb
    meta = reg.metadata(NAME, res['version'])
    assert res['version'] == 'v2' and reg.aliases(NAME)['candidate'] == 'v2' and meta['task'] == 'multilabel'
    assert 0 <= meta['metrics']['macro_auc'] <= 1 and meta['promotion']['metric'] == 'macro_auc' and 'macro_auc' in meta['promotion']['reason']
    assert meta['drift']['decision'] == 'thresholds' and (reg.path(NAME, 'v2')/'drift.npz').exists()
    v = load_dataset_version(res['dataset']['path'])
    names = lambda split: [v.findings(int(i)) for i in v.idxs(split)]
    assert names('train')[-2:] == sets[:2] and names('train')[0] == sets[2]
    assert np.array_equal(v.arrays('test')[1], ds.arrays('test')[1]) and np.array_equal(v.arrays('test')[0], ds.arrays('test')[0])
