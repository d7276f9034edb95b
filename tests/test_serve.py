"The demo server for real: `biovis serve` on a loopback port, called with httpx, gradio_client and headless Chromium."
import io, json, os, socket, sqlite3, subprocess, sys, time, zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import BIOVIS, ROOT, SHARED_DATA, run_cli, add_users, spawn_cli


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


class Server:
    "`biovis serve` in a subprocess on a free loopback port, stopped at the end."
    def __init__(self, home: Path, models_dir: Path, extra_env=None, args=()):
        self.home, self.port = home, _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        env = {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}
        env.update(BIOVIS_HOME=str(home), BIOVIS_MODELS=str(models_dir), BIOVIS_RATE_LIMIT='0', GRADIO_ANALYTICS_ENABLED='False',
                   BIOVIS_DB_URL=f'sqlite:///{home}/data/biovis.db')
        env.update(extra_env or {})
        self.env = env
        self.log = open(home/f'server-{self.port}.log', 'w')
        self.proc = spawn_cli('serve', '--port', self.port, *args, env=env, cwd=home, log=self.log)
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f'server died: {(home/f"server-{self.port}.log").read_text()[-3000:]}')
            try:
                if httpx.get(self.url + '/ping', timeout=2).status_code == 200: return
            except httpx.HTTPError: pass
            time.sleep(0.3)
        raise RuntimeError('server did not start in 120 s')

    def db_count(self, table):
        with sqlite3.connect(self.home/'data'/'biovis.db') as c: return c.execute(f'select count(*) from {table}').fetchone()[0]

    def stop(self):
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        self.log.close()


@pytest.fixture(scope='module')
def cells(sample_ds):
    x, y = sample_ds.tensors('test')
    return [(_png(x[i]), sample_ds.classes[y[i]]) for i in range(40)]


@pytest.fixture(scope='module')
def server(trained, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp('srv'), trained[0].root)
    yield s
    s.stop()


def test_ping_predict_feedback_metrics(server, cells):
    c = httpx.Client(base_url=server.url, timeout=30)
    ping = c.get('/ping').json()
    assert ping['status'] == 'ok' and ping['models'] == {'blood': 'v1'}
    png, truth = cells[0]
    r = c.post('/predict', files=[('files', ('cell.png', png, 'image/png'))])
    assert r.status_code == 200, r.text
    p = r.json()['predictions'][0]
    assert p['model'] == 'blood' and p['version'] == 'v1' and abs(sum(p['probs'].values()) - 1) < 1e-4 and p['latency_ms'] > 0
    n_fb = server.db_count('feedback')
    r = c.post('/feedback', json=dict(prediction_id=p['id'], label=truth, note='seen under the microscope'))
    assert r.status_code == 200 and r.json()['status'] == 'saved'
    assert server.db_count('feedback') == n_fb + 1
    # the uploaded image is stored once, by content hash, never under the client's name
    sha = p['image_sha256']
    assert (server.home/'data'/'uploads'/sha[:2]/f'{sha}.png').exists()
    m = c.get('/metrics').text
    assert 'biovis_predictions_total{' in m and 'biovis_feedback_total{model="blood"}' in m
    assert 'biovis_model_info{model="blood",version="v1"} 1.0' in m
    assert 'biovis_request_seconds_bucket{endpoint="/predict"' in m
    assert c.get('/docs').status_code == 200 and '/predict' in c.get('/openapi.json').text


def test_many_images_and_a_zip_in_one_request(server, cells):
    zb = io.BytesIO()
    with zipfile.ZipFile(zb, 'w') as z:
        for i in range(5): z.writestr(f'folder/cell{i}.png', cells[i][0])
    r = httpx.post(server.url + '/predict', timeout=60, files=[('files', ('a.png', cells[5][0], 'image/png')),
                                                              ('files', ('batch.zip', zb.getvalue(), 'application/zip'))])
    assert r.status_code == 200 and r.json()['count'] == 6
    assert [p['filename'] for p in r.json()['predictions']][1:] == [f'folder/cell{i}.png' for i in range(5)]


