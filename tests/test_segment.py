"Segmentation (issue 6): masks, data pairs, training, full-size prediction, metrics, registry and CLI."
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, SHARED_DATA

from biovis.segment import (InvalidMaskError, read_mask, mask_to_png, from_seg_folder, synthetic_seg_folder, seg_metrics,
                            train_seg, SegPredictor, evaluate_seg, train_and_register_seg, load_seg_dataset, find_seg_data)
from biovis.data import InvalidImageError
from biovis.registry import ModelRegistry

SMALL = dict(epochs=2, width=8, depth=3, crop=64, bs=8, crops_per_image=4, progress=False)


def _few(ds, n_train=6, n_valid=2, n_test=2):
    "A small subset of a real set with its own train/valid/test split."
    idx = list(range(n_train + n_valid + n_test))
    return ds.subset(idx, np.array(['train'] * n_train + ['valid'] * n_valid + ['test'] * n_test, dtype=object))


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    return synthetic_seg_folder(tmp_path_factory.mktemp('syn')/'cracks', n=14, size=(72, 100), seed=1)


def test_bad_masks_are_rejected_with_a_clear_message(tmp_path):
    img = np.zeros((20, 30), np.uint8)
    ok = np.zeros((20, 30), np.uint8); ok[5, :] = 255
    assert read_mask(ok, shape=img.shape).sum() == 30
    with pytest.raises(InvalidMaskError, match=r'mask is 30x21 pixels but its image is 30x20'):
        read_mask(np.zeros((21, 30), np.uint8), shape=img.shape)
    with pytest.raises(InvalidMaskError, match='only 0 and 255'):
        read_mask(np.full((20, 30), 77, np.uint8))
    with pytest.raises(InvalidMaskError, match='colour image'):
        read_mask(np.dstack([ok, ok * 0, ok]))
    with pytest.raises(InvalidMaskError, match='class indices 0..2'):
        read_mask(np.full((20, 30), 5, np.uint8), n_classes=3)
    with pytest.raises(InvalidImageError):          # the same error family as bad images
        read_mask(b'\x89PNG\r\n\x1a\n broken')
    # a folder with a mask of the wrong size names the file
    d = tmp_path/'bad'; (d/'image').mkdir(parents=True); (d/'masks').mkdir()
    for i in range(4):
        Image.fromarray(img).save(d/'image'/f'{i}.png'); Image.fromarray(ok if i else ok[:-1]).save(d/'masks'/f'{i}.png')
    ds = from_seg_folder(d)
    with pytest.raises(InvalidMaskError, match=r'0\.png: mask is 30x19'):
        ds.pair(0)


def test_pairs_manifest_and_version(syn, tmp_path):
    ds = from_seg_folder(syn)
    assert len(ds) == 14 and ds.classes == ['background', 'foreground']
    assert (ds.splits == 'test').sum() >= 1 and (ds.splits == 'valid').sum() >= 1
    man = ds.save_manifest(tmp_path/'m.csv').read_text()
    assert ds.version in man and 'mask_sha256' in man
    # images without masks are left out; a changed mask changes the version
    Image.fromarray(np.zeros((72, 100), np.uint8)).save(syn/'image'/'extra.png')
    assert len(from_seg_folder(syn)) == 14
    (syn/'image'/'extra.png').unlink()
    m = np.asarray(Image.open(syn/'masks'/'003.png'))
    Image.fromarray(255 - m).save(syn/'masks'/'003.png')
    assert from_seg_folder(syn).version != ds.version
    Image.fromarray(m).save(syn/'masks'/'003.png')
    assert from_seg_folder(syn).version == ds.version


