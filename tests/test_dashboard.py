"The Panel dashboard for real: `biovis dashboard --auth` on a loopback port, logged into with the store's users, fetched with httpx and rendered in headless Chromium."
import io, json, os, socket, subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import BIOVIS, ROOT, wait_until_up, stop_process, spawn_cli


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def populated(trained, sample_ds, tmp_path_factory):
    "A home whose store holds 120 in-distribution then 120 brighter predictions (with drift features), feedback, users, a drift event and a run."
    from biovis.feedback import FeedbackStore
    from biovis.inference import Predictor
    from biovis.drift import predict_with_features
    home = tmp_path_factory.mktemp('dash')
    store = FeedbackStore(f'sqlite:///{home}/data/biovis.db', uploads_dir=home/'data'/'uploads')
    p = Predictor.from_registry('blood', registry=trained[0], device='cpu')
    x, y = sample_ds.tensors('test')
    x = np.concatenate([x[:120], np.clip(x[120:240] * 1.4, 0, 255).astype(np.uint8)]); y = y[:240]
    for i, (a, t) in enumerate(zip(x, y)):
        b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); sha = store.save_image(b.getvalue())
        (pr,), f = predict_with_features(p, [b.getvalue()])
        pid = store.log_prediction('blood', pr.version, sha, pr.label, pr.probs, embedding=f[0], user='ana')
        if i % 10 == 0: store.add_feedback(pid, sample_ds.classes[t], user='ana')
    store.record_drift('blood', 'v1', True, {'p_values': {'image_stats_ks': 1e-9}})
    store.add_user('boss', 'admin-password-1', 'admin'); store.add_user('ana', 'clinician-pass-1', 'clinician')
    run = home/'reports'/'runs'/'20260101-000000'; run.mkdir(parents=True)
    (run/'summary.json').write_text(json.dumps({'model': 'blood', 'candidate': 'v2', 'promoted': False, 'accuracy': 0.91}))
    return home, trained[0].root


@pytest.fixture(scope='module')
def dashboard(populated):
    home, models = populated
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
    env.update(BIOVIS_HOME=str(home), BIOVIS_MODELS=str(models), BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db')
    log = open(home/'dashboard.log', 'w')
    proc = spawn_cli('dashboard', '--port', port, '--auth', '--refresh', '5', env=env, cwd=home, log=log)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_until_up(proc, url + '/login', home/'dashboard.log', 'dashboard', timeout=180, poll=0.5)
        yield url, home
    finally: stop_process(proc, log)


def test_login_checks_the_store_users(dashboard):
    url, _ = dashboard
    r = httpx.get(url + '/', follow_redirects=False, timeout=30)
    assert r.status_code in (302, 303) and '/login' in r.headers['location']          # no data without a login
    def login(u, pw):
        c = httpx.Client(base_url=url, timeout=60, follow_redirects=True)
        c.post('/login', data=dict(username=u, password=pw))
        return c
    for u, pw in (('boss', 'wrong-password'), ('nobody', 'admin-password-1'), ('ana', 'clinician-pass-1')):
        c = login(u, pw)
        assert 'user' not in c.cookies, u                                              # refused: no session cookie
        assert '/login' in str(c.get('/').url)
    c = login('boss', 'admin-password-1')
    r = c.get('/')
    assert r.status_code == 200 and '/login' not in str(r.url)
    assert 'bokeh' in r.text.lower() and 'biovis' in r.text


def test_dashboard_renders_in_headless_chromium(dashboard, tmp_path):
    if not Path('/usr/bin/chromium').exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    url, home = dashboard
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = b.new_page(viewport={'width': 1400, 'height': 2200})
        page.goto(url + '/', wait_until='load', timeout=120000)
        page.fill('input[name=username]', 'boss'); page.fill('input[name=password]', 'admin-password-1')
        page.click('button[type=submit]')
        page.get_by_text('Drift tests: p-value per window').first.wait_for(timeout=120000)
        for t in ('Predicted classes: reference vs recent', 'Embeddings: reference vs recent', 'Image statistics: reference vs recent',
                  'Feedback volume and accuracy measured on feedback'):
            page.get_by_text(t).first.wait_for(timeout=60000)
        page.get_by_text('20260101-000000').first.wait_for(timeout=60000)           # the retraining run
        # Panel draws inside shadow roots: Playwright's locators look into them (inner_text('body') would not)
        page.get_by_text('Alias history (who moved production or candidate, when and why)').first.wait_for(timeout=60000)
        for t in ('blood v1', 'Drift detected in the last window.', 'production,candidate', 'cnn_small'):  # status, versions table
            page.get_by_text(t, exact=True).first.wait_for(timeout=60000)
        # the plots are drawn: Plotly made SVG traces for the p-values (4 tests + the detected-drift markers)
        assert page.locator('.js-plotly-plot .scatterlayer .trace').count() >= 5
        page.wait_for_timeout(1500)
        shot = tmp_path/'dashboard.png'
        page.screenshot(path=str(shot), full_page=True)
        b.close()
    assert shot.stat().st_size > 50_000
    art = ROOT/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
    (art/'dashboard.png').write_bytes(shot.read_bytes())


def test_loaders_and_views_read_the_same_store(populated, monkeypatch):
    from biovis.dashboard import clear_cache, load_alias_history, load_drift, load_feedback, load_models, load_runs, pvalue_figure
    home, models = populated
    url = f'sqlite:///{home}/data/biovis.db'
    clear_cache()
    d = load_drift('blood', 120, models_dir=models, db_url=url)
    assert d['version'] == 'v1' and len(d['probs']) == 120 and d['feats'].shape == (120, 38)
    assert [h['detected'] for h in d['history']] == [False, True] and len(d['events']) == 1
    assert len(pvalue_figure(d['history'], d['events']).data) == 4 + 2
    fb = load_feedback(url)
    assert fb['predictions'].sum() == 240 and fb['feedback'].sum() == 24
    assert 0 <= fb['accuracy_on_feedback'].dropna().iloc[-1] <= 1
    assert load_models(models)['aliases'].str.contains('production').any()
    assert load_runs(home/'reports').iloc[0]['candidate'] == 'v2'
    h = load_alias_history('blood', models)                  # the registry's log: the session model was registered, then promoted
    assert {'register', 'promote'} <= set(h['action']) and h['reason'].str.startswith('trained').any()
    assert h['time'].is_monotonic_decreasing and load_alias_history('', models).empty
