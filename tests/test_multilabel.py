"Multi-label findings (issue 15, model side): data formats and detection, mosaics, metrics, training, thresholds, registry and CLI."
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

from biovis.core import sample_path
from biovis.data import from_npz as single_npz
from biovis.policy import medmnist_table, medmnist_classes
from biovis.registry import ModelRegistry
from biovis.multilabel import (MultiLabelDataset, from_npz, from_csv, is_multilabel, bloodmnist_mosaics, write_multilabel_npz,
                               label_text, multilabel_metrics, train_and_register_multilabel, MultiLabelPredictor, evaluate_multilabel)

CHEST_NAMES = medmnist_classes(dict(medmnist_table()['chestmnist']))


@pytest.fixture(scope='module')
def chest(tmp_path_factory):
    "A small synthetic file in ChestMNIST's exact format (14 columns, 28x28 grayscale uint8), named chestmnist.npz."
    return write_multilabel_npz(tmp_path_factory.mktemp('chest')/'chestmnist.npz', n={'train': 40, 'val': 16, 'test': 16})


@pytest.fixture(scope='module')
def trained(chest, tmp_path_factory):
    "One epoch on the ChestMNIST-format file with positive weights (negatives / positives per finding), registered: (registry, evaluation, version)."
    reg = ModelRegistry(tmp_path_factory.mktemp('models'))
    _, ev, v = train_and_register_multilabel(from_npz(chest), 'chest', epochs=1, bs=16, registry=reg, progress=False, pos_weight='balanced')
    return reg, ev, v


def test_chestmnist_format_loads_with_its_names_and_no_code_change(chest):
    with np.load(chest) as z:
        assert z['train_images'].shape == (40, 28, 28) and z['train_images'].dtype == np.uint8 and z['train_labels'].shape == (40, 14)
    ds = from_npz(chest)
    assert ds.classes == CHEST_NAMES and 'edema' in ds.classes and ds.modality == 'xray'
    assert {s: int((ds.splits == s).sum()) for s in ('train', 'valid', 'test')} == {'train': 40, 'valid': 16, 'test': 16}
    x, y = ds.tensors('train')
    assert tuple(x.shape) == (40, 1, 28, 28) and tuple(y.shape) == (40, 14) and str(y.dtype) == 'torch.float32'


def test_detection(chest, tmp_path):
    assert is_multilabel(chest) and is_multilabel('chestmnist') and is_multilabel('bloodmnist_mosaics')
    assert not is_multilabel(sample_path()) and not is_multilabel('bloodmnist') and not is_multilabel(tmp_path/'missing.npz')
    np.savez(tmp_path/'onehot.npz', train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.eye(3, dtype=np.uint8))
    assert not is_multilabel(tmp_path/'onehot.npz')                # one-hot rows are single-label
    (tmp_path/'single.csv').write_text('path,label\na.png,x\n'); (tmp_path/'multi.csv').write_text('path,labels\na.png,x|y\n')
    assert is_multilabel(tmp_path/'multi.csv') and not is_multilabel(tmp_path/'single.csv')


def test_csv_with_pipe_separated_labels(tmp_path):
    rows = [('a.png', 'edema|effusion', 'train'), ('b.png', '', 'train'), ('c.png', 'mass', 'val'), ('d.png', 'no finding', 'test'),
            ('e.png', 'effusion | mass', 'test')]
    for f, _, _ in rows: Image.fromarray(np.full((12, 12), 9, np.uint8)).save(tmp_path/f)
    (tmp_path/'list.csv').write_text('image,labels,split\n' + ''.join(f'{f},{l},{s}\n' for f, l, s in rows))
    ds = from_csv(tmp_path/'list.csv')
    assert ds.classes == ['edema', 'effusion', 'mass'] and list(ds.splits) == ['train', 'train', 'valid', 'test', 'test']
    assert [label_text(r, ds.classes) for r in ds.labels] == ['edema|effusion', 'no finding', 'mass', 'no finding', 'effusion|mass']
    (tmp_path/'bad.csv').write_text('path,labels\na.png,edema\nzz.png,mass\n')
    with pytest.raises(ValueError, match='do not exist'): from_csv(tmp_path/'bad.csv')


def test_mosaics_are_the_set_of_their_cells_and_keep_the_official_splits():
    cells = single_npz(sample_path())
    ds = bloodmnist_mosaics(sample_path(), n={'train': 120, 'valid': 40, 'test': 40}, seed=3)
    assert ds.native_size == (56, 56) and ds.tiles.shape == (200, 4) and ds.modality == 'microscopy'
    for i in range(len(ds)):
        t = ds.tiles[i]
        assert set(np.flatnonzero(ds.labels[i])) == set(cells.labels[t].tolist())
        assert set(cells.splits[t]) == {ds.splits[i]}              # train mosaics from train cells only, and so on
    for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # the pixels are those cells, in reading order
        assert (ds.array[7, 28 * r:28 * r + 28, 28 * c:28 * c + 28] == cells.array[ds.tiles[7, q]]).all()
    assert bloodmnist_mosaics(sample_path(), n={'train': 120, 'valid': 40, 'test': 40}, seed=3).version == ds.version


