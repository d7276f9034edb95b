"biovis.feedback: predictions, feedback, users; safe under threads, processes, kill -9, bad input and a full disk."
import contextlib, errno, io, json, os, signal, subprocess, sys, textwrap, threading, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from biovis.data import InvalidImageError
from biovis.feedback import (FeedbackStore, FeedbackError, UnknownPredictionError, FeedbackPermissionError,
                             image_format, GC_MIN_AGE)

P = dict(normal=0.25, blast=0.75)
CLASSES = list(P)


def png(i=0, size=8, fmt='PNG'):
    "A small image whose bytes differ for each `i`."
    buf = io.BytesIO()
    Image.new('RGB', (size, size), (i % 256, i // 256 % 256, 7)).save(buf, fmt)
    return buf.getvalue()


def noise_png(side=256, seed=0):
    "An incompressible PNG of about side*side*3 bytes."
    a = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, 'PNG'); return buf.getvalue()


@pytest.fixture(params=['sqlite', 'postgresql'])
def db_url(request, tmp_path):
    "The store's database: a SQLite file, or a fresh database on a real PostgreSQL server (the same assertions on both)."
    if request.param == 'sqlite': return f'sqlite:///{tmp_path}/fb.db'
    return request.getfixturevalue('pg_server').new_database()


@pytest.fixture
def store(db_url, tmp_path):
    s = FeedbackStore(db_url, uploads_dir=tmp_path/'uploads')
    yield s
    s.close()


@contextlib.contextmanager
def raw(db):
    "An independent connection (own engine, no pool): the tests check the database, not the store's own view of it."
    eng = create_engine(db if isinstance(db, str) else f'sqlite:///{db}', poolclass=NullPool)
    try:
        with eng.begin() as con: yield con
    finally: eng.dispose()


def rows(con, sql) -> list:
    return [tuple(r) for r in con.exec_driver_sql(sql)]


def integrity(con) -> list:
    """SQLite: `integrity_check` and `foreign_key_check`. PostgreSQL: amcheck's `bt_index_parent_check` of every B-tree
    index of the store's tables (raises on a corrupt index) and the foreign keys checked by queries; [('ok',)] when sound."""
    if con.dialect.name == 'sqlite':
        return rows(con, 'PRAGMA integrity_check') + rows(con, 'PRAGMA foreign_key_check')
    con.exec_driver_sql('CREATE EXTENSION IF NOT EXISTS amcheck')
    idx = [r[0] for r in con.exec_driver_sql(
        "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
        "WHERE a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace")]
    assert len(idx) >= 5, idx
    for name in idx: con.exec_driver_sql(f"SELECT bt_index_parent_check('{name}'::regclass, true)")
    bad_fk = rows(con, 'SELECT f.id FROM mask_feedback f LEFT JOIN predictions p ON f.prediction_id = p.id WHERE p.id IS NULL')
    return [('ok',)] + bad_fk


def db_report(db):
    "integrity (SQLite's checks, or amcheck on PostgreSQL), the number of feedback rows without their prediction, the row counts."
    with raw(db) as con:
        return dict(integrity=integrity(con),
                    orphans=con.exec_driver_sql('SELECT count(*) FROM feedback f LEFT JOIN predictions p ON f.prediction_id = p.id '
                                                'WHERE p.id IS NULL').scalar(),
                    predictions=con.exec_driver_sql('SELECT count(*) FROM predictions').scalar(),
                    feedback=con.exec_driver_sql('SELECT count(*) FROM feedback').scalar())


def files_under(d):
    return sorted(p for p in Path(d).rglob('*') if p.is_file())


def subprocess_env():
    return {k: v for k, v in os.environ.items() if not k.startswith('BIOVIS_')}


# --- location, settings -----------------------------------------------------------------------

def test_default_location_env_url_and_pragmas(home, monkeypatch, tmp_path):
    s = FeedbackStore()
    sha = s.save_image(png())
    assert (home/'data'/'biovis.db').is_file()
    assert s.image_path(sha) == home/'data'/'uploads'/sha[:2]/f'{sha}.png'
    s.close()
    other = tmp_path/'elsewhere'/'x.db'
    monkeypatch.setenv('BIOVIS_DB_URL', f'sqlite:///{other}')
    with FeedbackStore() as s2:
        s2.log_prediction('m', 'v1', s2.save_image(png()), 'blast', P)
    assert db_report(other)['predictions'] == 1
    with s2.engine.connect() as c:
        assert c.exec_driver_sql('PRAGMA journal_mode').scalar() == 'wal'
        assert c.exec_driver_sql('PRAGMA foreign_keys').scalar() == 1
        assert c.exec_driver_sql('PRAGMA busy_timeout').scalar() >= 5000
        assert c.exec_driver_sql('PRAGMA synchronous').scalar() >= 1


# --- the normal path ------------------------------------------------------------------------------

def test_log_feedback_history_rows(store):
    sha = store.save_image(png(1))
    t0 = time.time()
    a = store.log_prediction('blood', 'v3', sha, 'blast', P, user='ana', embedding=np.array([0.5, -1.0]), latency_ms=12.5)
    b = store.log_prediction('blood', 'v3', sha, 'normal', P, user='bob')
    assert len({a, b}) == 2 and all(len(x) == 32 and x.isalnum() for x in (a, b))
    fid = store.add_feedback(a, 'normal', note='smudge', user='ana', classes=CLASSES)
    h = store.history('ana')
    assert [r['id'] for r in h] == [a]
    assert h[0]['feedback'][0]['correct_label'] == 'normal' and h[0]['feedback'][0]['id'] == fid
    assert h[0]['probs'] == P and h[0]['latency_ms'] == 12.5 and h[0]['version'] == 'v3'
    assert [r['id'] for r in store.history()] == [b, a]          # newest first, everyone's
    assert store.history('bob')[0]['feedback'] == []
    assert len(store.history(limit=1)) == 1
    rows = store.feedback_rows()
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ('prediction_id', 'image_sha', 'predicted_label', 'correct_label', 'model_version')} == \
        dict(prediction_id=a, image_sha=sha, predicted_label='blast', correct_label='normal', model_version='v3')
    assert store.count_feedback() == 1 and store.count_predictions() == 2
    assert store.count_feedback(since=time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(t0 - 60))) == 1
    from datetime import datetime, timezone, timedelta
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert store.count_feedback(since=later) == 0 and store.feedback_rows(since=later) == []
    assert store.predictions(model='blood')[0]['embedding'] == [0.5, -1.0]
    with pytest.raises(FeedbackError, match='ISO'): store.count_feedback(since='yesterday')


