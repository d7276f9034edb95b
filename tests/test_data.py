"biovis.data: every loader, manifests and versions, the offline fetch, DICOM."
import io, shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biovis.data import (from_npz, from_folder, from_csv, load_dataset, export_folder, write_dicom, read_image,
                         fetch_bloodmnist, DataFetchError, InvalidImageError, make_sample)
from conftest import SHARED_DATA, run_cli


def _medmnist_npz(path, n=(30, 10, 12), shape=(28, 28), n_classes=3, seed=0):
    "A MedMNIST-format file with images whose mean brightness encodes the class."
    rng, out = np.random.default_rng(seed), {}
    for split, k in zip(('train', 'val', 'test'), n):
        y = np.arange(k) % n_classes
        x = np.clip(rng.normal(40 + 60 * y[:, None, None], 10, (k, *shape[:2])), 0, 255)
        if len(shape) == 3: x = np.repeat(x[..., None], shape[2], -1)
        out[f'{split}_images'], out[f'{split}_labels'] = x.astype(np.uint8), y[:, None].astype(np.uint8)
    np.savez_compressed(path, **out)
    return path


def test_sample_is_stratified_bloodmnist(sample_ds):
    s = sample_ds.summary()
    assert list(s.index) == ['basophil', 'eosinophil', 'erythroblast', 'immature granulocytes', 'lymphocyte',
                             'monocyte', 'neutrophil', 'platelet']
    assert (s.values >= 10).all()                       # every class in every split
    assert s.sum().to_dict() == {'train': 960, 'valid': 240, 'test': 320}


def test_sample_matches_official_split_proportions(sample_ds):
    z = np.load(SHARED_DATA/'bloodmnist'/'bloodmnist.npz') if (SHARED_DATA/'bloodmnist').exists() else None
    if z is None: pytest.skip('official BloodMNIST not beside the project')
    full = np.bincount(z['train_labels'].ravel()) / len(z['train_labels'])
    samp = sample_ds.summary()['train'].values / 960
    assert np.abs(full - samp).max() < 0.01


@pytest.mark.parametrize('shape', [(28, 28), (28, 28, 3), (64, 64)])
def test_any_medmnist_npz(tmp_path, shape):
    ds = from_npz(_medmnist_npz(tmp_path/'pneumoniamnist.npz', shape=shape))
    assert ds.classes == ['class_0', 'class_1', 'class_2']
    assert ds.channels == (3 if len(shape) == 3 else 1)
    x, y = ds.tensors('test')
    assert x.shape == (12, *shape[:2], ds.channels) and len(y) == 12


def test_npz_that_is_not_medmnist(tmp_path):
    np.savez(tmp_path/'x.npz', a=np.zeros(3))
    with pytest.raises(ValueError, match='not a MedMNIST'): from_npz(tmp_path/'x.npz')


def test_folder_mixed_formats_sizes_and_modes(tmp_path):
    rng = np.random.default_rng(0)
    fmts = ['png', 'jpg', 'bmp', 'tif']
    for c in ('healthy', 'sick'):
        (tmp_path/c).mkdir()
        for i in range(12):
            h, w = rng.integers(20, 90, 2)
            a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            im = Image.fromarray(a) if i % 2 else Image.fromarray(a).convert('L')
            im.save(tmp_path/c/f'{i}.{fmts[i % 4]}')
    (tmp_path/'healthy'/'notes.txt').write_text('not an image, not listed')
    ds = from_folder(tmp_path, valid_pct=0.25, test_pct=0.25, seed=1)
    assert ds.classes == ['healthy', 'sick'] and len(ds) == 24
    for s in ('train', 'valid', 'test'):      # stratified: both classes in every split
        assert set(ds.labels[ds.idxs(s)]) == {0, 1}
    x, y = ds.tensors('train', size=32, channels=3)
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.uint8
    assert from_folder(tmp_path, valid_pct=0.25, test_pct=0.25, seed=1).version == ds.version
    assert from_folder(tmp_path, valid_pct=0.25, test_pct=0.25, seed=2).version != ds.version


def test_folder_with_split_folders(tmp_path, sample_ds):
    export_folder(sample_ds, tmp_path/'exp', per_class=2)
    shutil.move(tmp_path/'exp'/'valid', tmp_path/'exp'/'val')       # 'val' is accepted for 'valid'
    ds = from_folder(tmp_path/'exp')
    assert {s: int((ds.splits == s).sum()) for s in ('train', 'valid', 'test')} == {'train': 16, 'valid': 16, 'test': 16}


