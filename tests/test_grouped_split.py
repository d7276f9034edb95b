"Validation that lies: a train/ folder of augmented copies gets a grouped split, and a saturated validation split fits no temperature."
import io, re

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from biovis.data import ImageDataset, from_folder, load_dataset, near_duplicate_groups, phash_views
from biovis.registry import model_card
from biovis.train import calibrate, fit_temperature

PER_CLASS, SIZE = 40, 64


def _augmented(im: Image.Image, rng) -> list:
    """Five small augmentations of `im`: mirror, flip, quarter turn, brightness +-5 %, JPEG re-encoding. (Not a shift: a 1-px shift moves
    the pHash of these smooth, upscaled 28-px cells by up to 14 bits at 64 px, 10 at 128 px, as far as distinct cells lie apart.)"""
    b = io.BytesIO(); im.save(b, 'JPEG', quality=80)
    return [ImageOps.mirror(im), ImageOps.flip(im), im.transpose(Image.Transpose.ROTATE_90),
            ImageEnhance.Brightness(im).enhance(float(rng.choice([0.95, 1.05]))), Image.open(io.BytesIO(b.getvalue())).convert('RGB')]


@pytest.fixture(scope='module')
def copies(tmp_path_factory):
    "A class-folder set: train/ holds 40 originals per class, each with 5 augmented copies; test/ other images; no valid/."
    root, src, rng = tmp_path_factory.mktemp('copies'), load_dataset('sample'), np.random.default_rng(0)
    for ci, c in enumerate(src.classes):
        tr = np.flatnonzero((src.labels == ci) & (src.splits == 'train'))[:PER_CLASS]
        (root/'train'/c).mkdir(parents=True); (root/'test'/c).mkdir(parents=True)
        for k, i in enumerate(tr):
            im = Image.fromarray(src.image(i)).resize((SIZE, SIZE), Image.BICUBIC)
            for j, v in enumerate([im, *_augmented(im, rng)]): v.save(root/'train'/c/f'o{k:03d}_a{j}.png')
        for i in np.flatnonzero((src.labels == ci) & (src.splits == 'test'))[:5]:
            Image.fromarray(src.image(i)).resize((SIZE, SIZE), Image.BICUBIC).save(root/'test'/c/f't{i}.png')
    return root


def _origins_on_both_sides(ds) -> int:
    "How many originals have copies in the train split and in the valid split."
    side = {}
    for p, s in zip(ds.paths, ds.splits):
        if s in ('train', 'valid'): side.setdefault((p.parent.name, re.match(r'o\d+', p.name).group()), set()).add(s)
    return sum(len(v) == 2 for v in side.values())


def test_grouped_split_keeps_copies_together(copies):
    ds = from_folder(copies)
    n_train_folder, n_orig = 6 * PER_CLASS * len(ds.classes), PER_CLASS * len(ds.classes)
    g = ds.grouping
    assert g and g['images'] == n_train_folder
    assert g['groups'] <= n_orig * 1.1 and g['largest'] <= 24, g         # the copies were found, not one giant group
    assert _origins_on_both_sides(ds) == 0
    pool = [i for i in range(len(ds)) if ds.splits[i] in ('train', 'valid')]
    groups = near_duplicate_groups(np.stack([phash_views(ds.paths[i]) for i in pool]))
    sp = np.array([ds.splits[i] for i in pool])
    assert all(len(set(sp[groups == k])) == 1 for k in np.unique(groups)), 'a pHash group spans train and valid'
    frac = [(ds.splits[ds.labels == c] == 'valid').sum() / ((ds.splits[ds.labels == c] != 'test').sum()) for c in range(len(ds.classes))]
    assert all(0.08 <= f <= 0.25 for f in frac), frac                      # stratified by label, as closely as groups allow
    assert (ds.splits == 'test').sum() == 5 * len(ds.classes)              # the test folder is kept as it is


def test_ungrouped_random_split_would_leak(copies):
    "The check above can fail: a plain random split puts copies of most originals on both sides."
    ds = from_folder(copies, hash_distance=None)
    assert ds.grouping is None
    assert _origins_on_both_sides(ds) > PER_CLASS * len(ds.classes) * 0.3


def test_grouped_assign_without_duplicates_is_the_old_split():
    "Single images (no near-duplicates) are split exactly as before, so data-set versions do not move."
    from biovis.data import _stratified_assign
    y = np.random.default_rng(1).integers(0, 4, 200)
    fr = {'valid': 0.15, 'test': 0.15}
    assert (_stratified_assign(y, fr, 3) == _stratified_assign(y, fr, 3, groups=np.arange(200) * 7)).all()


def _tiny(n=400, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return ImageDataset([f'c{i}' for i in range(k)], y, np.array(['valid'] * n), array=np.zeros((n, 4, 4, 1), np.uint8)), y, rng


def test_saturated_validation_keeps_temperature_one():
    ds, y, rng = _tiny()
    z = rng.normal(0, 1, (len(y), 4)); z[np.arange(len(y)), y] += 6     # every image right, with label-smoothing-like margins
    assert fit_temperature(z, y) < 0.06                                  # unguarded: T collapses to its lower bound
    cal = calibrate(lambda x: z, ds, 'valid')
    assert cal['temperature'] == 1.0 and cal['fitted_on'] is None and cal['note'].startswith('validation saturated'), cal
    card = model_card(dict(name='m', version='v1', classes=ds.classes, arch='cnn_small', input_size=[4, 4], channels=1, calibration=cal))
    assert 'not calibrated (validation saturated' in card


def test_unsaturated_validation_still_fits():
    ds, y, rng = _tiny(seed=1)
    z = rng.normal(0, 1, (len(y), 4)); z[np.arange(len(y)), y] += 1.5; z *= 3   # overconfident, ~80 % right
    cal = calibrate(lambda x: z, ds, 'valid')
    assert cal['fitted_on'] == 'valid' and 1.5 < cal['temperature'] < 6, cal
