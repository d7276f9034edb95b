"""Several hosts for real: two `biovis serve` processes with their own BIOVIS_HOME on their own ports, sharing one
PostgreSQL store, one registry folder and one upload folder, behind nginx on loopback with deploy/nginx/nginx.conf
(the pieces are biovis.bench.fleet's, which the scale-out benchmark runs too)."""
import io, os, shutil, time

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from conftest import run_cli
from biovis.bench.fleet import Balancer, ServeHost, audit, mixed_load, nginx_path

SECRET = 'a-shared-token-key-of-this-test-fleet-0123456789'
PASSWORDS = dict(ana='ana-secret-pw', root='root-secret-pw')


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


@pytest.fixture(scope='module')
def fleet(tmp_path_factory, trained, pg_server, sample_ds):
    "Two hosts, one PostgreSQL store, one registry (a copy of the session's trained model), one upload folder, nginx."
    if nginx_path() is None: pytest.skip('nginx is not installed (apt-get install nginx)')
    root = tmp_path_factory.mktemp('fleet')
    reg_dir = root/'registry'
    shutil.copytree(trained[0].root, reg_dir)
    db = pg_server.new_database()
    env = dict(BIOVIS_DB_URL=db, BIOVIS_MODELS=reg_dir, BIOVIS_UPLOADS=root/'uploads', BIOVIS_SECRET=SECRET,
               BIOVIS_AUTH='1', BIOVIS_RATE_LIMIT='0')
    for u, role in (('ana', 'clinician'), ('root', 'admin')):
        run_cli('users', 'add', u, '--role', role, home=root, check=0, env=dict(BIOVIS_DB_URL=db, BIOVIS_NEW_PASSWORD=PASSWORDS[u]))
    hosts = [ServeHost(root/'host-a', env), ServeHost(root/'host-b', env)]
    lb = Balancer(root/'nginx', hosts)
    x, y = sample_ds.tensors('test')
    cells = [(_png(x[i]), sample_ds.classes[y[i]]) for i in range(64)]
    yield dict(hosts=hosts, lb=lb, db=db, registry=reg_dir, uploads=root/'uploads', cells=cells, classes=sample_ds.classes)
    lb.stop()
    for h in hosts: h.stop()


def token(url, user):
    r = httpx.post(url + '/token', data=dict(username=user, password=PASSWORDS[user]), timeout=30)
    assert r.status_code == 200, r.text
    return {'Authorization': f"Bearer {r.json()['access_token']}"}


def db_rows(url, sql):
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as c: return [tuple(r) for r in c.execute(text(sql))]
    finally: eng.dispose()


def test_token_history_and_round_robin_across_hosts(fleet):
    "A token issued by host A works on host B; a correction made through A is in B's history; nginx uses both hosts."
    a, b = fleet['hosts']
    img, label = fleet['cells'][0]
    auth_a = token(a.url, 'ana')
    r = httpx.post(b.url + '/predict', files={'files': ('c0.png', img, 'image/png')}, headers=auth_a, timeout=60)
    assert r.status_code == 200, r.text
    pid = r.json()['predictions'][0]['id']
    forged = {'Authorization': auth_a['Authorization'][:-4] + 'AAAA'}
    assert httpx.post(b.url + '/predict', files={'files': ('c0.png', img, 'image/png')}, headers=forged, timeout=60).status_code == 401
    other = fleet['classes'][(fleet['classes'].index(label) + 1) % len(fleet['classes'])]
    r = httpx.post(a.url + '/feedback', json=dict(prediction_id=pid, label=other, note='via A'), headers=auth_a, timeout=60)
    assert r.status_code == 200, r.text
    hist = httpx.get(b.url + '/history', headers=token(b.url, 'ana'), timeout=60).json()['history']
    mine = [h for h in hist if h['id'] == pid]
    assert mine and [f['correct_label'] for f in mine[0]['feedback']] == [other] and mine[0]['feedback'][0]['note'] == 'via A'
    seen = set()
    for i in range(8):
        r = httpx.post(fleet['lb'].url + '/predict', files={'files': (f'rr{i}.png', fleet['cells'][i][0], 'image/png')},
                       headers=auth_a, timeout=60)
        assert r.status_code == 200, r.text
        seen.add(r.headers['x-upstream'])
    assert seen == {h.addr for h in fleet['hosts']}
    # the image went to the shared upload folder, where every host finds it
    [(sha,)] = db_rows(fleet['db'], f"SELECT image_sha FROM predictions WHERE id = '{r.json()['predictions'][0]['id']}'")
    assert len(list(fleet['uploads'].glob(f'*/{sha}.*'))) == 1


def test_promotion_seen_by_every_host_without_restart(fleet):
    from biovis.registry import ModelRegistry
    reg = ModelRegistry(fleet['registry'])
    before = reg.resolve('blood', 'production')
    meta = reg.metadata('blood', 'production')
    new = reg.register('blood', None, {k: v for k, v in meta.items() if k not in ('version', 'weights', 'weights_sha256')},
                       weights_file=reg.path('blood', 'production')/meta['weights'])
    assert new != before
    reg.promote('blood', new)
    t0, got = time.time(), {}
    while time.time() - t0 < 30:
        got = {h.port: httpx.get(h.url + '/ping', timeout=10).json()['models']['blood'] for h in fleet['hosts']}
        if set(got.values()) == {new}: break
        time.sleep(0.2)
    print(f'promotion {before} -> {new} seen by both hosts after {time.time() - t0:.2f} s')
    assert set(got.values()) == {new}, got