def test_csv_and_its_errors(tmp_path, sample_ds):
    export_folder(sample_ds, tmp_path/'f', per_class=2)
    fds = from_folder(tmp_path/'f')
    df = pd.DataFrame(dict(path=[str(p) for p in fds.paths], label=[fds.classes[l] for l in fds.labels], split=fds.splits))
    df.to_csv(tmp_path/'ok.csv', index=False)
    assert from_csv(tmp_path/'ok.csv').version == fds.version
    df.assign(label='alien').to_csv(tmp_path/'badlabel.csv', index=False)
    with pytest.raises(ValueError, match='not among the classes'): from_csv(tmp_path/'badlabel.csv', classes=fds.classes)
    df.assign(path='nope.png').to_csv(tmp_path/'missing.csv', index=False)
    with pytest.raises(ValueError, match='do not exist'): from_csv(tmp_path/'missing.csv')
    df[['path']].to_csv(tmp_path/'nolabel.csv', index=False)
    with pytest.raises(ValueError, match='missing column'): from_csv(tmp_path/'nolabel.csv')


def test_manifest_version_tracks_content_labels_and_splits(tmp_path, sample_ds):
    export_folder(sample_ds, tmp_path/'f', per_class=2)
    v0 = from_folder(tmp_path/'f').version
    p = next((tmp_path/'f'/'train'/'basophil').iterdir())
    a = np.asarray(Image.open(p)).copy(); a[0, 0, 0] ^= 1; Image.fromarray(a).save(p)    # one pixel of one image
    v1 = from_folder(tmp_path/'f').version
    assert v1 != v0
    shutil.move(p, tmp_path/'f'/'train'/'eosinophil'/p.name)                           # one label
    v2 = from_folder(tmp_path/'f').version
    assert len({v0, v1, v2}) == 3
    ds = from_folder(tmp_path/'f'); ds.save_manifest(tmp_path/'m.csv')
    m = pd.read_csv(tmp_path/'m.csv', comment='#')
    assert len(m) == len(ds) and set(m.columns) == {'id', 'sha256', 'label', 'label_name', 'split'}
    assert v2 in (tmp_path/'m.csv').read_text().splitlines()[0]


def test_dicom_folder_loads_like_images(tmp_path):
    rng = np.random.default_rng(0)
    for c, base in (('normal', 800), ('effusion', 2400)):
        (tmp_path/c).mkdir()
        for i in range(6): write_dicom(rng.normal(base, 200, (48, 40)).clip(0, 4095).astype(np.uint16), tmp_path/c/f'{i}.dcm')
    ds = load_dataset(tmp_path, valid_pct=0.34, test_pct=0.34)
    assert ds.channels == 1 and ds.image(0).shape == (48, 40)
    x, _ = ds.tensors('train', size=32)
    assert x.shape[1:] == (32, 32, 1)


def test_fetch_offline_fails_clearly_and_leaves_nothing(tmp_path):
    with pytest.raises(DataFetchError, match='pass its path'):
        fetch_bloodmnist(tmp_path/'bm', url='http://127.0.0.1:9/bloodmnist.npz', timeout=2)
    assert not (tmp_path/'bm').exists()          # no partial file, nor the folder made for it


def test_fetch_rejects_wrong_checksum(tmp_path):
    "A local HTTP server serves a file whose MD5 is not the official one: it is not kept."
    import http.server, threading, functools
    (tmp_path/'srv').mkdir(); (tmp_path/'srv'/'bloodmnist.npz').write_bytes(b'not the real file')
    h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path/'srv'))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataFetchError, match='MD5'):
            fetch_bloodmnist(tmp_path/'bm', url=f'http://127.0.0.1:{srv.server_port}/bloodmnist.npz', progress=False)
        assert not (tmp_path/'bm').exists()
        ok = tmp_path/'srv'/'bloodmnist.npz'
        import hashlib
        p = fetch_bloodmnist(tmp_path/'bm', url=f'http://127.0.0.1:{srv.server_port}/bloodmnist.npz', progress=False,
                             md5=hashlib.md5(ok.read_bytes()).hexdigest())
        assert p.read_bytes() == ok.read_bytes()
    finally: srv.shutdown()


def test_cli_data_fetch_offline_exit_code(tmp_path):
    r = run_cli('data', 'fetch', 'bloodmnist', '--dest', tmp_path/'bm', '--timeout', '3', home=tmp_path)
    # where the internet is reachable the download may succeed; here it must fail with the hint
    if r.returncode == 0: assert 'verified' in r.stdout
    else: assert r.returncode == 5 and 'pass its path' in r.stderr, r.stderr


def test_cli_data_info(tmp_path):
    r = run_cli('data', 'info', 'sample', '--manifest', tmp_path/'m.csv', home=tmp_path, check=0)
    assert 'basophil' in r.stdout and 'version' in r.stdout and (tmp_path/'m.csv').exists()
    assert run_cli('data', 'info', tmp_path/'nothing', home=tmp_path).returncode == 4


def test_make_sample_reproducible(tmp_path):
    src = _medmnist_npz(tmp_path/'full.npz', n=(300, 60, 90), n_classes=3)
    a = make_sample(src, tmp_path/'a.npz', n={'train': 30, 'val': 9, 'test': 12}, min_per_class=2)
    b = make_sample(src, tmp_path/'b.npz', n={'train': 30, 'val': 9, 'test': 12}, min_per_class=2)
    assert from_npz(a).version == from_npz(b).version and len(from_npz(a)) == 51
