"biovis.inference: the Predictor on every input form, and every bad input it must refuse."
import io, struct, zlib

import numpy as np
import pytest
from PIL import Image

from biovis.data import InvalidImageError, MAX_BYTES, write_dicom
from conftest import run_cli


def _png(a, **kw):
    b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG', **kw); return b.getvalue()


def _png_header_only(w, h):
    "A PNG whose header claims w x h pixels, with a tiny (wrong) body: opening must not decode it."
    ihdr = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 10)) + chunk(b'IEND', b'')


@pytest.fixture(scope='module')
def cell(sample_ds):
    return sample_ds.tensors('test')[0][0]


def test_same_answer_for_every_input_form(predictor, cell, tmp_path):
    Image.fromarray(cell).save(tmp_path/'c.png'); Image.fromarray(cell).save(tmp_path/'c.bmp')
    Image.fromarray(cell).save(tmp_path/'c.tif')
    ref = predictor.predict(cell).probs
    for src in (_png(cell), Image.fromarray(cell), tmp_path/'c.png', str(tmp_path/'c.bmp'), tmp_path/'c.tif',
                cell.transpose(2, 0, 1), cell.astype(np.float32) / 255):
        got = predictor.predict(src).probs
        assert max(abs(got[k] - ref[k]) for k in ref) < 1e-3, type(src)


def test_predictor_matches_evaluation(trained, predictor, sample_ds):
    reg, learn, ev = trained
    x, _ = sample_ds.tensors('test')
    assert np.abs(predictor.predict_proba(list(x)) - ev.probs).max() < 1e-4 or ev.tta   # evaluation used TTA
    from biovis.train import predict_proba
    assert np.abs(predictor.predict_proba(list(x)) - predict_proba(learn.model, x, temperature=predictor.temperature)).max() < 1e-4


def test_registered_predictor_serves_calibrated_probabilities(trained, predictor, sample_ds):
    "The Predictor divides the logits by the temperature fitted on valid and kept in the metadata: softmax(logits / T), same argmax."
    import torch
    from biovis.train import predict_logits
    reg, learn, ev = trained
    cal = reg.metadata('blood')['calibration']
    assert cal['fitted_on'] == 'valid' and predictor.temperature == cal['temperature'] != 1
    x, _ = sample_ds.tensors('test')
    z = predict_logits(learn.model, x)
    probs = predictor.predict_proba(list(x))
    assert np.abs(probs - torch.softmax(torch.from_numpy(z) / cal['temperature'], 1).numpy()).max() < 1e-5
    assert np.array_equal(probs.argmax(1), z.argmax(1))
    assert [p.index for p in predictor.predict_batch(list(x[:32]))] == z[:32].argmax(1).tolist()


def test_model_registered_without_calibration_serves_plain_softmax(trained, sample_ds, tmp_path):
    "A version registered before calibration existed (no `calibration` key) loads and serves at T = 1."
    import torch
    from biovis.inference import Predictor
    from biovis.registry import ModelRegistry
    from biovis.train import predict_logits
    reg, learn, _ = trained
    old = ModelRegistry(tmp_path)
    meta = {k: v for k, v in reg.metadata('blood').items() if k not in ('calibration', 'name', 'version', 'created')}
    old.promote('old', old.register('old', learn.model, meta))
    assert 'calibration' not in old.metadata('old')
    p = Predictor.from_registry('old', registry=old, device='cpu')
    assert p.temperature == 1.0
    x, _ = sample_ds.tensors('test')
    ref = torch.softmax(torch.from_numpy(predict_logits(learn.model, x)), 1).numpy()
    assert np.abs(p.predict_proba(list(x)) - ref).max() < 1e-5


def test_prediction_carries_model_version(predictor, cell):
    p = predictor.predict(cell)
    assert p.model == 'blood' and p.version == 'v1' and abs(sum(p.probs.values()) - 1) < 1e-4
    assert p.label == max(p.probs, key=p.probs.get) and p.label in predictor.classes


def test_large_photo_and_grayscale_and_dicom(predictor, tmp_path):
    rng = np.random.default_rng(0)
    assert predictor.predict(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).label in predictor.classes
    assert predictor.predict(rng.integers(0, 255, (50, 70), dtype=np.uint8)).label in predictor.classes
    d = write_dicom(rng.integers(0, 4095, (64, 64)).astype(np.uint16), tmp_path/'x.dcm')
    assert predictor.predict(d).label in predictor.classes
    assert predictor.predict(d.read_bytes()).label in predictor.classes


def test_bccd_smear_photo(predictor):
    from conftest import SHARED_DATA
    p = SHARED_DATA/'bccd'/'BCCD'/'JPEGImages'/'BloodImage_00000.jpg'
    if not p.exists(): pytest.skip('BCCD not beside the project')
    assert predictor.predict(p).label in predictor.classes