# --- bad input is refused whole ---------------------------------------------------------------------

def test_unknown_prediction_and_wrong_label_write_nothing(store, tmp_path):
    sha = store.save_image(png())
    pid = store.log_prediction('blood', 'v1', sha, 'blast', P)
    before = db_report(store.url)
    with pytest.raises(UnknownPredictionError, match='no prediction'): store.add_feedback('f' * 32, 'normal')
    with pytest.raises(UnknownPredictionError): store.add_feedback("' OR 1=1 --", 'normal')
    with pytest.raises(LookupError): store.add_feedback(None, 'normal')
    with pytest.raises(FeedbackError, match='not one of the classes'): store.add_feedback(pid, 'cat', classes=CLASSES)
    with pytest.raises(FeedbackError, match='empty'): store.add_feedback(pid, '   ')
    with pytest.raises(FeedbackError, match='limit'): store.add_feedback(pid, 'normal', note='x' * 100_000)
    with pytest.raises(FeedbackError, match='not one of the classes'): store.log_prediction('blood', 'v1', sha, 'cat', P)
    with pytest.raises(FeedbackError, match='finite'): store.log_prediction('blood', 'v1', sha, 'blast', dict(blast=float('nan')))
    with pytest.raises(FeedbackError, match='outside'): store.log_prediction('blood', 'v1', sha, 'blast', dict(blast=7.0))
    with pytest.raises(FeedbackError, match='finite'): store.log_prediction('blood', 'v1', sha, 'blast', P, embedding=[1, float('inf')])
    with pytest.raises(FeedbackError, match='limit'): store.log_prediction('blood', 'v1', sha, 'blast', P, embedding=[0.0] * 5000)
    with pytest.raises(FeedbackError, match='not an image id'): store.log_prediction('blood', 'v1', '../x', 'blast', P)
    with pytest.raises(FeedbackError, match='not stored'): store.log_prediction('blood', 'v1', 'a' * 64, 'blast', P)
    assert db_report(store.url) == before
    assert before['predictions'] == 1 and before['feedback'] == 0


