"The Review tab (issue 16): the review queue one image at a time, confirmed or corrected by a named reviewer, for real."
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import ROOT
from test_serve import Server, _png      # noqa: F401  (tests/ is on sys.path)

PW = {'ana': 'ana-secret-pw', 'bo': 'bo-secret-pw', 'root': 'root-secret-pw'}


def _store(home: Path):
    from biovis.feedback import FeedbackStore
    return FeedbackStore(f'sqlite:///{home}/data/biovis.db', uploads_dir=home/'data'/'uploads')


def _add_users(home: Path):
    "The clinicians ana and bo and the admin root, straight into the server's store (as `biovis users add` does)."
    with _store(home) as st:
        for u, role in (('ana', 'clinician'), ('bo', 'clinician'), ('root', 'admin')): st.add_user(u, PW[u], role)


def test_a_confirmation_is_feedback_with_the_predicted_label_and_leaves_the_queue(tmp_path):
    "The store side of Confirm: a feedback row with the predicted label under the reviewer's name; the queue and its count drop it."
    import io
    from PIL import Image
    from biovis.feedback import FeedbackStore
    with FeedbackStore(f'sqlite:///{tmp_path}/fb.db', uploads_dir=tmp_path/'up') as st:
        b = io.BytesIO(); Image.new('RGB', (8, 8), (9, 9, 9)).save(b, 'PNG'); sha = st.save_image(b.getvalue())
        log = lambda p, u: st.log_prediction('blood', 'v1', sha, 'blast', dict(normal=1 - p, blast=p), user=u)
        ana = [log(p, 'ana') for p in (0.55, 0.6, 0.7, 0.9)]
        anon, bo = log(0.65, None), log(0.52, 'bo')
        queue = lambda **kw: [r['prediction_id'] for r in st.review_queue(k=100, **kw)]
        assert queue(user='ana') == [ana[0], ana[1], anon, ana[2], ana[3]]        # most uncertain first, no embeddings
        assert st.review_remaining(user='ana') == 5 and st.review_remaining() == 6 == len(queue())
        top = st.review_queue(k=1, user='ana')[0]
        st.add_feedback(top['prediction_id'], top['label'], user='ana')          # Confirm: the predicted label, by ana
        st.add_feedback(ana[1], 'normal', user='ana')                             # Correct
        rows = {r['prediction_id']: r for r in st.feedback_rows()}
        assert (rows[ana[0]]['correct_label'], rows[ana[0]]['predicted_label'], rows[ana[0]]['user'], rows[ana[0]]['status']) \
            == ('blast', 'blast', 'ana', 'accepted')
        assert (rows[ana[1]]['correct_label'], rows[ana[1]]['user']) == ('normal', 'ana')
        assert queue(user='ana') == [anon, ana[2], ana[3]] and queue(user='bo') == [bo, anon]
        assert st.review_remaining(user='ana') == 3 and st.review_remaining() == 4
        assert st.review_remaining(model='other') == 0 and st.review_remaining(recent=2) == 2     # the newest two: anon, bo
        h = {r['id']: r for r in st.history('ana')}
        assert [(f['correct_label'], f['user'], f['reviewed_by']) for f in h[ana[0]]['feedback']] == [('blast', 'ana', None)]


def test_review_functions_on_the_real_service(trained, home, sample_ds):
    "review_next/review_save on the real PredictionService: the stored image enlarged, the set of the served version, a confirmation saved under the user."
    from biovis.serve.pool import ModelPool
    from biovis.serve.service import PredictionService
    from biovis.serve.ui import review_next, review_save
    x, _ = sample_ds.tensors('test')
    with _store(home) as st:
        st.add_user('ana', PW['ana'], 'clinician')
        svc = PredictionService(ModelPool(trained[0]), st)
        ids = [svc.predict(_png(x[i]), filename=f'c{i}.png', user='ana')['id'] for i in range(4)]
        other = svc.predict(_png(x[9]), filename='bo.png', user='bo')['id']
        ana = SimpleNamespace(username='ana')
        r = review_next(svc, 'blood', request=ana)
        item = r['item']
        assert item['prediction_id'] in ids and r['image'].shape == (280, 280, 3)        # 28 px, enlarged by whole pixels
        assert f"**{item['label']}** (p = {item['probs'][item['label']]:.3f}) · model **blood v1**" in r['info']
        assert '**4** left to review' in r['info'] and 'prediction set: **' in r['info']
        assert review_save(svc, item, request=ana) == f"✅ Confirmed `{item['prediction_id']}`: **{item['label']}**."
        fb = st.history('ana', limit=None)
        saved = [(p['id'], f['correct_label'], f['user']) for p in fb for f in p['feedback']]
        assert saved == [(item['prediction_id'], item['label'], 'ana')]
        nxt = review_next(svc, 'blood', request=ana)
        assert nxt['item']['prediction_id'] not in (item['prediction_id'], other) and '**3** left' in nxt['info']


@pytest.fixture(scope='module')
def review_server(trained, tmp_path_factory):
    "`biovis serve --auth` with ana, bo (clinicians) and root (admin)."
    home = tmp_path_factory.mktemp('review')
    _add_users(home)
    s = Server(home, trained[0].root, args=['--auth'])
    yield s
    s.stop()


def _bearer(url, u):
    r = httpx.post(url + '/token', data=dict(username=u, password=PW[u]), timeout=30)
    assert r.status_code == 200, r.text
    return {'Authorization': 'Bearer ' + r.json()['access_token']}