def test_tolerant_metrics_by_hand():
    t = np.zeros((12, 12), np.uint8); t[6, 1:11] = 1
    off2 = np.roll(t, 2, 0); off3 = np.roll(t, 3, 0)
    assert seg_metrics([off2], [t]).metrics['f1_tol'] == 1.0      # 2 px away: inside the tolerance
    assert seg_metrics([off3], [t]).metrics['f1_tol'] == 0.0      # 3 px away: outside
    assert seg_metrics([off2], [t]).metrics['dice'] == 0.0
    half = t.copy(); half[6, 6:] = 0
    m = seg_metrics([half, t], [t, t]).metrics                     # pooled over images: 15 of 20 pixels found
    assert m['recall'] == pytest.approx(15 / 20) and m['precision'] == 1.0
    assert m['mean_image_dice'] == pytest.approx((2 * 5 / 15 + 1) / 2)


def _real_or_skip(name):
    p = find_seg_data(name)
    if p is None: pytest.skip(f'{name} not present (../shared/data)')
    return load_seg_dataset(name)


@pytest.mark.parametrize('name,scale', [('crackforest', 0.5), ('isbi2012', 0.25)])
def test_train_and_predict_on_a_few_real_images(name, scale):
    ds = _few(_real_or_skip(name))
    learn = train_seg(ds, scale=scale, **SMALL)
    p = SegPredictor(learn.model, learn.biovis, device='cpu')
    img = ds.image(int(ds.idxs('test')[0]))
    for h, w in [img.shape[:2], (131, 77), (33, 250)]:            # odd sizes and the full size
        r = p.predict(img[:h, :w])
        assert r.shape == (h, w) and r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1}
        assert read_mask(r.png(), shape=(h, w)).shape == (h, w)
    ev = evaluate_seg(p, ds, 'test')
    assert ev.metrics['n'] == 2 and len(ev.per_image) == 2
    assert all(0 <= ev.metrics[k] <= 1 for k in ('dice', 'iou', 'f1', 'f1_tol', 'precision_tol', 'recall_tol'))
    # it learned something: better than predicting no foreground at all (Dice 0) on the held-out images
    assert ev.metrics['f1_tol'] > 0.05, ev
    with pytest.raises(ValueError, match='used for training'): evaluate_seg(p, ds, 'train')


def test_registry_round_trip_and_promotion(syn, tmp_path):
    reg = ModelRegistry(tmp_path/'models')
    ds = from_seg_folder(syn)
    learn, ev, v = train_and_register_seg(ds, name='cracks', registry=reg, **SMALL)
    meta = reg.metadata('cracks')
    assert v == 'v1' and meta['task'] == 'segmentation' and meta['version'] == 'v1'
    assert meta['metrics']['dice'] == pytest.approx(ev.metrics['dice'])
    assert 'segmentation' in (reg.path('cracks', 'v1')/'MODEL_CARD.md').read_text()
    p = SegPredictor.from_registry('cracks', registry=reg, device='cpu')
    x = np.asarray(Image.open(syn/'image'/'000.png'))
    np.testing.assert_array_equal(p.predict(x).mask, SegPredictor(learn.model, learn.biovis, device='cpu').predict(x).mask)
    # a corrupted weights file is refused
    w = reg.path('cracks', 'v1')/'model.pt'; w.write_bytes(w.read_bytes()[:-10] + b'0123456789')
    with pytest.raises(Exception, match='SHA-256'): SegPredictor.from_registry('cracks', registry=reg)