def test_metrics_by_hand_and_undefined_findings():
    y = np.array([[1, 1], [1, 0], [0, 0], [0, 0]]); p = np.array([[0.9, 0.4], [0.8, 0.6], [0.2, 0.3], [0.1, 0.1]])
    m = multilabel_metrics(y, p, [0.5, 0.5], ['a', 'b'])
    # a: ranked perfectly (AUC 1, AP 1); b: one positive, ranked 2nd of 4 (AUC 2/3, AP 1/2); 2 of 8 decisions wrong; images 3, 4 wholly right
    assert m['macro_auc'] == pytest.approx(5 / 6) and m['map'] == pytest.approx(0.75)
    assert m['hamming_loss'] == 0.25 and m['subset_accuracy'] == 0.5
    b = m['per_finding'][1]
    assert (b['sensitivity'], b['specificity']) == (0.0, pytest.approx(2 / 3))
    u = multilabel_metrics(np.array([[1, 0], [0, 0]]), np.array([[0.9, 0.2], [0.1, 0.6]]), 0.5, ['a', 'b'])
    assert u['undefined'] == ['b'] and u['per_finding'][1]['auc'] is None and u['macro_auc'] == 1.0


def test_train_register_and_thresholds_used_by_predict(trained, chest):
    reg, ev, v = trained
    meta = reg.metadata('chest', v)
    assert (meta['task'], meta['backend'], meta['classes']) == ('multilabel', 'fastai', CHEST_NAMES)
    assert set(meta['thresholds']) == set(CHEST_NAMES) and 'F1-optimal' in meta['threshold_rule']
    assert set(meta['calibration']['temperatures']) == set(CHEST_NAMES) and meta['calibration']['fitted_on'] == 'valid'
    assert {'macro_auc', 'micro_auc', 'map', 'subset_accuracy', 'hamming_loss', 'dataset_version'} <= set(meta['metrics'])
    assert len(meta['per_finding']) == 14 and reg.aliases('chest')['production'] == v
    y = from_npz(chest).labels[:40]                                 # the training split
    pw = meta['training']['pos_weight']
    assert pw['edema'] == pytest.approx(min((40 - y[:, 9].sum()) / max(y[:, 9].sum(), 1), 10))
    p = MultiLabelPredictor.from_registry('chest', registry=reg, device='cpu')
    assert p.thresholds == meta['thresholds']
    ds = from_npz(chest)
    for i in ds.idxs('test')[:6]:
        r = p.predict(ds.image(i))
        assert set(r.findings) == {c for c in p.classes if r.probs[c] >= r.thresholds[c]}
        assert r.label == ('|'.join(c for c in p.classes if c in r.findings) or 'no finding')
        d = r.to_dict()
        assert d['task'] == 'multilabel' and [f['name'] for f in d['findings']] == CHEST_NAMES
    low = MultiLabelPredictor(p.model, dict(p.meta, thresholds={c: 0.0 for c in p.classes}), device='cpu')
    assert low.predict(ds.image(0)).findings and len(low.predict(ds.image(0)).findings) == 14    # the stored thresholds decide
    e2 = evaluate_multilabel(p, ds.subset(ds.idxs('test')[:4].tolist() + ds.idxs('train')[:2].tolist(),
                                          np.array(['test'] * 4 + ['train'] * 2, dtype=object)), 'test')
    assert len(e2.metrics['per_finding']) == 14        # a finding with one class in four images is undefined, not an error
    with pytest.raises(ValueError, match='trained on'): evaluate_multilabel(p, ds, 'train')


def test_cli_trains_a_multilabel_model_and_predict_prints_findings(chest, tmp_path):
    r = run_cli('train', '--data', chest, '--epochs', '1', '--bs', '16', '-q', '--models-dir', tmp_path/'m', home=tmp_path, check=0)
    assert 'test macro AUC' in r.stdout and 'edema' in r.stdout
    meta = ModelRegistry(tmp_path/'m').metadata('chestmnist')
    assert meta['task'] == 'multilabel' and meta['classes'] == CHEST_NAMES
    with np.load(chest) as z: Image.fromarray(z['test_images'][0]).save(tmp_path/'x.png')
    r = run_cli('predict', tmp_path/'x.png', '--model', 'chestmnist', '--json', '--models-dir', tmp_path/'m', home=tmp_path, check=0)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d['task'] == 'multilabel' and len(d['findings']) == 14
    assert d['present'] == [f['name'] for f in d['findings'] if f['probability'] >= f['threshold']]