def _zip(entries, method=zipfile.ZIP_DEFLATED):
    b = io.BytesIO()
    with zipfile.ZipFile(b, 'w', method) as z:
        for n, d in entries: z.writestr(n, d)
    return b.getvalue()


def _bomb_png():
    b = io.BytesIO(); Image.fromarray(np.zeros((9000, 9000), np.uint8)).save(b, 'PNG'); return b.getvalue()


BAD_UPLOADS = {
    'not an image': ('a.png', b'%PDF-1.4 hello'),
    'corrupt': ('c.png', b'\x89PNG\r\n\x1a\n' + b'\x00' * 64),
    'empty': ('e.png', b''),
    'decompression bomb': ('bomb.png', None),
    'zip with ../': ('evil.zip', _zip([('../../etc/evil.png', b'x')])),
    'zip bomb': ('bomb.zip', _zip([('zeros.png', b'\0' * 30_000_000)])),
    'not a zip': ('fake.zip', b'PK\x03\x04 broken'),
}


@pytest.mark.parametrize('case', list(BAD_UPLOADS))
def test_bad_uploads_are_4xx_json_and_store_nothing(server, case):
    name, data = BAD_UPLOADS[case]
    if data is None: data = _bomb_png()
    n = server.db_count('predictions')
    r = httpx.post(server.url + '/predict', files=[('files', (name, data, 'application/octet-stream'))], timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert body['error'] in ('invalid_image', 'invalid_zip') and len(body['detail']) > 10
    assert server.db_count('predictions') == n
    assert httpx.get(server.url + '/ping').status_code == 200


def test_bad_feedback_is_4xx(server, cells):
    p = httpx.post(server.url + '/predict', files=[('files', ('x.png', cells[1][0], 'image/png'))]).json()['predictions'][0]
    n = server.db_count('feedback')
    assert httpx.post(server.url + '/feedback', json=dict(prediction_id=p['id'], label='unicorn')).status_code == 400
    r = httpx.post(server.url + '/feedback', json=dict(prediction_id='no-such-id', label='basophil'))
    assert r.status_code == 404 and r.json()['error'] == 'unknown_prediction'
    assert httpx.post(server.url + '/feedback', json=dict(label='basophil')).status_code == 422
    assert httpx.post(server.url + '/feedback', content=b'{broken', headers={'content-type': 'application/json'}).status_code == 400
    assert httpx.post(server.url + '/predict').status_code == 422
    assert httpx.post(server.url + '/feedback', data=dict(label='basophil'),
                      files=dict(file=('x.png', b'not an image', 'image/png'))).status_code == 400
    assert server.db_count('feedback') == n


def test_feedback_with_the_image_instead_of_an_id(server, cells):
    png, truth = cells[3]
    n_p, n_f = server.db_count('predictions'), server.db_count('feedback')
    r = httpx.post(server.url + '/feedback', data=dict(label=truth, note='from the lab system'),
                   files=dict(file=('slide.png', png, 'image/png')))
    assert r.status_code == 200 and r.json()['status'] == 'saved'
    assert (server.db_count('predictions'), server.db_count('feedback')) == (n_p + 1, n_f + 1)


def test_upload_over_the_size_limit(trained, tmp_path, cells):
    s = Server(tmp_path, trained[0].root, extra_env=dict(BIOVIS_MAX_UPLOAD_MB='1'))
    try:
        big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8))
        b = io.BytesIO(); big.save(b, 'PNG')
        assert len(b.getvalue()) > 2**20
        r = httpx.post(s.url + '/predict', files=[('files', ('big.png', b.getvalue(), 'image/png'))], timeout=60)
        assert r.status_code == 413 and 'limit' in r.json()['detail']
        assert httpx.post(s.url + '/predict', files=[('files', ('ok.png', cells[0][0], 'image/png'))]).status_code == 200
    finally: s.stop()