def test_cli_train_evaluate_promote_predict(syn, home, tmp_path):
    r = run_cli('train', '--data', syn, '--name', 'cracks', '--epochs', '2', '--size', '48', '--width', '8', '--bs', '8', '-q',
                home=home, check=0)
    assert 'test Dice' in r.stdout and 'F1@2px' in r.stdout
    meta = json.loads(run_cli('models', 'show', 'cracks', home=home, check=0).stdout)
    assert meta['task'] == 'segmentation' and meta['dataset']['version']
    r = run_cli('evaluate', 'cracks', '--data', syn, '--json', tmp_path/'ev.json', home=home, check=0)
    assert 'f1_tol' in r.stdout and 0 <= json.loads((tmp_path/'ev.json').read_text())['dice'] <= 1
    # retrain: v2 lands as candidate or production; promote it explicitly
    run_cli('train', '--task', 'segmentation', '--data', syn, '--name', 'cracks', '--epochs', '1', '--size', '48', '--width', '8',
            '-q', home=home, check=0)
    assert 'cracks production -> v2' in run_cli('models', 'promote', 'cracks', 'v2', home=home, check=0).stdout
    odd = tmp_path/'odd.png'; Image.fromarray(np.asarray(Image.open(syn/'image'/'002.png'))[:71, :97]).save(odd)
    junk = tmp_path/'junk.png'; junk.write_bytes(b'not an image')
    r = run_cli('predict', odd, junk, '--model', 'cracks', '--out', tmp_path/'masks', '--json', home=home, check=3)
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    good = next(x for x in rows if 'mask' in x)
    assert good['shape'] == [71, 97] and good['version'] == 'v2'
    assert Image.open(good['mask']).size == (97, 71)
    assert 'not an image' in next(x for x in rows if 'error' in x)['error']


# --- serving: a real `biovis serve` on a loopback port, httpx and headless Chromium --------------------------------

import base64, io, sqlite3

import httpx


@pytest.fixture(scope='module')
def seg_server(syn, tmp_path_factory):
    from test_serve import Server
    reg = ModelRegistry(tmp_path_factory.mktemp('segreg'))
    train_and_register_seg(from_seg_folder(syn), name='cracks', registry=reg, promote='always', **SMALL)
    s = Server(tmp_path_factory.mktemp('segsrv'), reg.root, args=('--model', 'cracks'))
    yield s
    s.stop()


def _png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return b.getvalue()