def test_modes_with_one_faithful_conversion(predictor, cell):
    # 16-bit grayscale PNG: scaled to 8 bits over the full range
    g16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    from biovis.data import read_image
    a = read_image(_png(g16))
    assert a.dtype == np.uint8 and a.max() == round(g16.max() / 257) and a.min() == 0
    # CMYK JPEG -> RGB
    b = io.BytesIO(); Image.fromarray(cell).convert('CMYK').save(b, 'JPEG', quality=95)
    assert read_image(b.getvalue()).shape == (28, 28, 3)
    assert predictor.predict(b.getvalue()).label in predictor.classes
    # fully opaque alpha is dropped; palette images become RGB
    rgba = np.dstack([cell, np.full(cell.shape[:2], 255, np.uint8)])
    assert (read_image(_png(rgba)) == cell).all()
    assert read_image(Image.fromarray(cell).convert('P')).shape == (28, 28, 3)


BAD = {
    'empty': lambda c: b'',
    'not an image': lambda c: b'%PDF-1.7\n' + b'x' * 200,
    'html': lambda c: b'<html><script>alert(1)</script></html>',
    'truncated png': lambda c: _png(c)[:60],
    'corrupt jpeg': lambda c: (lambda j: j[:200] + b'\0' * 50)(_jpeg(c)),
    'zero-sized array': lambda c: np.zeros((0, 28, 3), np.uint8),
    'absurd dimensions': lambda c: _png_header_only(100000, 3),
    'decompression bomb': lambda c: _png(np.zeros((9000, 9000), np.uint8)),
    'too many bytes': lambda c: b'\x89PNG\r\n\x1a\n' + b'\0' * (MAX_BYTES + 1),
    'real transparency': lambda c: _png(np.dstack([c, np.full(c.shape[:2], 100, np.uint8)])),
    'float mode tiff': lambda c: _tiff_f(c),
    '32-bit int beyond 16 bits': lambda c: Image.fromarray(np.full((8, 8), 2**20, np.int32), 'I'),
    'float array out of range': lambda c: np.full((8, 8), 3.5),
    'nan array': lambda c: np.full((8, 8), np.nan),
    '4-d array': lambda c: np.zeros((2, 8, 8, 3), np.uint8),
    'unsupported type': lambda c: {'image': 'please'},
}

def _jpeg(c):
    b = io.BytesIO(); Image.fromarray(c).resize((200, 200)).save(b, 'JPEG'); return b.getvalue()

def _tiff_f(c):
    b = io.BytesIO(); Image.fromarray(c[..., 0].astype(np.float32) * 1000, 'F').save(b, 'TIFF'); return b.getvalue()


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_raises_one_clear_error(predictor, cell, case):
    src = BAD[case](cell)
    with pytest.raises(InvalidImageError) as e: predictor.predict(src)
    assert len(str(e.value)) > 10


def test_bomb_is_refused_from_the_header_fast(predictor):
    import time
    b = _png_header_only(60000, 60000)
    t = time.perf_counter()
    with pytest.raises(InvalidImageError, match='longest side|Mpx|decompression bomb'): predictor.predict(b)
    assert time.perf_counter() - t < 1.0


def test_bad_item_in_batch_is_named(predictor, cell):
    with pytest.raises(InvalidImageError, match='input 2'): predictor.predict_batch([cell, cell, b'junk'])


def test_cli_predict_good_and_bad_files(trained, cell, tmp_path):
    reg = trained[0]
    Image.fromarray(cell).save(tmp_path/'good.png')
    (tmp_path/'bad.png').write_bytes(b'definitely not a png')
    r = run_cli('--models-dir', reg.root, 'predict', tmp_path/'good.png', '--model', 'blood', '--json', home=tmp_path, check=0)
    import json
    out = json.loads(r.stdout.splitlines()[0])
    assert out['label'] in out['probs'] and out['version'] == 'v1'
    r = run_cli('predict', tmp_path/'good.png', tmp_path/'bad.png', '--model', 'blood', '--models-dir', reg.root, home=tmp_path)
    assert r.returncode == 3 and 'not an image' in r.stderr and 'good.png' in r.stdout
    assert run_cli('predict', tmp_path/'good.png', '--model', 'nosuch', '--models-dir', reg.root, home=tmp_path).returncode == 4


@pytest.mark.parametrize('arch', ['cnn_small', 'resnet18_small'])
def test_batchnorm_folding_keeps_the_outputs(arch):
    import torch
    from biovis.models import create_model
    from biovis.inference import fuse_conv_bn
    torch.manual_seed(0)
    m = create_model(arch, n_classes=5, pretrained=False)
    for mod in m.modules():      # non-trivial statistics, as after training
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1); mod.running_var.uniform_(0.5, 2); mod.weight.data.uniform_(0.5, 1.5)
    m.eval(); f = fuse_conv_bn(m)
    n_bn = lambda mod: sum(isinstance(x, torch.nn.BatchNorm2d) for x in mod.modules())
    assert n_bn(m) > 0 and n_bn(f) < n_bn(m)
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad(): torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-4)
    assert n_bn(m) == sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())   # the original is untouched