def test_load_8_clients_x_100_requests(server, cells):
    "8 concurrent clients, 100 requests each, predict and feedback interleaved: nothing fails, every feedback row is stored."
    before = server.db_count('feedback')
    def client(k):
        ok_fb, fails = 0, []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            pid = None
            for i in range(100):
                png, truth = cells[(k * 7 + i) % len(cells)]
                if i % 2 == 0 or pid is None:
                    r = c.post('/predict', files=[('files', (f'c{k}_{i}.png', png, 'image/png'))])
                    if r.status_code != 200: fails.append(r.status_code); continue
                    pid = r.json()['predictions'][0]['id']
                else:
                    r = c.post('/feedback', json=dict(prediction_id=pid, label=truth, note=f'client {k} request {i}'))
                    if r.status_code != 200: fails.append(r.status_code); continue
                    ok_fb += 1
        return ok_fb, fails
    with ThreadPoolExecutor(8) as ex: res = list(ex.map(client, range(8)))
    assert all(not f for _, f in res), [f for _, f in res]
    assert server.db_count('feedback') - before == sum(n for n, _ in res) == 400
    assert httpx.get(server.url + '/ping').json()['status'] == 'ok'
    with sqlite3.connect(server.home/'data'/'biovis.db') as c:
        assert c.execute('pragma integrity_check').fetchone()[0] == 'ok'


def test_promotion_is_picked_up_without_restart(trained, tmp_path, cells):
    import shutil
    from biovis.registry import ModelRegistry
    shutil.copytree(trained[0].root, tmp_path/'models')
    reg = ModelRegistry(tmp_path/'models')
    s = Server(tmp_path, reg.root)
    try:
        assert httpx.get(s.url + '/ping').json()['models']['blood'] == 'v1'
        v2 = reg.register('blood', trained[1].model, trained[1].biovis)
        reg.promote('blood', v2)
        r = httpx.post(s.url + '/predict', files=[('files', ('x.png', cells[0][0], 'image/png'))]).json()
        assert r['predictions'][0]['version'] == 'v2'
        reg.rollback('blood')
        assert httpx.get(s.url + '/ping').json()['models']['blood'] == 'v1'
    finally: s.stop()


def test_rate_limit_answers_429(trained, tmp_path, cells):
    s = Server(tmp_path, trained[0].root, extra_env=dict(BIOVIS_RATE_LIMIT='0.5', BIOVIS_RATE_BURST='2'))
    try:
        codes = [httpx.post(s.url + '/predict', files=[('files', ('x.png', cells[0][0], 'image/png'))]).status_code for _ in range(4)]
        assert codes[:2] == [200, 200] and codes[-1] == 429
        assert httpx.get(s.url + '/ping').status_code == 200
    finally: s.stop()


def test_auth_roles_against_each_endpoint(trained, tmp_path, cells):
    add_users(tmp_path)
    s = Server(tmp_path, trained[0].root, args=['--auth'])
    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        tok = lambda u, pw=None: c.post('/token', data=dict(username=u, password=pw or f'{u}-secret-pw'))
        assert tok('ana', 'wrong-password').status_code == 401
        h = {u: {'Authorization': 'Bearer ' + tok(u).json()['access_token']} for u in ('ana', 'bo', 'root')}
        files = lambda: [('files', ('x.png', cells[0][0], 'image/png'))]
        n_pred, n_fb = s.db_count('predictions'), s.db_count('feedback')
        # no token, or a forged one: 401 everywhere, nothing touched
        for hdr in ({}, {'Authorization': 'Bearer forged.token'}):
            assert c.post('/predict', files=files(), headers=hdr).status_code == 401
            assert c.post('/feedback', json=dict(prediction_id='x', label='basophil'), headers=hdr).status_code == 401
            assert c.get('/history', headers=hdr).status_code == 401
            assert c.get('/models', headers=hdr).status_code == 401
            assert c.delete('/history/x', headers=hdr).status_code == 401
        assert (s.db_count('predictions'), s.db_count('feedback')) == (n_pred, n_fb)
        assert c.get('/ping').status_code == 200                          # health stays open
        # clinicians: predict, feedback, own history; not others', not models
        pa = c.post('/predict', files=files(), headers=h['ana']).json()['predictions'][0]
        pb = c.post('/predict', files=files(), headers=h['bo']).json()['predictions'][0]
        assert c.post('/feedback', json=dict(prediction_id=pa['id'], label='basophil'), headers=h['ana']).status_code == 200
        assert [r['id'] for r in c.get('/history', headers=h['ana']).json()['history']] == [pa['id']]
        assert c.get('/history', params={'all': 'true'}, headers=h['ana']).status_code == 403
        assert c.get('/models', headers=h['ana']).status_code == 403
        assert c.delete(f'/history/{pb["id"]}', headers=h['ana']).status_code == 403
        assert s.db_count('predictions') == n_pred + 2
        # admin: everything
        ids = {r['id'] for r in c.get('/history', params={'all': 'true'}, headers=h['root']).json()['history']}
        assert {pa['id'], pb['id']} <= ids
        assert c.get('/models', headers=h['root']).json()['served'] == {'blood': 'v1'}
        assert c.delete(f'/history/{pb["id"]}', headers=h['root']).status_code == 200
        assert c.delete(f'/history/{pa["id"]}', headers=h['ana']).status_code == 200   # own upload
        assert s.db_count('predictions') == n_pred and s.db_count('feedback') == n_fb
        # the UI asks for a login too
        assert c.get('/ui/config').status_code == 401
        r = c.post('/ui/login', data=dict(username='ana', password='ana-secret-pw'))
        assert r.status_code == 200 and c.get('/ui/config').status_code == 200
    finally: s.stop()


