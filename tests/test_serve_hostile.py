"""Hostile input against the real server on a loopback port (issue 13): a corpus built in code, each case answered
with a 4xx and a JSON error code, nothing stored, the server alive and `/ping` answering afterwards, and nothing written
outside BIOVIS_HOME. Plus the two behaviours that need timing to show: a pixel-dense upload does not hold the event loop,
and one request cannot make the server decode more than its budget."""
import io, os, struct, threading, time, zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from test_serve import Server, _png


def _zip(entries, method=zipfile.ZIP_DEFLATED):
    b = io.BytesIO()
    with zipfile.ZipFile(b, 'w', method) as z:
        for n, d in entries: z.writestr(n, d)
    return b.getvalue()


def _dense_png(side=8000):
    "A small file that decodes to many pixels: `side` x `side` zeros, about 60 KB as a PNG."
    b = io.BytesIO(); Image.fromarray(np.zeros((side, side), np.uint8)).save(b, 'PNG', compress_level=9); return b.getvalue()


def _lying_zip():
    "A stored zip whose central directory says an entry holds 10 bytes when it holds 1000 (the CRC check then fails)."
    raw = bytearray(_zip([('a.png', b'0123456789' * 100)], zipfile.ZIP_STORED))
    cd = raw.rfind(b'PK\x01\x02'); raw[cd + 24:cd + 28] = struct.pack('<I', 10)
    return bytes(raw)


def _bad_crc_zip():
    raw = bytearray(_zip([('a.png', b'0123456789' * 100)], zipfile.ZIP_STORED))
    raw[40] ^= 0xFF                                   # a byte of the entry's data: the CRC no longer matches
    return bytes(raw)


def _dicom(a, **attrs):
    "A DICOM file of array `a` (H x W grayscale, or frames x H x W x 3 RGB), with extra attributes set as given."
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid, SecondaryCaptureImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset('x.dcm', {}, file_meta=meta, preamble=b'\0' * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 'OT'
    if a.ndim == 4:                                   # frames x H x W x 3
        ds.NumberOfFrames, (ds.Rows, ds.Columns) = a.shape[0], a.shape[1:3]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, 'RGB', 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = a.astype(np.uint8).tobytes()
    else:
        ds.Rows, ds.Columns = a.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = a.astype(np.uint16).tobytes()
    for k, v in attrs.items(): setattr(ds, k, v)
    b = io.BytesIO(); ds.save_as(b, enforce_file_format=True); return b.getvalue()


def _files(*parts): return [('files', p) for p in parts]


CELL = _png(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))