def test_hostile_filename_and_content_named_files(store, tmp_path):
    img = png(3)
    sha = store.save_image(img)
    pid = store.log_prediction('blood', 'v1', sha, 'blast', P, filename='../../etc/passwd')
    store.log_prediction('blood', 'v1', store.save_image(img), 'blast', P, filename='evil.exe\x00.png')
    assert store.history()[-1]['filename'] == '../../etc/passwd' and store.history()[-1]['id'] == pid
    assert store.history()[0]['filename'] == 'evil.exe\ufffd.png'
    # one file for identical bytes, named by hash, extension from the content; nothing outside uploads/
    assert files_under(tmp_path/'uploads') == [tmp_path/'uploads'/sha[:2]/f'{sha}.png']
    assert store.image_path(sha).read_bytes() == img
    jsha = store.save_image(png(4, fmt='JPEG'))
    assert store.image_path(jsha).suffix == '.jpg'
    assert not [p for p in tmp_path.rglob('*') if p.is_file() and 'passwd' in p.name]
    n = len(files_under(tmp_path))
    for bad in (b'', b'<svg onload=alert(1)>', b'MZ\x90\x00 a windows executable', b'BM not a bitmap', png(5)[:7]):
        with pytest.raises(InvalidImageError): store.save_image(bad)
    with pytest.raises(InvalidImageError): store.save_image('a string')
    assert len(files_under(tmp_path)) == n
    for bad in ('../../etc/passwd', sha.upper(), sha[:-1], None):
        with pytest.raises(FeedbackError, match='not an image id'): store.image_path(bad)
    assert image_format(png(fmt='TIFF')) == 'tif' and image_format(png(fmt='BMP')) == 'bmp'


# --- deleting -----------------------------------------------------------------------------------------

def test_delete_rows_file_and_permissions(store, tmp_path):
    shared, own = store.save_image(png(10)), store.save_image(png(11))
    a = store.log_prediction('blood', 'v1', shared, 'blast', P, user='ana')
    b = store.log_prediction('blood', 'v1', shared, 'blast', P, user='bob')
    c = store.log_prediction('blood', 'v1', own, 'blast', P, user='ana')
    for pid in (a, a, c): store.add_feedback(pid, 'normal')
    with pytest.raises(FeedbackPermissionError, match='another user'): store.delete_prediction(a, user='bob')
    with pytest.raises(PermissionError): store.delete_prediction(a)                        # anonymous, not admin
    with pytest.raises(UnknownPredictionError): store.delete_prediction('0' * 32, is_admin=True)
    assert db_report(store.url)['predictions'] == 3
    r = store.delete_prediction(a, user='ana')
    assert r == dict(prediction_id=a, feedback_deleted=2, image_removed=False)
    assert store.image_path(shared) is not None                                            # bob's still uses it
    assert store.delete_prediction(c, user='ana')['image_removed'] is True
    assert store.image_path(own) is None and not (tmp_path/'uploads'/own[:2]/f'{own}.png').exists()
    rep = db_report(store.url)
    assert (rep['predictions'], rep['feedback'], rep['orphans']) == (1, 0, 0)
    assert store.delete_prediction(b, user='admin', is_admin=True)['image_removed'] is True
    assert files_under(tmp_path/'uploads') == []
    assert store.check() == dict(integrity='ok', orphan_feedback=[], missing_images=[])