def test_gradio_client_classifies_and_flags(server, cells, tmp_path):
    from gradio_client import Client, handle_file
    (tmp_path/'cell.png').write_bytes(cells[2][0])
    cl = Client(server.url + '/ui/', verbose=False)
    label, cam, info, table = cl.predict([handle_file(str(tmp_path/'cell.png'))], 'blood', api_name='/classify')
    assert label['label'] in {c['label'] for c in label['confidences']}
    n = server.db_count('feedback')
    pid = info.split('`')[1]
    msg = cl.predict(pid, cells[2][1], api_name='/correct')
    assert 'Saved' in msg and server.db_count('feedback') == n + 1


def test_browser_upload_predict_and_flag(server, sample_ds, tmp_path):
    "Headless Chromium: upload a BloodMNIST cell and a BCCD smear, read the predicted label, flag it, find the flag in the store."
    if not Path('/usr/bin/chromium').exists(): pytest.skip('chromium is not installed (apt-get install chromium)')
    from playwright.sync_api import sync_playwright
    x, y = sample_ds.tensors('test')
    Image.fromarray(x[3]).save(tmp_path/'cell.png')
    uploads = [tmp_path/'cell.png']
    smear = SHARED_DATA/'bccd'/'BCCD'/'JPEGImages'/'BloodImage_00001.jpg'
    if smear.exists(): uploads.append(smear)
    art = ROOT/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = b.new_page(viewport={'width': 1280, 'height': 1400})
        page.goto(server.url + '/ui/', wait_until='load')
        page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60000)
        last_id = ''
        for i, f in enumerate(uploads):
            if i: page.reload(wait_until='load'); page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60000)
            page.locator('#upload input[type=file]').set_input_files(str(f))
            page.wait_for_timeout(500)
            page.locator('#classify').click()
            page.wait_for_function(
                "prev => { const t = (document.querySelector('#info') || {}).innerText || '';"
                " const m = t.match(/prediction id ([0-9a-f]{32})/); return m && m[1] !== prev && !t.includes('processing'); }",
                arg=last_id, timeout=60000)
            import re
            m = re.search(r'([a-z][a-z ]+) \(p = ([0-9.]+)\) · model (\S+) (\S+) · prediction id ([0-9a-f]{32})',
                          page.locator('#info').inner_text())
            predicted, pid = m.group(1).strip(), m.group(5)
            assert predicted in sample_ds.classes and m.group(3) == 'blood', m.group(0)
            assert page.locator('#prediction').inner_text().split('\n')[1].strip() == predicted   # the gr.Label heading shows the same class
            last_id = pid
            n = server.db_count('feedback')
            correct = sample_ds.classes[y[3]] if i == 0 else 'neutrophil'
            page.locator('#correct').get_by_role('radio', name=correct, exact=True).check()
            page.locator('#flag').click()
            page.wait_for_function("document.querySelector('#saved') && document.querySelector('#saved').innerText.includes('Feedback saved')",
                                   timeout=30000)
            page.screenshot(path=str(art/f'demo_flag_{i}.png'), full_page=True)
            with sqlite3.connect(server.home/'data'/'biovis.db') as c:
                row = c.execute('select correct_label from feedback where prediction_id=?', (pid,)).fetchall()
            assert server.db_count('feedback') == n + 1 and row[-1][0] == correct
        b.close()
    assert (art/'demo_flag_0.png').stat().st_size > 10_000