# name: (request kwargs builder, allowed statuses, allowed error codes); every case must store nothing
CORPUS = {
    # images that are not what they say
    'svg with a script': (lambda: dict(files=_files(('x.svg', b'<svg onload="alert(1)"/>', 'image/svg+xml'))), {400}, {'invalid_image'}),
    'html named .png': (lambda: dict(files=_files(('x.png', b'<html><script>alert(1)</script>', 'image/png'))), {400}, {'invalid_image'}),
    'exe named .png': (lambda: dict(files=_files(('x.png', b'MZ\x90\x00' + b'\0' * 200, 'image/png'))), {400}, {'invalid_image'}),
    'php polyglot after a PNG signature': (lambda: dict(files=_files(('x.php.png', b'\x89PNG\r\n\x1a\n<?php system($_GET[0]); ?>', 'image/png'))), {400}, {'invalid_image'}),
    'truncated png': (lambda: dict(files=_files(('t.png', CELL[:len(CELL) // 2], 'image/png'))), {400}, {'invalid_image'}),
    'empty file': (lambda: dict(files=_files(('e.png', b'', 'image/png'))), {400}, {'invalid_image'}),
    'over the pixel limit': (lambda: dict(files=_files(('huge.png', _dense_png(9000), 'image/png'))), {400, 413}, {'invalid_image', 'over_budget'}),
    # DICOM
    'dicom nan rescale slope': (lambda: dict(files=_files(('nan.dcm', _dicom(np.full((64, 64), 800), RescaleSlope='NaN'), 'application/dicom'))), {400}, {'invalid_image'}),
    'dicom inf rescale slope': (lambda: dict(files=_files(('inf.dcm', _dicom(np.full((64, 64), 800), RescaleSlope='inf'), 'application/dicom'))), {400}, {'invalid_image'}),
    'dicom without pixel data': (lambda: dict(files=_files(('np.dcm', _dicom(np.zeros((8, 8)))[:-64], 'application/dicom'))), {400}, {'invalid_image'}),
    # zips
    'zip that lies about a size': (lambda: dict(files=_files(('lie.zip', _lying_zip(), 'application/zip'))), {400}, {'invalid_zip'}),
    'zip with a bad crc': (lambda: dict(files=_files(('crc.zip', _bad_crc_zip(), 'application/zip'))), {400}, {'invalid_zip'}),
    'zip with an absolute path': (lambda: dict(files=_files(('abs.zip', _zip([('/etc/passwd.png', CELL)]), 'application/zip'))), {400}, {'invalid_zip'}),
    'zip with a windows drive path': (lambda: dict(files=_files(('drv.zip', _zip([('C:/x.png', CELL)]), 'application/zip'))), {400}, {'invalid_zip'}),
    'zip inside a zip of junk': (lambda: dict(files=_files(('z.zip', _zip([('inner.png', _zip([('a.png', CELL)]))]), 'application/zip'))), {400}, {'invalid_image'}),
    # one request that asks too much
    '65 images in one request': (lambda: dict(files=_files(*[(f'{i}.png', CELL, 'image/png') for i in range(65)])), {413}, {'too_many_images'}),
    '8 dense images in one request': (lambda: dict(files=_files(*[(f'd{i}.png', DENSE, 'image/png') for i in range(8)])), {413}, {'over_budget'}),
    'zips expanding past the request budget': (lambda: dict(files=_files(*[(f'z{i}.zip', BIG_ZIP, 'application/zip') for i in range(3)])), {413}, {'over_budget'}),
    'a zip of 600 entries': (lambda: dict(files=_files(('many.zip', _zip([(f'{i}.png', CELL) for i in range(600)]), 'application/zip'))), {400, 413}, {'invalid_zip', 'too_many_images'}),
    'part over the upload limit': (lambda: dict(files=_files(('big.png', b'\x89PNG' + b'\0' * (21 * 2**20), 'image/png'))), {413}, {'invalid_image'}),
    # the request's shape
    'no files field': (lambda: dict(data={'model': 'blood'}), {400, 422}, {'invalid_request', 'invalid_input'}),
    'files as a text field': (lambda: dict(data={'files': 'not a file'}, files=[('x', ('a', b'b'))]), {422}, {'invalid_request'}),
    'model as a file': (lambda: dict(files=_files(('a.png', CELL, 'image/png')) + [('model', ('m', b'blood'))]), {422}, {'invalid_request'}),
    'unknown model': (lambda: dict(files=_files(('a.png', CELL, 'image/png')), data={'model': '../../etc/passwd'}), {404}, {'unknown_model'}),
    'json body': (lambda: dict(json={'files': ['a.png']}), {422}, {'invalid_request'}),
    'broken multipart': (lambda: dict(content=b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc',
                                      headers={'content-type': 'multipart/form-data; boundary=x'}), {400, 422}, {'invalid_input', 'invalid_request', 'invalid_image'}),
}

FEEDBACK_CORPUS = {
    'json array': (lambda pid: dict(json=[pid, 'basophil']), {422}, {'invalid_request'}),
    'json string': (lambda pid: dict(json='basophil'), {422}, {'invalid_request'}),
    'json number': (lambda pid: dict(json=42), {422}, {'invalid_request'}),
    'label as an object': (lambda pid: dict(json={'prediction_id': pid, 'label': {'$ne': 1}}), {422}, {'invalid_request'}),
    'id as a list': (lambda pid: dict(json={'prediction_id': [pid], 'label': 'basophil'}), {422}, {'invalid_request'}),
    'unknown label': (lambda pid: dict(json={'prediction_id': pid, 'label': 'unicorn'}), {400}, {'invalid_label'}),
    'unknown id': (lambda pid: dict(json={'prediction_id': 'x' * 40, 'label': 'basophil'}), {404}, {'unknown_prediction'}),
    'sql in the id': (lambda pid: dict(json={'prediction_id': "' OR 1=1 --", 'label': 'basophil'}), {404}, {'unknown_prediction'}),
    'a 100 kB note': (lambda pid: dict(json={'prediction_id': pid, 'label': 'basophil', 'note': 'x' * 100_000}), {400}, {'invalid_feedback'}),
    'invalid json': (lambda pid: dict(content=b'{"prediction_id": ', headers={'content-type': 'application/json'}), {400}, {'invalid_request'}),
}

DENSE = BIG_ZIP = None


@pytest.fixture(scope='module')
def hostile(trained, tmp_path_factory):
    global DENSE, BIG_ZIP
    DENSE = _dense_png(8000)
    rng = np.random.default_rng(1)      # entries that deflate about 50x: under the zip-bomb ratio, over the request budget together
    entry = (rng.random(15 * 2**20) < 0.02).astype(np.uint8).tobytes()
    BIG_ZIP = _zip([(f'e{i}.png', entry) for i in range(5)])          # 75 MB expanded each; three are over 200 MB
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
    build, statuses, codes = CORPUS[case]
    n = hostile.db_count('predictions')
    r = httpx.post(hostile.url + '/predict', timeout=120, **build())
    _check_refused(hostile, r, statuses, codes, n)


@pytest.mark.parametrize('case', list(FEEDBACK_CORPUS))
def test_hostile_feedback_is_4xx_json_and_stores_nothing(hostile, case):
    pid = httpx.post(hostile.url + '/predict', files=_files(('a.png', CELL, 'image/png')), timeout=30).json()['predictions'][0]['id']
    n_fb = hostile.db_count('feedback')
    build, statuses, codes = FEEDBACK_CORPUS[case]
    r = httpx.post(hostile.url + '/feedback', timeout=30, **build(pid))
    _check_refused(hostile, r, statuses, codes, hostile.db_count('predictions'))
    assert hostile.db_count('feedback') == n_fb


def test_multiframe_rgb_dicom_is_classified_not_a_500(hostile):
    "A multi-frame RGB DICOM was a 500; its first frame is an image like any other."
    frames = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    r = httpx.post(hostile.url + '/predict', files=_files(('cine.dcm', _dicom(frames), 'application/dicom')), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()['predictions'][0]['label']


def test_mask_feedback_on_a_classification_prediction_is_refused(hostile):
    "It stored the label 'retrain', not a class, and counted toward the retrain threshold."
    pid = httpx.post(hostile.url + '/predict', files=_files(('a.png', CELL, 'image/png')), timeout=30).json()['predictions'][0]['id']
    n_fb = hostile.db_count('feedback')
    r = httpx.post(hostile.url + '/feedback/mask', data={'prediction_id': pid}, timeout=30)
    assert r.status_code == 422 and r.json()['error'] == 'invalid_request', r.text
    assert hostile.db_count('feedback') == n_fb


def test_a_dense_upload_does_not_hold_the_event_loop(hostile):
    """While one request decodes an 8000 x 8000 PNG (about 1-2 s here), /ping keeps answering: before issue 13 such an
    upload (under 256 KB) was decoded on the event loop and every request waited for it."""
    done, pings = threading.Event(), []
    def upload():
        try: httpx.post(hostile.url + '/predict', files=_files(('dense.png', DENSE, 'image/png')), timeout=120)
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
    for u, role in (('ana', 'clinician'), ('bo', 'clinician'), ('root', 'admin')):
        run_cli('users', 'add', u, '--role', role, home=tmp_path, check=0,
                env=dict(BIOVIS_NEW_PASSWORD=f'{u}-secret-pw', BIOVIS_DB_URL=f'sqlite:///{tmp_path}/data/biovis.db'))
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
