"Retraining a segmentation model from corrected masks (issue 6): the real server, store, `biovis retrain` and papermill."
import io, json, shutil, tempfile
from pathlib import Path

import httpx
import nbformat
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

from biovis.segment import synthetic_seg_folder, from_seg_folder, train_and_register_seg, mask_to_png, evaluate_seg, SegPredictor
from biovis.registry import ModelRegistry

NAME = 'cracks'
TINY = dict(epochs=2, width=8, depth=3, crop=64, bs=8, crops_per_image=4, progress=False)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "A tiny production segmentation model on a synthetic set, trained with a private temp folder to watch its checkpoints."
    from fastai.callback.core import Callback
    root = tmp_path_factory.mktemp('segbase')
    syn = synthetic_seg_folder(root/'syn', n=14, size=(72, 100), seed=1)
    seen = []
    class _Watch(Callback):
        order = 70                                                     # after SaveModelCallback has saved the epoch
        def after_epoch(self): seen.append((Path(self.learn.path), (Path(self.learn.path)/'best.pth').exists()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, 'tempdir', str(root))
        train_and_register_seg(from_seg_folder(syn), name=NAME, registry=ModelRegistry(root/'models'), promote='always',
                               cbs=[_Watch()], **TINY)
    return dict(syn=syn, models=root/'models', seen=seen)


@pytest.fixture
def shome(home, base):
    shutil.copytree(base['models'], home/'models')
    return home


def _png(a, level=6):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG', compress_level=level); return b.getvalue()


def _line(shape, row):
    m = np.zeros(shape, np.uint8); m[row, :] = 255; return m


def _store(home):
    from biovis.feedback import FeedbackStore
    return FeedbackStore(f"sqlite:///{home/'data'/'biovis.db'}", uploads_dir=home/'data'/'uploads')


def _correct(st, img_bytes, mask):
    "A prediction of `img_bytes` by the production model and its corrected mask, through the store's API; returns the prediction id."
    pid = st.log_prediction(NAME, 'v1', st.save_image(img_bytes), 'background', {'background': 1.0, 'foreground': 0.0})
    st.add_mask_feedback(pid, mask_to_png(mask // 255))
    return pid


def _registry_state(home):
    reg = ModelRegistry(home/'models')
    return reg.versions(NAME), reg.aliases(NAME)


def _fb_pairs(ds):
    "{image bytes: mask} of the corrected pairs in the train split of a dataset version."
    return {ds.image(i).tobytes(): ds.mask(i) for i in ds.idxs('train') if Path(ds.image_paths[i]).name.startswith('fb_')}


def test_training_removes_its_checkpoint_folder(base):
    assert base['seen'] and all(ok for _, ok in base['seen'])          # fastai saved its best epoch there while training
    ckpt = base['seen'][0][0]
    assert ckpt.name.startswith('biovis-seg-') and ckpt.parent == base['models'].parent
    assert not ckpt.exists()                                           # and it is gone afterwards


def test_retrain_from_masks_corrected_through_the_server(shome, base):
    from test_serve import Server
    from biovis.pipeline import load_dataset_version
    syn, new = base['syn'], synthetic_seg_folder(shome/'new', n=3, size=(72, 100), seed=7)
    imgs = {k: np.asarray(Image.open(new/'image'/f'{i:03d}.png')) for i, k in enumerate('ABC')}
    truth = {k: np.asarray(Image.open(new/'masks'/f'{i:03d}.png')) for i, k in enumerate('ABC')}
    bds = from_seg_folder(syn)
    t = int(bds.idxs('test')[0])
    held = np.asarray(Image.open(bds.image_paths[t]))
    s = Server(shome, shome/'models', args=('--model', NAME))
    try:
        def correct(img_bytes, mask):
            r = httpx.post(s.url + '/predict', files={'files': ('x.png', img_bytes, 'image/png')}, timeout=60)
            assert r.status_code == 200, r.text
            pid = r.json()['predictions'][0]['id']
            r = httpx.post(s.url + '/feedback/mask', data={'prediction_id': pid}, files={'mask': ('m.png', _png(mask), 'image/png')}, timeout=30)
            assert r.status_code == 200, r.text
        correct(_png(imgs['A']), _line((72, 100), 5))                  # a first, wrong correction of A ...
        correct(_png(imgs['B']), truth['B'])
        correct(_png(imgs['A']), truth['A'])                           # ... corrected again: the latest wins
        correct(_png(imgs['C'], 1), _line((72, 100), 9))               # C twice, in two encodings of the same pixels:
        correct(_png(imgs['C'], 9), truth['C'])                        # one image, the later correction
        correct(_png(held), _line((72, 100), 20))                      # a held-out image: never trained on
        assert s.db_count('mask_feedback') == 6
    finally:
        s.stop()
    before = _registry_state(shome)
    # below the threshold: nothing happens
    r = run_cli('retrain', NAME, home=shome, env={'BIOVIS_FB_THRESH': '7'}, check=0)
    assert 'skip: 6 new corrected masks since' in r.stdout and '< FB_THRESH 7' in r.stdout
    assert _registry_state(shome) == before and not list(shome.glob('reports/runs/*/retrain_segment.ipynb'))
    env = {'BIOVIS_FB_THRESH': '6'}
    r = run_cli('retrain', NAME, '--dry-run', home=shome, env=env, check=0)
    assert 'proceed: 6 new corrected masks since' in r.stdout and _registry_state(shome) == before
    r = run_cli('retrain', NAME, '--epochs', '1', '--json', home=shome, env=env, check=0)
    res = json.loads(r.stdout)
    assert res['status'] == 'done' and res['decision']['task'] == 'segmentation' and res['decision']['new_feedback'] == 6
    fb = res['dataset']['feedback']
    assert (fb['rows'], fb['images'], fb['added'], fb['duplicates'], fb['in_holdout'], fb['skipped']) == (6, 5, 3, 1, 1, [])
    # the dataset version: the base pairs + exactly the corrected masks, pixel for pixel, in the train split
    ds = load_dataset_version(res['dataset']['path'])
    assert Path(res['dataset']['path']).parent == shome/'data'/'versions'/NAME
    assert ds.version == res['dataset_version'] == res['dataset']['version']
    assert (Path(res['dataset']['path'])/'manifest.csv').read_text().startswith(f'# dataset {NAME} version {ds.version}')
    got = _fb_pairs(ds)
    assert set(got) == {imgs[k].tobytes() for k in 'ABC'}
    for k in 'ABC': np.testing.assert_array_equal(got[imgs[k].tobytes()], truth[k] // 255)
    assert (ds.splits == 'train').sum() == (bds.splits == 'train').sum() + 3
    # the held-out split is the base's, file for file, and holds no corrected image
    man, bman = ds.manifest(), bds.manifest()
    for s in ('test', 'valid'):
        assert man[man.split == s][['sha256', 'mask_sha256']].values.tolist() == bman[bman.split == s][['sha256', 'mask_sha256']].values.tolist()
    # the executed notebook and its report
    run_dir = Path(res['run_dir'])
    assert run_dir.parent == shome/'reports'/'runs' and Path(res['notebook']) == run_dir/'retrain_segment.ipynb'
    nb = nbformat.read(run_dir/'retrain_segment.ipynb', as_version=4)
    p = nb.metadata['papermill']['parameters']
    assert p['epochs'] == 1 and p['metric'] == 'f1_tol' and p['train_config']['width'] == 8 and p['train_config']['depth'] == 3
    assert not [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert 'Candidate against production' in (run_dir/'retrain_segment.html').read_text()
    assert json.loads((run_dir/'result.json').read_text())['version'] == res['version'] == 'v2'
    # the registry: a new segmentation version, compared with production on the same held-out split
    reg = ModelRegistry(shome/'models')
    meta = reg.metadata(NAME, 'v2')
    assert meta['task'] == 'segmentation' and meta['model_config']['width'] == 8 and meta['dataset']['version'] == ds.version
    assert meta['metrics']['dataset_version'] == ds.version and meta['retrain']['feedback_until']
    pr = res['promotion']
    assert pr['metric'] == 'f1_tol' and pr['production_version'] == 'v1' and pr['candidate'] == pytest.approx(meta['metrics']['f1_tol'])
    prod = evaluate_seg(SegPredictor.from_registry(NAME, 'v1', registry=reg, device='cpu'), ds, 'test')     # production on the same split
    assert pr['production'] == pytest.approx(prod.metrics['f1_tol']) and pr['promote'] == (pr['candidate'] >= pr['production'] - 0.01)
    assert reg.aliases(NAME)['candidate'] == 'v2' and res['promoted'] == (reg.aliases(NAME)['production'] == 'v2')
    # nothing new since: the next check skips
    r = run_cli('retrain', NAME, home=shome, env=env, check=0)
    assert 'skip: 0 new corrected masks' in r.stdout and reg.versions(NAME) == ['v1', 'v2']


def test_missing_or_corrupt_stored_files_are_skipped_and_reported(shome, base):
    from biovis.pipeline import retrain, load_dataset_version
    st = _store(shome)
    new = synthetic_seg_folder(shome/'new', n=4, size=(72, 100), seed=11)
    imgs = [(new/'image'/f'{i:03d}.png').read_bytes() for i in range(4)]
    masks = [np.asarray(Image.open(new/'masks'/f'{i:03d}.png')) for i in range(4)]
    pids = [_correct(st, b, m) for b, m in zip(imgs, masks)]
    rows = st.mask_feedback_rows(model=NAME)
    bad_mask = st.image_path(rows[1]['mask_sha']); bad_mask.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)   # truncated PNG
    st.image_path(rows[2]['image_sha']).unlink()                                                          # the image is gone
    said = []
    res = retrain(NAME, store=st, registry=ModelRegistry(shome/'models'), threshold=4, epochs=1, say=said.append)
    assert res['status'] == 'done' and res['version'] == 'v2'
    fb = res['dataset']['feedback']
    assert (fb['added'], fb['unreadable_mask'], fb['missing_image']) == (2, 1, 1)
    assert sorted((x['prediction_id'], x['reason']) for x in fb['skipped']) == sorted([(pids[1], 'unreadable_mask'), (pids[2], 'missing_image')])
    assert any(pids[1] in m and 'unreadable_mask' in m for m in said) and any(pids[2] in m and 'missing_image' in m for m in said)
    got = _fb_pairs(load_dataset_version(res['dataset']['path']))
    assert len(got) == 2
    for i in (0, 3): np.testing.assert_array_equal(got[np.asarray(Image.open(io.BytesIO(imgs[i]))).tobytes()], masks[i] // 255)
    assert bad_mask.read_bytes() == b'\x89PNG\r\n\x1a\n' + b'\x00' * 40                                   # the store is left as it was


def test_failing_segmentation_notebook_restores_the_registry(shome, tmp_path):
    "The segmentation path shares the classification one's lock, snapshot and restore: a notebook that registers and then fails leaves nothing."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# parameters\nname = 'x'\nregistry = None\ntrain_config = {}"),
                nbformat.v4.new_code_cell('from biovis.registry import ModelRegistry\nfrom biovis.kinds import load_model\n'
                                          'reg = ModelRegistry(registry)\nm, meta = load_model(name, registry=reg)\n'
                                          "assert train_config['width'] == 8\nprint(reg.register(name, m, meta))"),
                nbformat.v4.new_code_cell("raise RuntimeError('boom in the segmentation pipeline')")]
    bad = tmp_path/'bad.ipynb'; nbformat.write(nb, bad)
    before = _registry_state(shome)
    r = run_cli('retrain', NAME, '--force', '--notebook', bad, home=shome)
    assert r.returncode == 1 and 'boom in the segmentation pipeline' in r.stderr, r.stdout + r.stderr
    assert 'proceed: forced (0 new corrected masks' in r.stdout
    assert _registry_state(shome) == before