def test_serving_benchmark_on_a_small_load(trained, tmp_path):
    "The code behind reports/benchmarks/serving.json, on a small load: real servers (1 and 2 workers), every request answered and stored, no temporary folder left."
    import tempfile
    from biovis.bench.serving import serving_benchmark
    tmp = Path(tempfile.gettempdir())
    leftovers = lambda: set(tmp.glob('biovis-bench-*')) | set(tmp.glob('biovis-ab-*'))
    before = leftovers()
    res = serving_benchmark('blood', n_latency=10, n_concurrent=40, clients=4, rounds=1, out_dir=tmp_path, registry=trained[0], say=lambda m: None,
                            n_predictor=60, n_dicom=4, dense_seconds=4)
    j = json.loads((tmp_path/'serving.json').read_text())
    assert j == json.loads(json.dumps(res))
    for k in ('predict_ms_p50', 'predict_ms_p99', 'concurrent_requests_per_s', 'server_vs_predictor', 'predictor_images_per_s'): assert j[k] > 0, k
    assert j['predict_ms_p50'] <= j['predict_ms_p99']
    assert (j['concurrent_ok'], j['concurrent_ok_1_worker'], j['concurrent_ok_new_connections']) == (40, 40, 40)
    # one round: the ratio is that round's server throughput over the faster of the Predictor's thread settings
    assert j['server_vs_predictor'] == pytest.approx(j['concurrent_requests_per_s'] / j['predictor_images_per_s'], rel=1e-3)   # runs are rounded to 0.1
    assert j['predictor_images_per_s'] == max(j['predictor_images_per_s_by_threads'].values())
    assert j['mean_model_batch_1_worker'] >= 1
    assert (j['predictor_calls'], j['dicom_uploads'], j['hostile_5xx'], j['dense_uploads_5xx']) == (60, 4, 0, 0)
    assert j['ping_probes'] >= 20 and j['dense_uploads'] > 0                 # 4 s at 20 probes/s, under load
    assert f"**{j['server_vs_predictor']:.2f}**" in (tmp_path/'serving.md').read_text()
    assert leftovers() - before == set()


def test_workers_share_one_signing_key_without_biovis_secret(trained, tmp_path, cells):
    "`--workers 2 --auth` with no BIOVIS_SECRET: a token from one worker verifies on the other (issue 13: 22 of 50 got 401)."
    run_cli('users', 'add', 'ana', '--role', 'clinician', home=tmp_path, check=0,
            env=dict(BIOVIS_NEW_PASSWORD='ana-secret-pw', BIOVIS_DB_URL=f'sqlite:///{tmp_path}/data/biovis.db'))
    s = Server(tmp_path, trained[0].root, args=['--auth', '--workers', '2'])
    try:
        assert 'BIOVIS_SECRET' not in s.env
        # new connections, so the kernel spreads them over both workers' accept queues
        tokens = [httpx.post(s.url + '/token', data=dict(username='ana', password='ana-secret-pw')).json()['access_token']
                  for _ in range(10)]
        codes = [httpx.get(s.url + '/history', headers={'Authorization': 'Bearer ' + tokens[i % 10]}).status_code for i in range(50)]
        assert codes.count(200) == 50, codes
        assert httpx.get(s.url + '/history', headers={'Authorization': 'Bearer forged.token'}).status_code == 401
    finally: s.stop()
