"biovis data audit: label issues found by out-of-fold probabilities + cleanlab, and images in two splits, on the real sample."
import dataclasses, json

import numpy as np
import pytest

from conftest import run_cli
from biovis.audit import label_issues, near_duplicates, out_of_fold_probs


@pytest.fixture(scope='module')
def noisy(sample_ds):
    "The shipped sample with 80 labels (5 %) flipped to another class at known places, and 3 train images copied into the test split."
    rng = np.random.default_rng(0)
    flip = rng.choice(len(sample_ds), 80, replace=False)
    lab = sample_ds.labels.copy()
    for i in flip: lab[i] = (lab[i] + 1 + rng.integers(len(sample_ds.classes) - 1)) % len(sample_ds.classes)
    arr = sample_ds.array.copy()
    tr, te = np.flatnonzero(sample_ds.splits == 'train')[:3], np.flatnonzero(sample_ds.splits == 'test')[-3:]
    arr[te] = arr[tr]
    return dataclasses.replace(sample_ds, labels=lab, array=arr, name='noisy', _hashes=None), set(flip.tolist()), set(zip(tr.tolist(), te.tolist()))


def test_flipped_labels_are_found_far_above_chance(noisy):
    ds, flipped, _ = noisy
    idx, probs, fold = out_of_fold_probs(ds, k=2, epochs=4, progress=False)
    assert len(idx) == len(ds) and probs.shape == (len(ds), len(ds.classes)) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert set(np.bincount(fold)) <= {len(ds) // 2, len(ds) // 2 + 1, len(ds) // 2 - 1} or abs(np.bincount(fold)[0] - len(ds) / 2) < 20
    issues = label_issues(ds, idx, probs)
    ranked = issues['index'].tolist()
    chance = len(flipped) / len(ds)                                   # 0.053: a random ranking's precision
    p40 = len(set(ranked[:40]) & flipped) / 40
    recall = len(set(ranked) & flipped) / len(flipped)
    print(f'out-of-fold accuracy {(probs.argmax(1) == ds.labels[idx]).mean():.3f}; flagged {len(ranked)}; '
          f'precision of the top 40 {p40:.2f} (chance {chance:.3f}); recall {recall:.2f}')
    assert p40 >= 8 * chance and recall >= 0.5
    top = issues.iloc[0]                                              # the most suspicious: its given label is improbable
    assert top['p_given'] < 0.2 and top['suggested'] != top['given']


def test_cross_split_copies_are_found_and_nothing_else(noisy, sample_ds):
    ds, _, copies = noisy
    d = near_duplicates(ds)
    exact = {(int(r.a), int(r.b)) for r in d.itertuples() if r.exact}
    assert copies <= exact and all(r.split_a != r.split_b for r in d.itertuples())
    assert len(near_duplicates(sample_ds)) == 0                       # the sample as shipped has none at distance 0


def test_cli_writes_the_report(tmp_path):
    r = run_cli('data', 'audit', 'sample', '--folds', '2', '--epochs', '1', '--out', tmp_path/'audit', home=tmp_path, check=0)
    assert 'likely label issues' in r.stdout
    res = json.loads((tmp_path/'audit'/'bloodmnist_sample.json').read_text())
    assert res['images'] == 1520 and res['folds'] == 2 and len(res['issues']) == res['label_issues']
    html = (tmp_path/'audit'/'bloodmnist_sample.html').read_text()
    assert html.count('data:image/png;base64,') >= min(res['label_issues'], 50)
    md = (tmp_path/'audit'/'bloodmnist_sample.md').read_text()
    assert md.startswith('# Audit of bloodmnist_sample') and 'fold models are weak' in md         # one epoch: it says so
    assert 'fold models are weak' in r.stdout