def test_failed_file_removal_leaves_rows_gone_and_file_for_gc(store, tmp_path, monkeypatch):
    "Rows go first and are committed; if the file cannot be removed it is only an unreferenced file."
    sha = store.save_image(png(12))
    pid = store.log_prediction('blood', 'v1', sha, 'blast', P, user='ana')
    store.add_feedback(pid, 'normal')
    real_unlink = Path.unlink
    def failing_unlink(self, *a, **k):
        if self.suffix == '.png': raise PermissionError(errno.EACCES, 'read-only', str(self))
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, 'unlink', failing_unlink)
    assert store.delete_prediction(pid, user='ana')['image_removed'] is False
    monkeypatch.undo()
    rep = db_report(store.url)
    assert (rep['predictions'], rep['feedback']) == (0, 0) and store.image_path(sha) is not None
    assert store.gc_images() == 0                              # young files are kept: they may be about to be logged
    assert store.gc_images(min_age=0) == 1 and store.image_path(sha) is None


def test_gc_keeps_referenced_and_recent(store):
    used, unused = store.save_image(png(20)), store.save_image(png(21))
    store.log_prediction('blood', 'v1', used, 'blast', P)
    old = time.time() - 2 * GC_MIN_AGE
    for sha in (used, unused): os.utime(store.image_path(sha), (old, old))
    stale_tmp = store.uploads_dir/used[:2]/f'.{used}.png.abc.tmp'
    stale_tmp.write_bytes(b'half'); os.utime(stale_tmp, (old, old))
    assert store.gc_images() == 2
    assert store.image_path(used) is not None and store.image_path(unused) is None and not stale_tmp.exists()
    # saving an old unreferenced image again refreshes it, so gc does not remove it before it is logged
    again = store.save_image(png(22)); os.utime(store.image_path(again), (old, old))
    store.save_image(png(22))
    assert store.gc_images() == 0 and store.image_path(again) is not None


# --- a full disk ------------------------------------------------------------------------------------------

def test_full_disk_real_write_failures(tmp_path):
    "Real failing writes (RLIMIT_FSIZE: EFBIG) while saving an image, then while committing a row: nothing half-written."
    script = textwrap.dedent(f'''
        import io, json, resource, signal
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from biovis.feedback import FeedbackStore
        db = '{tmp_path}/fb.db'
        s = FeedbackStore('sqlite:///' + db, uploads_dir='{tmp_path}/uploads')
        s.log_prediction('m', 'v1', s.save_image({png(0)!r}), 'blast', {P!r})
        a = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        buf = io.BytesIO(); Image.fromarray(a).save(buf, 'PNG'); big = buf.getvalue()
        small = s.save_image({png(1)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        def limit(n): resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        out = dict(big=len(big))
        limit(64 * 1024)                                    # 1. the image does not fit
        try: s.save_image(big)
        except OSError as e: out['image_error'] = e.errno
        limit(Path(db + '-wal').stat().st_size)             # 2. the database cannot grow: the commit fails
        try: s.log_prediction('m', 'v1', small, 'blast', {P!r}); out['db_error'] = None
        except Exception as e: out['db_error'] = str(e)[:200]
        limit(soft)                                         # space again: the store goes on
        out['after'] = s.log_prediction('m', 'v1', small, 'normal', {P!r})
        print(json.dumps(out))
        ''')
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['image_error'] == errno.EFBIG and out['big'] > 64 * 1024
    assert out['db_error'] and 'disk' in out['db_error'].lower(), out
    names = [p.name for p in files_under(tmp_path/'uploads')]
    assert len(names) == 2 and all(n.endswith('.png') and not n.startswith('.') for n in names), names
    rep = db_report(tmp_path/'fb.db')
    assert rep['integrity'] == [('ok',)] and rep['predictions'] == 2
    with raw(tmp_path/'fb.db') as con:
        assert sorted(r[0] for r in rows(con, 'SELECT label FROM predictions')) == ['blast', 'normal']
    with FeedbackStore(f'sqlite:///{tmp_path}/fb.db', uploads_dir=tmp_path/'uploads') as s:
        assert s.check()['missing_images'] == []


