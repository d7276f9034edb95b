"ONNX export of a trained fastai model through the CLI: same probabilities as PyTorch, served by ONNX Runtime."
import shutil

import numpy as np

from conftest import run_cli


def test_onnx_export_gives_torch_probabilities(tmp_path, trained, sample_ds):
    from biovis.registry import ModelRegistry
    from biovis.inference import Predictor
    models = tmp_path/'models'
    shutil.copytree(trained[0].root, models)
    r = run_cli('models', 'export', 'blood', '--onnx', '--out', tmp_path/'blood.onnx', '--models-dir', models, home=tmp_path, check=0)
    assert 'registered as blood-onnx v1' in r.stdout and (tmp_path/'blood.onnx').stat().st_size > 1000
    reg = ModelRegistry(models)
    src, meta = reg.metadata('blood'), reg.metadata('blood-onnx')
    assert meta['backend'] == 'onnx' and meta['weights'] == 'model.onnx' and meta['classes'] == src['classes']
    assert meta['source'] == dict(model='blood', version='v1', weights_sha256=src['weights_sha256'])
    if src.get('drift'): assert (reg.path('blood-onnx')/src['drift']['file']).exists()
    po, pt = Predictor.from_registry('blood-onnx', registry=reg), Predictor.from_registry('blood', registry=reg)
    assert type(po).__name__ == 'OnnxPredictor'
    x, y = sample_ds.tensors('test')
    p_onnx, p_torch = po.predict_proba(list(x)), pt.predict_proba(list(x))
    assert np.abs(p_onnx - p_torch).max() < 1e-4
    assert (p_onnx.argmax(1) == y).mean() > 0.3            # a trained model, not a constant
    (e_onnx, e_torch) = po.features(x[:16], reduce=False)[1], pt.features(x[:16], reduce=False)[1]
    assert e_torch.shape[1] > 0 and po.features(x[:16])[1].shape == pt.features(x[:16])[1].shape   # reduced alike (drift projection)
    np.testing.assert_allclose(e_onnx, e_torch, atol=1e-3)
    import onnxruntime as ort                                # the copied file stands alone
    s = ort.InferenceSession(str(tmp_path/'blood.onnx'), providers=['CPUExecutionProvider'])
    out = s.run(['probs'], {'image': x[:4].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    np.testing.assert_allclose(out, p_torch[:4], atol=1e-4)     # calibrated: the temperature is in the graph


def test_onnx_graph_applies_the_temperature_once(tmp_path, trained, sample_ds):
    "The exported graph computes softmax(logits / T); the OnnxPredictor does not divide again, with or without TTA."
    import torch
    from biovis.registry import ModelRegistry
    from biovis.inference import Predictor
    from biovis.onnx_backend import register_onnx
    from biovis.train import predict_logits
    reg = ModelRegistry(tmp_path/'models'); shutil.copytree(trained[0].root, reg.root)
    dest, v, f = register_onnx('blood', registry=reg)
    src, meta = reg.metadata('blood'), reg.metadata(dest)
    assert src['calibration']['temperature'] != 1 and meta['calibration'] == dict(src['calibration'], in_graph=True)
    x, _ = sample_ds.tensors('test')
    z = predict_logits(trained[1].model, x[:64])
    want = torch.softmax(torch.from_numpy(z) / src['calibration']['temperature'], 1).numpy()
    po = Predictor.from_registry(dest, registry=reg)
    assert po.temperature == 1.0 and np.abs(po.predict_proba(list(x[:64])) - want).max() < 1e-4
    po8, pt8 = Predictor.from_registry(dest, registry=reg, tta=True), Predictor.from_registry('blood', registry=reg, tta=True)
    assert np.abs(po8.predict_proba(list(x[:64])) - pt8.predict_proba(list(x[:64]))).max() < 1e-4


def test_export_needs_a_format_and_a_torch_model(tmp_path, trained):
    models = tmp_path/'models'
    shutil.copytree(trained[0].root, models)
    r = run_cli('models', 'export', 'blood', '--models-dir', models, home=tmp_path, check=2)
    assert '--onnx' in r.stderr
    r = run_cli('models', 'export', 'no-such', '--onnx', '--models-dir', models, home=tmp_path, check=4)
    assert 'no-such' in r.stderr