def test_rest_predict_returns_the_mask_and_takes_corrected_masks(seg_server, syn):
    img = np.asarray(Image.open(syn/'image'/'004.png'))[:69, :95]          # an odd size
    r = httpx.post(seg_server.url + '/predict', files={'files': ('road.png', _png(img), 'image/png')}, timeout=60)
    assert r.status_code == 200, r.text
    p = r.json()['predictions'][0]
    assert p['task'] == 'segmentation' and p['shape'] == [69, 95] and p['model'] == 'cracks'
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(p['mask_png']))))
    assert mask.shape == (69, 95) and set(np.unique(mask)) <= {0, 255}
    assert p['fg_fraction'] == pytest.approx((mask == 255).mean())
    n = seg_server.db_count('mask_feedback')
    fb = lambda m, pid=p['id']: httpx.post(seg_server.url + '/feedback/mask', data={'prediction_id': pid, 'note': 'crack missed'},
                                           files={'mask': ('m.png', m, 'image/png')}, timeout=30)
    bad = fb(_png(np.zeros((70, 95), np.uint8)))                              # one row too many
    assert bad.status_code == 400 and bad.json()['error'] == 'invalid_mask' and 'same size' in bad.json()['detail']
    bad = fb(_png(np.full((69, 95), 7, np.uint8)))                             # not 0/255
    assert bad.status_code == 400 and 'only 0 and 255' in bad.json()['detail']
    bad = fb(b'not a png at all')
    assert bad.status_code == 400 and bad.json()['error'] == 'invalid_mask'
    assert fb(_png(np.zeros((69, 95), np.uint8)), pid='0' * 32).status_code == 404
    assert seg_server.db_count('mask_feedback') == n                          # nothing stored by the bad ones
    good = np.zeros((69, 95), np.uint8); good[30:33, :] = 255
    r = fb(_png(good))
    assert r.status_code == 200, r.text
    assert seg_server.db_count('mask_feedback') == n + 1
    with sqlite3.connect(seg_server.home/'data'/'biovis.db') as c:
        sha = c.execute('select mask_sha from mask_feedback where prediction_id=?', (p['id'],)).fetchone()[0]
    stored = next((seg_server.home/'data'/'uploads').rglob(f'{sha}.png'))
    np.testing.assert_array_equal(np.asarray(Image.open(stored)), good)
    # the garbage collector keeps a mask that a correction references
    from biovis.feedback import FeedbackStore
    st = FeedbackStore(f"sqlite:///{seg_server.home/'data'/'biovis.db'}", uploads_dir=seg_server.home/'data'/'uploads')
    st.gc_images(min_age=0); st.close()
    assert stored.exists()
    # retraining reads the corrected masks: exported as image/ + masks/, a folder train_seg takes
    r = run_cli('segment-feedback', seg_server.home/'retrain', '--model', 'cracks', home=seg_server.home, check=0)
    ds = from_seg_folder(seg_server.home/'retrain')
    assert len(ds) >= 1 and any((ds.mask(i) == (good // 255)).all() for i in range(len(ds)))


def test_browser_segment_tab_overlay_opacity_and_save(seg_server, syn, tmp_path):
    "Headless Chromium: upload on the Segment tab, see the overlay and the foreground fraction, change the opacity, save a corrected mask."
    if not Path('/usr/bin/chromium').exists(): pytest.skip('chromium is not installed')
    from playwright.sync_api import sync_playwright
    img = np.asarray(Image.open(syn/'image'/'005.png'))[:71, :99]
    Image.fromarray(img).save(tmp_path/'road.png')
    good = np.zeros((71, 99), np.uint8); good[10:12, :] = 255
    Image.fromarray(good).save(tmp_path/'mask.png'); Image.fromarray(good[:-1]).save(tmp_path/'bad.png')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = b.new_page(viewport={'width': 1280, 'height': 1600})
        def segment():
            page.goto(seg_server.url + '/ui/', wait_until='load')
            page.get_by_role('tab', name='Segment').click()
            page.wait_for_selector('#seg-upload input[type=file]', state='attached', timeout=60000)
            page.locator('#seg-upload input[type=file]').set_input_files(str(tmp_path/'road.png'))
            page.wait_for_timeout(500)
            page.locator('#segment').click()
            page.wait_for_function("(document.querySelector('#seg-info') || {}).innerText?.includes('foreground fraction')", timeout=60000)
            return page.locator('#seg-info').inner_text()
        info = segment()
        assert 'mask 99x71' in info and 'cracks v1' in info
        src0 = page.locator('#seg-overlay img').get_attribute('src')
        num = page.locator('#seg-alpha input[type=number]')
        num.fill('1'); num.press('Enter')
        page.wait_for_function("s => { const i = document.querySelector('#seg-overlay img'); return i && i.src !== s; }", arg=src0, timeout=30000)
        n0 = seg_server.db_count('mask_feedback')
        page.locator('#seg-mask input[type=file]').set_input_files(str(tmp_path/'bad.png'))
        page.wait_for_timeout(500)
        page.locator('#seg-save').click()
        page.wait_for_function("(document.querySelector('#seg-saved') || {}).innerText?.includes('Not saved')", timeout=30000)
        assert 'same size' in page.locator('#seg-saved').inner_text()
        assert seg_server.db_count('mask_feedback') == n0                 # the bad mask stored nothing
        n = seg_server.db_count('mask_feedback')
        segment()                                                         # a fresh page: the mask field is empty again
        page.locator('#seg-mask input[type=file]').set_input_files(str(tmp_path/'mask.png'))
        page.wait_for_timeout(500)
        page.locator('#seg-save').click()
        page.wait_for_function("(document.querySelector('#seg-saved') || {}).innerText?.includes('with the corrected mask')", timeout=30000)
        art = Path(__file__).resolve().parent.parent/'reports'/'test-artifacts'; art.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(art/'demo_segment.png'), full_page=True)
        b.close()
    assert seg_server.db_count('mask_feedback') == n + 1