def test_enospc_on_flush_leaves_nothing(store, tmp_path, monkeypatch):
    "ENOSPC where a full disk reports it (the flush to disk): the upload fails, nothing is left, the store works."
    real_fsync = os.fsync
    def full(fd):
        if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).endswith('.tmp'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(OSError) as e: store.save_image(png(30))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert files_under(tmp_path/'uploads') == []
    assert db_report(store.url)['predictions'] == 0
    store.log_prediction('m', 'v1', store.save_image(png(30)), 'blast', P)
    assert db_report(store.url)['predictions'] == 1


# --- concurrency -------------------------------------------------------------------------------------------

def test_threads_write_concurrently(store, tmp_path):
    "8 threads x 50 (prediction + feedback), with a reader alongside: every row present, none duplicated."
    shas = [store.save_image(png(40 + i)) for i in range(4)]
    errors, ids, stop = [], [[] for _ in range(8)], threading.Event()
    def writer(t):
        try:
            for j in range(50):
                pid = store.log_prediction('blood', 'v1', shas[(t + j) % 4], 'blast', P, user=f'user{t}')
                store.add_feedback(pid, 'normal', note=f'{t}-{j}', user=f'user{t}', classes=CLASSES)
                ids[t].append(pid)
        except Exception as e: errors.append(repr(e))
    def reader():
        try:
            while not stop.is_set(): store.history(limit=20); store.count_feedback()
        except Exception as e: errors.append(repr(e))
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    rd = threading.Thread(target=reader)
    rd.start(); [t.start() for t in threads]; [t.join(timeout=120) for t in threads]
    stop.set(); rd.join(timeout=30)
    assert errors == []
    all_ids = [i for l in ids for i in l]
    assert len(all_ids) == 400 and len(set(all_ids)) == 400
    rep = db_report(store.url)
    assert (rep['predictions'], rep['feedback'], rep['orphans'], rep['integrity']) == (400, 400, 0, [('ok',)])
    with raw(store.url) as con:
        got = dict(rows(con, 'SELECT p.id, f.note FROM predictions p JOIN feedback f ON f.prediction_id = p.id'))
    assert set(got) == set(all_ids)
    assert all(got[ids[t][j]] == f'{t}-{j}' for t in range(8) for j in range(50))
    assert all(len(store.history(f'user{t}', limit=None)) == 50 for t in range(8))


WRITER = '''
import os, sys, time
from pathlib import Path
import io
from PIL import Image
from biovis.feedback import FeedbackStore
url, up, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
go = Path(up).parent/'go'
Path(up).parent.joinpath(f'ready-{tag}').touch()
while not go.exists(): time.sleep(0.01)
s = FeedbackStore(url, uploads_dir=up)
def png(i):
    b = io.BytesIO(); Image.new('RGB', (8, 8), (i % 256, 9, 9)).save(b, 'PNG'); return b.getvalue()
shared = s.save_image(png(0))
i = 0
while n < 0 or i < n:
    sha = shared if i % 2 else s.save_image(png(1 + hash((tag, i)) % 250))
    pid = s.log_prediction('blood', 'v1', sha, 'blast', {'normal': 0.25, 'blast': 0.75}, user=tag)
    s.add_feedback(pid, 'normal', note=f'{tag}-{i}', user=tag)
    print(pid, flush=True)
    i += 1
'''


def test_processes_write_concurrently(db_url, tmp_path):
    "3 processes create the tables and write to one fresh database at once: all rows present, integrity ok."
    db, n = db_url, 80
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, str(db), str(tmp_path/'uploads'), f'p{k}', str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for k in range(3)]
    t0 = time.time()
    while not all((tmp_path/f'ready-p{k}').exists() for k in range(3)) and time.time() - t0 < 60: time.sleep(0.02)
    (tmp_path/'go').touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs): assert p.returncode == 0, err[-3000:]
    reported = [set(out.split()) for out, _ in outs]
    assert [len(r) for r in reported] == [n] * 3
    rep = db_report(db)
    assert (rep['integrity'], rep['orphans'], rep['predictions'], rep['feedback']) == ([('ok',)], 0, 3 * n, 3 * n)
    with raw(db) as con:
        stored = {r[0] for r in rows(con, 'SELECT id FROM predictions')}
        per_user = dict(rows(con, 'SELECT username, count(*) FROM predictions GROUP BY username'))
    assert stored == set().union(*reported) and per_user == {'p0': n, 'p1': n, 'p2': n}
    with FeedbackStore(db, uploads_dir=tmp_path/'uploads') as s:
        assert s.check() == dict(integrity='ok', orphan_feedback=[], missing_images=[])


