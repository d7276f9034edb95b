"""Hostile input against the real server on a loopback port (issue 13): a corpus built in code, each case answered
with a 4xx and a JSON error code, nothing stored, the server alive and `/ping` answering afterwards, and nothing written
outside BIOVIS_HOME. Plus the two behaviours that need timing to show: a pixel-dense upload does not hold the event loop,
and one request cannot make the server decode more than its budget."""
import threading, time

import httpx
import numpy as np
import pytest

from conftest import add_users
from test_serve import Server


from biovis.bench.hostile import predict_corpus, feedback_corpus, dense_png, cell_png, dicom_bytes

CORPUS, CELL = predict_corpus(), cell_png()


def _files(*parts): return [('files', p) for p in parts]


@pytest.fixture(scope='module')
def hostile(trained, tmp_path_factory):
    home, tmp = tmp_path_factory.mktemp('hostile'), tmp_path_factory.mktemp('hostile-tmpdir')
    s = Server(home, trained[0].root, extra_env=dict(TMPDIR=str(tmp)))      # the system temp folder the server would use
    s.tmpdir = tmp
    yield s
    s.stop()


def _check_refused(server, r, statuses, codes, n_pred):
    assert r.status_code in statuses and 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert body['error'] in codes and isinstance(body['detail'], (str, list)), body
    assert server.db_count('predictions') == n_pred
    t0 = time.perf_counter()
    assert httpx.get(server.url + '/ping', timeout=5).status_code == 200
    return time.perf_counter() - t0


@pytest.mark.parametrize('case', list(CORPUS))
def test_hostile_predict_is_4xx_json_and_stores_nothing(hostile, case):
    kw, statuses, codes = CORPUS[case]
    n = hostile.db_count('predictions')
    r = httpx.post(hostile.url + '/predict', timeout=120, **kw)
    _check_refused(hostile, r, statuses, codes, n)


@pytest.mark.parametrize('case', list(feedback_corpus('x')))
def test_hostile_feedback_is_4xx_json_and_stores_nothing(hostile, case):
    pid = httpx.post(hostile.url + '/predict', files=_files(('a.png', CELL, 'image/png')), timeout=30).json()['predictions'][0]['id']
    n_fb = hostile.db_count('feedback')
    kw, statuses, codes = feedback_corpus(pid)[case]
    r = httpx.post(hostile.url + kw.pop('path', '/feedback'), timeout=30, **kw)
    _check_refused(hostile, r, statuses, codes, hostile.db_count('predictions'))
    assert hostile.db_count('feedback') == n_fb


def test_multiframe_rgb_dicom_is_classified_not_a_500(hostile):
    "A multi-frame RGB DICOM was a 500; its first frame is an image like any other."
    frames = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    r = httpx.post(hostile.url + '/predict', files=_files(('cine.dcm', dicom_bytes(frames), 'application/dicom')), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()['predictions'][0]['label']


def test_a_dense_upload_does_not_hold_the_event_loop(hostile):
    """While one request decodes an 8000 x 8000 PNG (about 1-2 s here), /ping keeps answering: before issue 13 such an
    upload (under 256 KB) was decoded on the event loop and every request waited for it."""
    done, pings = threading.Event(), []
    def upload():
        try: httpx.post(hostile.url + '/predict', files=_files(('dense.png', dense_png(), 'image/png')), timeout=120)
        finally: done.set()
    t = threading.Thread(target=upload); t.start()
    time.sleep(0.3)                                   # the upload is being decoded
    while not done.is_set():
        t0 = time.perf_counter(); httpx.get(hostile.url + '/ping', timeout=30); pings.append((time.perf_counter() - t0, done.is_set()))
    t.join()
    during = [p for p, d in pings if not d]
    assert len(during) >= 3, f'/ping answered only {len(during)} times while the dense upload ran: the loop was held'


def test_nothing_written_outside_biovis_home(hostile):
    "After the whole corpus, the server's temp folder (TMPDIR) is empty: uploads are read in memory and caches live under BIOVIS_HOME."
    left = [str(p.relative_to(hostile.tmpdir)) for p in hostile.tmpdir.rglob('*')]
    assert not left, left[:20]


def test_a_clinician_cannot_correct_another_clinicians_prediction(trained, tmp_path):
    "Finding 4 of issue 13: REST /feedback and /feedback/mask wrote on anyone's prediction; the owner then saw the note."
    add_users(tmp_path)
    s = Server(tmp_path, trained[0].root, args=['--auth'])
    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        h = {u: {'Authorization': 'Bearer ' + c.post('/token', data=dict(username=u, password=f'{u}-secret-pw')).json()['access_token']}
             for u in ('ana', 'bo', 'root')}
        pid = c.post('/predict', files=_files(('a.png', CELL, 'image/png')), headers=h['ana']).json()['predictions'][0]['id']
        n_fb = s.db_count('feedback')
        r = c.post('/feedback', json=dict(prediction_id=pid, label='basophil', note='a stranger writes'), headers=h['bo'])
        assert r.status_code == 403 and r.json()['error'] == 'forbidden', r.text
        r = c.post('/feedback/mask', data=dict(prediction_id=pid), headers=h['bo'])
        assert r.status_code in (403, 422), r.text
        assert s.db_count('feedback') == n_fb
        assert c.post('/feedback', json=dict(prediction_id=pid, label='basophil'), headers=h['ana']).status_code == 200     # the owner
        assert c.post('/feedback', json=dict(prediction_id=pid, label='eosinophil'), headers=h['root']).status_code == 200  # an admin
        notes = [f['note'] for r in c.get('/history', headers=h['ana']).json()['history'] for f in r['feedback']]
        assert 'a stranger writes' not in notes and s.db_count('feedback') == n_fb + 2
    finally: s.stop()
