"""The Keras backend for real: a tiny Keras model trained on the sample, saved as .h5 and .keras, imported through the CLI,
served by `biovis serve` next to a fastai model and its ONNX export; TensorFlow kept out of the torch paths."""
import shutil, subprocess, sys

import httpx
import numpy as np
import pytest

from conftest import ROOT, run_cli
from test_serve import Server, _png, cells  # noqa: F401  (cells: a fixture of sample PNGs)


def test_torch_paths_do_not_import_tensorflow():
    code = ("import sys, biovis.serve, biovis.inference, biovis.cli, biovis.registry, biovis.workflow\n"
            "from biovis.cli import build_parser; build_parser()\n"
            "bad = [m for m in ('tensorflow', 'keras', 'onnxruntime', 'onnx') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, f'imported by the torch paths: {r.stdout} {r.stderr[-2000:]}'


@pytest.fixture(scope='module')
def keras_files(tmp_path_factory, sample_ds):
    "A small Keras CNN trained for 1 epoch on 300 sample images, saved as .h5 and .keras; with its test probabilities."
    from biovis.data import ImageDataset
    from biovis.keras_backend import keras_predict_proba
    from biovis.keras_train import train_keras
    ds = sample_ds
    keep = np.concatenate([ds.idxs('train')[:300], ds.idxs('valid')])
    small = ImageDataset(ds.classes, ds.labels[keep], ds.splits[keep], array=ds.array[keep], name='sample300')
    model, meta = train_keras(small, 'cnn_small', epochs=1, width=8)
    d = tmp_path_factory.mktemp('keras')
    model.save(str(d/'blood.h5')); model.save(str(d/'blood.keras'))
    x, y = ds.tensors('test')
    return d, list(ds.classes), x[:24], keras_predict_proba(model, x[:24])


def _imported(tmp_path, trained, keras_files):
    d, classes, x, probs = keras_files
    models = tmp_path/'models'
    shutil.copytree(trained[0].root, models)            # the fastai model 'blood', untouched in the shared registry
    for suffix in ('h5', 'keras'):
        r = run_cli('models', 'import', d/f'blood.{suffix}', '--name', f'blood-{suffix}', '--classes', ','.join(classes),
                    '--input-size', 28, '--preprocess', 'scale', '--description', 'test import', '--models-dir', models,
                    home=tmp_path, check=0)
        assert f'blood-{suffix} v1' in r.stdout and 'production' in r.stdout
    return models


def test_import_through_cli_and_predict(tmp_path, trained, keras_files):
    from biovis.registry import ModelRegistry
    from biovis.inference import Predictor
    d, classes, x, probs = keras_files
    models = _imported(tmp_path, trained, keras_files)
    reg = ModelRegistry(models)
    for suffix in ('h5', 'keras'):
        meta = reg.metadata(f'blood-{suffix}')
        assert (meta['backend'], meta['weights'], meta['classes'], meta['input_size'], meta['channels']) == \
               ('keras', f'model.{suffix}', classes, [28, 28], 3)
        assert meta['source']['imported'] and len(meta['weights_sha256']) == 64
        assert 'imported Keras model' in (reg.path(f'blood-{suffix}')/'MODEL_CARD.md').read_text()
        p = Predictor.from_registry(f'blood-{suffix}', registry=reg)
        assert type(p).__name__ == 'KerasPredictor' and p.classes == classes and p.size == (28, 28)
        np.testing.assert_allclose(p.predict_proba(list(x)), probs, atol=1e-5)
        got = p.predict_batch([_png(a) for a in x[:4]])          # PNG bytes, as uploads come
        assert [g.index for g in got] == list(probs[:4].argmax(1)) and got[0].model == f'blood-{suffix}'
        pr, emb = p.features(x[:5], reduce=False)
        assert pr.shape == (5, len(classes)) and emb.shape[0] == 5 and emb.shape[1] > 0
        heat, img, pred = p.explain(_png(x[0]))
        assert heat.shape == (28, 28) and 0 <= heat.min() <= heat.max() <= 1 and pred.index == int(probs[0].argmax())
    r = run_cli('models', 'list', '--models-dir', models, home=tmp_path, check=0)
    assert 'blood-h5' in r.stdout and 'keras:cnn_small' in r.stdout


def test_mismatched_or_broken_model_is_refused(tmp_path, keras_files):
    from biovis.registry import ModelRegistry
    d, classes, x, probs = keras_files
    models = tmp_path/'models'
    r = run_cli('models', 'import', d/'blood.h5', '--name', 'wrong', '--classes', 'a,b,c', '--input-size', 28,
                '--models-dir', models, home=tmp_path, check=3)
    assert 'outputs 8 scores per image but 3 classes were given' in r.stderr and 'Traceback' not in r.stderr
    from biovis.keras_backend import import_keras_model, KerasImportError
    reg = ModelRegistry(models)
    with pytest.raises(KerasImportError, match='takes 28x28 images'): import_keras_model(d/'blood.h5', 'wrong', classes, 64, registry=reg)
    with pytest.raises(KerasImportError, match='distinct'): import_keras_model(d/'blood.h5', 'wrong', classes[:7] + classes[:1], registry=reg)
    (tmp_path/'junk.h5').write_bytes(b'not an HDF5 file at all')
    with pytest.raises(KerasImportError, match='cannot load as a Keras model'): import_keras_model(tmp_path/'junk.h5', 'wrong', classes, registry=reg)
    assert reg.names() == [] and not list(models.glob('*/.staging-*'))   # nothing registered, nothing left


def test_keras_and_fastai_served_side_by_side(tmp_path, trained, keras_files, cells):
    d, classes, x, probs = keras_files
    models = _imported(tmp_path, trained, keras_files)
    run_cli('models', 'export', 'blood', '--onnx', '--models-dir', models, home=tmp_path, check=0)
    s = Server(tmp_path, models, args=('--model', 'blood', '--model', 'blood-keras', '--model', 'blood-h5', '--model', 'blood-onnx'))
    try:
        c = httpx.Client(base_url=s.url, timeout=60)
        assert c.get('/ping').json()['models'] == {'blood': 'v1', 'blood-keras': 'v1', 'blood-h5': 'v1', 'blood-onnx': 'v1'}
        png = _png(x[0])
        out = {}
        for m in ('blood', 'blood-keras', 'blood-h5', 'blood-onnx'):
            r = c.post('/predict', files=[('files', ('cell.png', png, 'image/png'))], data={'model': m})
            assert r.status_code == 200, r.text
            p = r.json()['predictions'][0]
            assert p['model'] == m and abs(sum(p['probs'].values()) - 1) < 1e-4
            out[m] = np.array([p['probs'][k] for k in classes])
        np.testing.assert_allclose(out['blood-keras'], probs[0], atol=1e-4)
        np.testing.assert_allclose(out['blood-h5'], probs[0], atol=1e-4)
        np.testing.assert_allclose(out['blood-onnx'], out['blood'], atol=1e-4)
        # concurrent uploads to the Keras model go through the micro-batcher; feedback on a Keras prediction is stored
        pngs = [png for png, _ in cells[:6]]
        r = c.post('/predict', files=[('files', (f'c{i}.png', b, 'image/png')) for i, b in enumerate(pngs)], data={'model': 'blood-keras'})
        assert r.status_code == 200 and len(r.json()['predictions']) == 6
        pid = r.json()['predictions'][0]['id']
        r = c.post('/feedback', json=dict(prediction_id=pid, label=classes[1]))
        assert r.status_code == 200 and r.json()['status'] == 'saved'
        r = c.post('/predict', files=[('files', ('cell.png', png, 'image/png'))], data={'model': 'no-such-model'})
        assert r.status_code == 404
    finally:
        s.stop()


def test_train_keras_through_cli(home):
    r = run_cli('train', '--backend', 'keras', '--data', 'sample', '--epochs', '1', '--name', 'kcnn', '--no-tta', '-q', home=home, check=0)
    assert 'kcnn v1: test accuracy' in r.stdout
    from biovis.registry import ModelRegistry
    meta = ModelRegistry(home/'models').metadata('kcnn', 'latest')
    assert meta['backend'] == 'keras' and meta['arch'] == 'keras_cnn_small' and meta['metrics']['n'] == 320
    assert meta['dataset']['train_splits'] == ['train'] and 0 <= meta['metrics']['accuracy'] <= 1
    # prediction sets as for fastai models: calibrated on valid, measured on test, served with refer
    assert meta['conformal']['fitted_on'] == 'valid' and len(meta['conformal']['thresholds']['plain']['0.9']) == len(meta['classes'])
    assert 0 < meta['metrics']['conformal_coverage_90'] <= 1
    from biovis.kinds import load_predictor
    from biovis.data import load_dataset
    p = load_predictor('kcnn', 'latest', registry=ModelRegistry(home/'models')).predict(_png(load_dataset('sample').tensors('test')[0][0]))
    assert p.set is not None and p.refer == (p.set != [p.label] or bool(p.ood))
    r = run_cli('evaluate', 'kcnn', '--data', 'sample', '--json', home/'ev.json', home=home, check=0)
    import json
    assert '(keras)' in r.stdout and abs(json.loads((home/'ev.json').read_text())['accuracy'] - meta['metrics']['accuracy']) < 1e-6


def test_torchvision_models_load_after_a_keras_model(tmp_path):
    "A server that loaded a Keras model must still be able to load a ResNet (torchvision) model afterwards."
    import subprocess, sys
    code = ('from biovis.keras_backend import _tf; _tf()\n'
            'from biovis.models import create_model; create_model("resnet18_small", 3, pretrained=False)\n'
            'print("loaded")')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'loaded' in r.stdout, (r.returncode, r.stderr[-2000:])


def test_keras_follows_the_data_policy(keras_files):
    "Issue 14: the Keras trainer and predictor use the data's policy, not always the 8 dihedral views: no mirror image of a chest X-ray."
    from dataclasses import replace
    from biovis.keras_backend import _tf, KerasPredictor, load_keras_model
    from biovis.keras_train import _augmenter
    from biovis.policy import policy_for
    tf, keras = _tf()
    x = tf.constant(np.random.default_rng(0).random((16, 12, 12, 1)), tf.float32)     # no image equals its mirror or a turn
    mirrored = lambda a, b: bool(np.any([np.allclose(a[i], b[i][:, ::-1]) for i in range(len(a))]))
    geometric_only = dict(rotate=0.0, shift=0, jitter=0.0, scale=0.0)
    xray = _augmenter(tf, keras, replace(policy_for('xray'), **geometric_only), (12, 12))
    assert all(np.allclose(xray(x).numpy(), x.numpy()) for _ in range(5))      # nothing an X-ray's label cannot survive
    zoom = _augmenter(tf, keras, replace(policy_for('xray'), rotate=0.0, shift=0, jitter=0.0), (12, 12))     # X-ray zooms +-15 %
    assert not all(np.allclose(zoom(x).numpy(), x.numpy()) for _ in range(5)) and not any(mirrored(zoom(x).numpy(), x.numpy()) for _ in range(5))
    cells = _augmenter(tf, keras, replace(policy_for('microscopy'), **geometric_only), (12, 12))
    assert not all(np.allclose(cells(x).numpy(), x.numpy()) for _ in range(5))
    assert any(mirrored(cells(x).numpy(), x.numpy()) for _ in range(5))      # cells: mirrors and quarter turns
    d, classes, xs, _ = keras_files
    meta = dict(classes=classes, input_size=[28, 28], channels=3, arch='keras_cnn_small', name='k', version='v1')
    model = load_keras_model(d/'blood.keras')
    assert len(KerasPredictor(model, dict(meta, policy=policy_for('xray').to_dict()), tta=True).views) == 1
    assert len(KerasPredictor(model, dict(meta, policy=policy_for('microscopy').to_dict()), tta=True).views) == 8
    assert len(KerasPredictor(model, meta, tta=True).views) == 8         # a model from before policies: as it was trained
