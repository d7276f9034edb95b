"""Issue 14: augmentation and test-time views follow what the images are. A mirror image that changes the label is
never used on anatomy; MedMNIST sets are known from medmnist.INFO; a data set's README or --modality says the rest."""

import numpy as np
import pytest

from conftest import SHARED_DATA, run_cli


def _left_right(n=720, size=28, seed=0):
    "Real cells from the shipped sample as background, a bright square on the left (class 'left') or the right ('right') half."
    from biovis.data import load_dataset, ImageDataset
    rng = np.random.default_rng(seed)
    base = load_dataset('sample').array[:n].mean(-1).astype(np.uint8) // 2           # grayscale cells, dimmed
    y = rng.integers(0, 2, n)
    x = base.copy()
    for i in range(n):
        r, c = rng.integers(2, size - 8), rng.integers(1, size // 2 - 7)
        c = c if y[i] == 0 else size - c - 6
        x[i, r:r + 6, c:c + 6] = 255
    splits = np.array(['train'] * (n * 6 // 10) + ['valid'] * (n * 2 // 10) + ['test'] * (n - n * 8 // 10), dtype=object)
    return ImageDataset(['left', 'right'], y, splits, array=x[..., None], name='left_right', modality='xray', modality_source='test')


@pytest.fixture(scope='module')
def left_right(): return _left_right()


def _test_accuracy(ds, policy):
    from biovis.train import train
    from biovis.evaluate import evaluate
    learn = train(ds, epochs=6, progress=False, policy=policy, calibrate_on=None)
    return learn, evaluate(learn, ds, 'test', tta=True).metrics['accuracy']


def test_a_flip_that_changes_the_label_is_not_learned_away(left_right):
    "The old policy (every image a slide: 8 dihedral views in training and TTA) cannot tell left from right; the data's own can."
    learn, acc = _test_accuracy(left_right, None)                       # the data set says xray
    old, acc_old = _test_accuracy(left_right, 'microscopy')             # what every data set got before
    print(f'left vs right, test accuracy with TTA: xray policy {acc:.3f}, slide policy {acc_old:.3f}')
    assert learn.biovis['policy']['modality'] == 'xray' and not learn.biovis['policy']['flip']
    assert acc >= 0.9 and acc_old <= 0.7, (acc, acc_old)


def test_medmnist_sets_known_by_name_and_md5(tmp_path):
    from biovis.data import from_npz, load_dataset
    s = load_dataset('sample')
    assert (s.modality, s.modality_source, s.classes[0]) == ('microscopy', 'medmnist', 'basophil')
    f = SHARED_DATA/'bloodmnist'/'bloodmnist.npz'
    if not f.exists(): pytest.skip('the official BloodMNIST file is not in ../shared/data')
    (tmp_path/'cells_2024.npz').symlink_to(f)                           # another name: known by its MD5
    ds = from_npz(tmp_path/'cells_2024.npz')
    assert (ds.name, ds.modality, ds.classes[-1]) == ('bloodmnist', 'microscopy', 'platelet')
    p = SHARED_DATA/'pneumoniamnist'/'pneumoniamnist.npz'
    if p.exists():
        ds = from_npz(p)
        assert (ds.classes, ds.modality) == (['normal', 'pneumonia'], 'xray')


def test_cli_records_the_policy_and_the_predictor_uses_its_views(tmp_path):
    "A class folder with a README line `modality: xray` trains without mirror images, and the registered model tests with one view."
    from PIL import Image
    from biovis.registry import ModelRegistry
    from biovis.kinds import load_predictor
    ds = _left_right(n=240)
    root = tmp_path/'films'
    for i, (img, y) in enumerate(zip(ds.array, ds.labels)):
        d = root/ds.classes[y]; d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d/f'{i}.png')
    (root/'README.md').write_text('# Films\n\nmodality: X-ray\n')
    r = run_cli('train', '--data', root, '--epochs', '1', '-q', home=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'xray (from README): no mirror images, no quarter turns' in r.stderr + r.stdout
    reg = ModelRegistry(tmp_path/'models')
    meta = reg.metadata('films', 'v1')
    assert meta['policy']['modality'] == 'xray' and meta['policy']['source'] == 'README'
    assert load_predictor('films', registry=reg, device='cpu', tta=True).views == ((0, False),)
    # the user's word wins over the README
    r = run_cli('train', '--data', root, '--epochs', '1', '-q', '--modality', 'microscopy', '--name', 'films2', home=tmp_path)
    assert r.returncode == 0 and reg.metadata('films2', 'v1')['policy']['source'] == '--modality'
    assert len(load_predictor('films2', registry=reg, device='cpu', tta=True).views) == 8
    r = run_cli('train', '--data', root, '--modality', 'radiology', home=tmp_path)
    assert r.returncode != 0 and 'radiology' in r.stderr


def test_a_model_from_before_policies_keeps_its_eight_views():
    from biovis.policy import policy_from_dict
    assert len(policy_from_dict(None).tta_views) == 8 and policy_from_dict({}).flip


def test_xray_training_zooms_and_microscopy_keeps_the_size():
    "A radiograph's scale varies with the patient and the detector, so X-ray training zooms (+-15 %); a cell's size tells its type, so microscopy never does."
    import torch
    from biovis.policy import policy_for
    from biovis.train import policy_augment
    x = torch.zeros(256, 1, 28, 28); x[..., 10:18, 10:18] = 1.0         # a bright 8 x 8 square (64 px) in the middle
    g = torch.Generator().manual_seed(0)
    area = lambda p: (policy_augment(x, p, generator=g) > 0.5).flatten(1).sum(1).float()
    xray, cells = policy_for('xray'), policy_for('microscopy')
    assert xray.scale == 0.15 and cells.scale == 0 and 'zoom +-15%' in xray.describe() and 'zoom' not in cells.describe()
    a = area(cells)
    assert (a == 64).all(), a.unique()                  # quarter turns, mirror images and whole-pixel shifts keep 64 px
    a = area(xray)                                      # zoomed by 0.85-1.15, turned, resampled and jittered: about 36-91 px
    assert a.min() < 56 and a.max() > 72 and a.min() > 25 and a.max() < 110, (a.min(), a.max())