_SHOWN = ("prev => { const t = (document.querySelector('#review-info') || {}).innerText || '';"
          " const m = t.match(/prediction id ([0-9a-f]{32})/); return m && m[1] !== prev; }")


def _shown(page, prev: str = '') -> dict:
    "Wait until the Review tab shows a prediction other than `prev`; its id, label, two best classes and the count left."
    page.wait_for_function(_SHOWN, arg=prev, timeout=60000)
    t = page.locator('#review-info').inner_text()
    m = re.search(r'(\S[^\n]*?) \(p = ([0-9.]+)\) · model blood v1 · prediction id ([0-9a-f]{32})', t)
    top = re.search(r'most probable classes: ([^,]+) ([0-9.]+), ([^)]+) ([0-9.]+)\)', t)
    left = re.search(r'(\d+) left to review', t)
    assert m and top and left, t
    return dict(id=m.group(3), label=m.group(1).strip(), second=top.group(3).strip(), left=int(left.group(1)))


def _saved(page, text: str):
    page.wait_for_function("t => ((document.querySelector('#review-saved') || {}).innerText || '').includes(t)", arg=text, timeout=30000)


def _class_number(page, name: str) -> str:
    "The number key of class `name`, read from the radio's labels ('2 · eosinophil')."
    for lab in page.locator('#review-classes label').all_inner_texts():
        n, _, c = lab.strip().partition(' · ')
        if c == name: return n
    raise AssertionError(f'{name} is not among the classes on the page')


def test_browser_reviews_the_queue_by_keys_and_clicks(review_server, sample_ds):
    """Headless Chromium logged in as the clinician ana: the Review tab shows her queue; `c` confirms one, a click on a class
    and Correct corrects one, `n` skips one, a number key and Enter correct one; the store has each under ana's name, the
    skipped one has nothing, and GET /review/next no longer holds the reviewed ones."""
    if not Path('/usr/bin/chromium').exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    s = review_server
    x, _ = sample_ds.tensors('test')
    ana, bo, root = (_bearer(s.url, u) for u in ('ana', 'bo', 'root'))
    files = lambda idx: [('files', (f'cell{i}.png', _png(x[i]), 'image/png')) for i in idx]
    r = httpx.post(s.url + '/predict', files=files(range(6)), headers=ana, timeout=120)
    assert r.status_code == 200, r.text
    mine = {p['id'] for p in r.json()['predictions']}
    r = httpx.post(s.url + '/predict', files=files(range(10, 12)), headers=bo, timeout=120)
    theirs = {p['id'] for p in r.json()['predictions']}
    art = ROOT/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = b.new_page(viewport={'width': 1280, 'height': 1400})
        try:
            page.goto(s.url + '/ui/', wait_until='load')
            assert '/login' in page.url
            page.fill('#username', 'ana'); page.fill('#password', PW['ana']); page.click('#login')
            page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60000)
            page.get_by_role('tab', name='Review').click()
            one = _shown(page)                                    # opening the tab loads the first one
            assert one['id'] in mine and one['left'] == 6
            assert 'prediction set:' in page.locator('#review-info').inner_text()
            legend = page.locator('#review-legend').inner_text()
            assert all(k in legend for k in ('c confirm', '1 … 9 pick the class', 'Enter save', 'n skip')), legend
            page.wait_for_selector('#review-image img', timeout=30000)
            page.keyboard.press('c')                              # confirm by key
            two = _shown(page, one['id'])
            _saved(page, f"Confirmed {one['id']}")
            assert two['id'] in mine and two['left'] == 5
            radio = page.locator('#review-classes').get_by_role('radio', name=f"{_class_number(page, two['second'])} · {two['second']}")
            radio.check()                                          # correct by clicking a class, then Correct
            page.locator('#review-correct').click()
            three = _shown(page, two['id'])
            _saved(page, f"Corrected {two['id']}")
            assert three['left'] == 4
            page.keyboard.press('n')                              # skip: nothing saved
            four = _shown(page, three['id'])
            _saved(page, f"Skipped {three['id']}")
            assert four['left'] == 4 and four['id'] in mine
            page.keyboard.press(_class_number(page, four['second']))   # pick by number, save with Enter
            page.wait_for_function("() => !!document.querySelector('#review-classes input:checked')", timeout=10000)
            page.keyboard.press('Enter')
            five = _shown(page, four['id'])
            _saved(page, f"Corrected {four['id']}")
            assert five['left'] == 3
            page.screenshot(path=str(art/'review_tab.png'), full_page=True)
        except Exception:
            page.screenshot(path=str(art/'review_tab_failed.png'), full_page=True)
            raise
        finally: b.close()
    with _store(s.home) as st:
        fb = {}
        for r in st.history('ana', limit=None):
            for f in r['feedback']: fb.setdefault(r['id'], []).append((f['correct_label'], f['user']))
    assert fb == {one['id']: [(one['label'], 'ana')], two['id']: [(two['second'], 'ana')], four['id']: [(four['second'], 'ana')]}
    q = [r['prediction_id'] for r in httpx.get(s.url + '/review/next?n=100', headers=ana, timeout=60).json()['queue']]
    assert set(q) == mine - {one['id'], two['id'], four['id']} and three['id'] in q
    everyone = {r['prediction_id'] for r in httpx.get(s.url + '/review/next?n=100', headers=root, timeout=60).json()['queue']}
    assert theirs <= everyone and not everyone & {one['id'], two['id'], four['id']}