def test_no_acknowledged_row_lost_when_a_host_is_killed_mid_load(fleet):
    """8 clients x 200 requests (predict, then a correction of it) through nginx; host B is killed with SIGKILL after a
    third of them and started again at once (the clients' last third waits until it is up, so it must take traffic
    again once nginx sends it requests). Every acknowledged prediction and correction is in the shared store, with the id it was acknowledged with;
    nothing is stored twice; every stored prediction's image is in the shared upload folder."""
    a, b = fleet['hosts']
    run = mixed_load(fleet['lb'].url, [c for c, _ in fleet['cells']], fleet['classes'], clients=8, per_client=200,
                     headers=token(a.url, 'ana'), kill=b)
    res = audit(fleet['db'], run)
    print(f'{run.requests} requests in {run.seconds:.1f} s; B killed at {run.killed_at}, back at {run.back_at}; {res}; '
          f'refused {run.refused[:5]}; by host {run.upstreams}; B after its restart: {run.after_restart}')
    assert res['requests'] == 1600 and res['lost'] == 0 and res['duplicated'] == 0
    assert res['acknowledged'] >= 0.97 * 1600                      # only requests in flight at the kill may be refused
    assert res['stored_not_acknowledged'] <= res['refused']
    assert run.after_restart > 0, 'the restarted host got no traffic'
    assert {code for _, code in run.refused} <= {502, 503, 504}, run.refused
    shas = db_rows(fleet['db'], "SELECT DISTINCT image_sha FROM predictions WHERE filename LIKE 'load-%'")
    assert len(shas) > 0 and [s for (s,) in shas if not list(fleet['uploads'].glob(f'{s[:2]}/{s}.*'))] == []


def test_held_correction_waits_for_a_second_reviewer_on_any_host(fleet):
    "A correction to a class the model gives under 2 % is held (made through A); only another admin may confirm it (through B)."
    a, b = fleet['hosts']
    ana, root = token(a.url, 'ana'), token(b.url, 'root')
    for img, _ in fleet['cells']:                        # a cell on which the model is sure enough that some class is under 2 %
        pred = httpx.post(a.url + '/predict', files={'files': ('h.png', img, 'image/png')}, headers=ana, timeout=60).json()['predictions'][0]
        unlikely = min(pred['probs'], key=pred['probs'].get)
        if pred['probs'][unlikely] < 0.02: break
    else: pytest.fail('no cell with a class under 2 %')
    r = httpx.post(a.url + '/feedback', json=dict(prediction_id=pred['id'], label=unlikely, note='slip?'), headers=ana, timeout=60)
    assert r.status_code == 200 and r.json()['status'] == 'held' and 'second reviewer' in r.json()['review'], r.text
    fid = r.json()['feedback_id']
    assert httpx.get(b.url + '/feedback/held', headers=token(b.url, 'ana'), timeout=30).status_code == 403      # not an admin
    held = httpx.get(b.url + '/feedback/held?limit=1000', headers=root, timeout=30).json()['held']
    assert fid in [h['feedback_id'] for h in held] and [h for h in held if h['feedback_id'] == fid][0]['correct_label'] == unlikely
    assert db_rows(fleet['db'], f'SELECT status FROM feedback WHERE id = {fid}') == [('held',)]
    assert httpx.post(b.url + f'/feedback/{fid}/review', json=dict(decision='confirm'), headers=ana, timeout=30).status_code == 403
    assert httpx.post(b.url + f'/feedback/{fid}/review', json=dict(decision='maybe'), headers=root, timeout=30).status_code == 400
    r = httpx.post(b.url + f'/feedback/{fid}/review', json=dict(decision='confirm'), headers=root, timeout=30)
    assert r.status_code == 200 and r.json()['status'] == 'confirmed' and r.json()['reviewed_by'] == 'root', r.text
    assert httpx.post(a.url + f'/feedback/{fid}/review', json=dict(decision='reject'), headers=token(a.url, 'root'), timeout=30).status_code == 409
    # an admin's own held correction needs another admin
    r = httpx.post(b.url + '/feedback', json=dict(prediction_id=pred['id'], label=unlikely, note='mine'), headers=root, timeout=60)
    assert r.json()['status'] == 'held'
    r = httpx.post(b.url + f"/feedback/{r.json()['feedback_id']}/review", json=dict(decision='confirm'), headers=root, timeout=30)
    assert r.status_code == 403 and 'someone else' in r.text


def test_review_queue_through_the_balancer(fleet):
    "GET /review/next: unreviewed predictions only, the caller's own for a clinician, everyone's for an admin."
    ana, root = token(fleet['hosts'][0].url, 'ana'), token(fleet['hosts'][1].url, 'root')
    q = httpx.get(fleet['lb'].url + '/review/next?n=5', headers=ana, timeout=60).json()['queue']
    assert 0 < len(q) <= 5 and len({r['prediction_id'] for r in q}) == len(q)
    ids = "','".join(r['prediction_id'] for r in q)
    assert db_rows(fleet['db'], f"SELECT count(*) FROM feedback WHERE prediction_id IN ('{ids}')") == [(0,)]
    assert db_rows(fleet['db'], f"SELECT DISTINCT username FROM predictions WHERE id IN ('{ids}')") == [('ana',)]
    everyone = httpx.get(fleet['lb'].url + '/review/next?n=100', headers=root, timeout=60).json()['queue']
    unreviewed = db_rows(fleet['db'], "SELECT count(*) FROM predictions p WHERE NOT EXISTS (SELECT 1 FROM feedback f WHERE f.prediction_id = p.id)")[0][0]
    assert len(q) <= len(everyone) <= min(100, unreviewed)          # copies of one image are queued once