def test_sigkill_mid_write_leaves_a_sound_store(db_url, tmp_path):
    "A writer killed with SIGKILL in the middle of its loop: every reported commit is there, nothing is broken."
    db = db_url
    (tmp_path/'go').touch()
    p = subprocess.Popen([sys.executable, '-c', WRITER, str(db), str(tmp_path/'uploads'), 'k', '-1'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    committed = []
    try:
        while len(committed) < 60:
            line = p.stdout.readline()
            assert line, p.stderr.read()[-3000:]
            committed.append(line.strip())
    finally:
        p.send_signal(signal.SIGKILL); p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    rep = db_report(db)
    assert rep['integrity'] == [('ok',)] and rep['orphans'] == 0
    with raw(db) as con:
        stored = {r[0] for r in rows(con, 'SELECT id FROM predictions')}
        with_fb = {r[0] for r in rows(con, 'SELECT prediction_id FROM feedback')}
    assert set(committed) <= stored and set(committed) <= with_fb      # every reported commit survived
    assert len(stored) >= len(committed)
    with FeedbackStore(db, uploads_dir=tmp_path/'uploads') as s:
        assert s.check()['missing_images'] == [] and s.check()['integrity'] == 'ok'
        pid = s.log_prediction('blood', 'v1', s.save_image(png(99)), 'blast', P)   # and it goes on working
        s.add_feedback(pid, 'normal')
        assert s.count_predictions() == len(stored) + 1


def test_store_used_after_fork(store, tmp_path):
    "A pre-forking server: the child gets its own connection pool, with the same pragmas, and its rows land."
    sha = store.save_image(png(50))
    store.log_prediction('blood', 'v1', sha, 'blast', P, user='parent')
    parent_pool = store.engine.pool
    pid = os.fork()
    if pid == 0:                                              # child: report through the exit code only
        code = 1
        try:
            ok = store.engine.pool is not parent_pool                  # none of the parent's SQLite connections
            with store.engine.connect() as c:        # SQLite: the same pragmas; PostgreSQL: a connection of its own
                q = 'PRAGMA foreign_keys' if store.is_sqlite else 'SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid()'
                ok = ok and c.exec_driver_sql(q).scalar() == 1
            store.add_feedback(store.log_prediction('blood', 'v1', sha, 'blast', P, user='child'), 'normal')
            code = 0 if ok else 2
        finally: os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.engine.pool is parent_pool
    assert [r['user'] for r in store.history()] == ['child', 'parent']      # the parent's pool still works too
    assert db_report(store.url)['feedback'] == 1


# --- users ---------------------------------------------------------------------------------------------------

def test_users_argon2(store, tmp_path):
    store.add_user('ana', 'correct horse battery', 'clinician')
    store.add_user('root.admin', 'staple battery horse', role='admin')
    assert store.verify_user('ana', 'correct horse battery') == 'clinician'
    assert store.verify_user('root.admin', 'staple battery horse') == 'admin'
    assert store.verify_user('ana', 'correct horse batterY') is None
    assert store.verify_user('ana', 'staple battery horse') is None
    assert store.verify_user('nobody', 'correct horse battery') is None
    assert store.verify_user('ana', None) is None
    with raw(store.url) as con: hashes = dict(rows(con, 'SELECT username, password_hash FROM users'))
    assert all(h.startswith('$argon2id$') for h in hashes.values())
    assert 'correct horse' not in hashes['ana'] and hashes['ana'] != hashes['root.admin']
    with pytest.raises(FeedbackError, match='exists'): store.add_user('ana', 'another password')
    with pytest.raises(FeedbackError, match='role'): store.add_user('eve', 'long enough pw', role='superuser')
    with pytest.raises(FeedbackError, match='at least'): store.add_user('eve', 'short')
    with pytest.raises(FeedbackError, match='invalid username'): store.add_user('../eve', 'long enough pw')
    with raw(store.url) as con:
        assert con.exec_driver_sql('SELECT count(*) FROM users').scalar() == 2
        with pytest.raises(IntegrityError):                      # the role is checked by the database too
            con.exec_driver_sql("INSERT INTO users (username, password_hash, role, created) VALUES ('x', 'h', 'root', '2026-01-01')")


# --- the upload store behind its interface --------------------------------------------------------------------

from biovis.feedback.uploads import UploadStore, upload_store


class DictUploads(UploadStore):
    """A second implementation of the interface, shaped like an object store's plug-in: the bytes live in a dict (the
    'bucket'), files exist only in a local cache made on demand. It proves the feedback store needs no folder of its own."""
    def __init__(self, cache): self.blobs, self.cache, self.fetches = {}, Path(cache), 0
    def put(self, sha, ext, data): self.blobs[sha] = [ext, bytes(data), time.time()]
    def ext(self, sha): return self.blobs[sha][0] if sha in self.blobs else None
    def read(self, sha): return self.blobs[sha][1]
    def local_path(self, sha):
        if sha not in self.blobs: return None
        p = self.cache/f'{sha}.{self.blobs[sha][0]}'
        if not p.exists(): p.parent.mkdir(parents=True, exist_ok=True); p.write_bytes(self.blobs[sha][1]); self.fetches += 1
        return p
    def delete(self, sha): return self.blobs.pop(sha, None) is not None
    def sweep(self, cutoff): return 0, {s: [s] for s, (_, _, t) in self.blobs.items() if t <= cutoff}
    def remove_if_old(self, sha, cutoff):
        return int(sha in self.blobs and self.blobs[sha][2] <= cutoff and self.blobs.pop(sha) is not None)


def test_store_on_another_upload_store(db_url, tmp_path):
    "Save, log, read back, retrain's file access, delete, gc and check all go through the interface; no uploads folder is made."
    up = DictUploads(tmp_path/'cache')
    with FeedbackStore(db_url, uploads=up) as s:
        a, b = s.save_image(png(60)), s.save_image(png(61))
        pid = s.log_prediction('blood', 'v1', a, 'blast', P)
        with pytest.raises(FeedbackError, match='not stored'): s.log_prediction('blood', 'v1', 'c' * 64, 'blast', P)
        assert s.image_path(a).read_bytes() == png(60) and up.fetches == 1
        assert s.has_image(b) and s.check() == dict(integrity='ok', orphan_feedback=[], missing_images=[])
        up.blobs[b][2] = up.blobs[a][2] = time.time() - 2 * GC_MIN_AGE
        assert s.gc_images() == 1 and set(up.blobs) == {a}                     # b was never logged; a is in use
        assert s.delete_prediction(pid, is_admin=True)['image_removed'] is True and up.blobs == {}
        assert s.uploads_dir is None and not (tmp_path/'uploads').exists()
    assert type(upload_store(tmp_path/'u')).__name__ == 'LocalUploadStore'
    with pytest.raises(ValueError, match="biovis.upload_stores"): upload_store('s3://bucket/prefix')


# --- schema migrations (Alembic) ------------------------------------------------------------------------------

def test_database_from_before_migrations_is_upgraded_in_place(db_url, tmp_path):
    "A database made by create_all before migrations (the 0001 tables, no alembic_version) is stamped and upgraded on open; its rows stay."
    from datetime import datetime, timezone
    from sqlalchemy import inspect
    from alembic import command
    from biovis.feedback.db import PredictionRecord, schema_head, schema_revision, _alembic_config, SCHEMA_BASELINE
    with raw(db_url) as con:                       # the tables as the code before migrations made them (= 0001), with a row
        command.upgrade(_alembic_config(con), SCHEMA_BASELINE)
        con.exec_driver_sql('DROP TABLE alembic_version')
        con.execute(PredictionRecord.__table__.insert(), [dict(id='a' * 32, created=datetime.now(timezone.utc), model='blood',
                                                               model_version='v1', image_sha='b' * 64, label='blast', probs=P)])
        con.exec_driver_sql("INSERT INTO feedback (prediction_id, correct_label, note, username, created) "
                            "VALUES ('" + 'a' * 32 + "', 'normal', 'old', 'ana', '2026-01-01 00:00:00')")
        assert schema_revision(con) is None and 'status' not in {c['name'] for c in inspect(con).get_columns('feedback')}
    with FeedbackStore(db_url, uploads_dir=tmp_path/'u') as s:
        assert [r['id'] for r in s.history()] == ['a' * 32]
        assert [(r['correct_label'], r['status']) for r in s.feedback_rows()] == [('normal', 'accepted')]   # old rows: accepted
    with raw(db_url) as con:
        assert schema_revision(con) == schema_head() == '0003'
        assert 'ix_predictions_model_version_created' in {i['name'] for i in inspect(con).get_indexes('predictions')}
    with FeedbackStore(db_url, uploads_dir=tmp_path/'u') as s:      # opened again: already at the head, nothing to do
        assert s.count_predictions() == 1


def test_migrations_make_exactly_the_models_schema(db_url):
    "After upgrading to the head, Alembic's autogenerate finds no difference from the models: a model change without its migration fails here."
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from biovis.feedback.db import Base
    FeedbackStore(db_url, uploads_dir='/nonexistent').close()
    with raw(db_url) as con:
        assert compare_metadata(MigrationContext.configure(con), Base.metadata) == []


# --- the review queue -------------------------------------------------------------------------------------------

def test_review_queue_is_uncertain_diverse_and_skips_reviewed(store):
    "Ten copies of one coin-toss image and ten different, less uncertain ones: uncertainty alone would queue the copies; the queue takes one."
    from biovis.feedback.queue import margin_uncertainty
    sha = store.save_image(png(70))
    rng = np.random.default_rng(1)
    dup = [store.log_prediction('blood', 'v1', sha, 'blast', dict(normal=0.5, blast=0.5), user='ana', embedding=[1.0] * 4)
           for _ in range(10)]
    other = [store.log_prediction('blood', 'v1', sha, 'blast', dict(normal=0.3 - 0.01 * i, blast=0.7 + 0.01 * i), user='bo',
                                  embedding=(rng.normal(size=4) * 5).tolist()) for i in range(10)]
    by_uncertainty = sorted(store.predictions(), key=lambda p: -margin_uncertainty(p['probs']))[:5]
    assert {p['id'] for p in by_uncertainty} <= set(dup)                     # what the textbook rule would pick
    q = [r['prediction_id'] for r in store.review_queue(k=5)]
    assert len(q) == 5 and len(set(q) & set(dup)) == 1 and q[0] in dup        # the most uncertain first, then the others
    store.add_feedback(q[1], 'normal')
    assert q[1] not in [r['prediction_id'] for r in store.review_queue(k=30)]
    assert {r['prediction_id'] for r in store.review_queue(k=30, user='bo')} == set(other) - {q[1]}
