"biovis.train and biovis.evaluate: reproducible training, any channels, early stop, checkpoints, held-out metrics."
import numpy as np
import pytest
import torch

from biovis.data import from_npz, ImageDataset
from biovis.train import train, predict_proba, predict_logits, make_dls, fit_temperature, nll, temper, bf16_native
from biovis.evaluate import evaluate, classification_metrics, expected_calibration_error


def test_same_seed_same_weights_other_seed_differs(sample_ds):
    a = train(sample_ds, epochs=1, seed=5, progress=False, precision='fp32').model.state_dict()
    b = train(sample_ds, epochs=1, seed=5, progress=False, precision='fp32').model.state_dict()
    c = train(sample_ds, epochs=1, seed=6, progress=False, precision='fp32').model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.skipif(not bf16_native('cpu'), reason='this CPU has no native bfloat16: precision auto trains in float32 untimed')
def test_bfloat16_training_learns_as_float32_does_and_auto_without_a_budget_is_float32(sample_ds):
    "bfloat16 autocast (native on this CPU): the weights stay float32, a seed reproduces its weights, the arithmetic differs from float32's and the held-out accuracy is as good; 'auto' without a time budget is float32, untimed (a budget's probe is tested in test_data_defaults)."
    a = train(sample_ds, epochs=4, seed=5, progress=False, precision='bf16')
    a2 = train(sample_ds, epochs=4, seed=5, progress=False, precision='bf16')
    b = train(sample_ds, epochs=4, seed=5, progress=False, precision='fp32')
    assert (a.biovis['training']['precision'], b.biovis['training']['precision']) == ('bf16', 'fp32')
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(v.dtype == torch.float32 for v in sa.values() if v.is_floating_point())
    assert all(torch.equal(sa[k], a2.model.state_dict()[k]) for k in sa)
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = evaluate(a, sample_ds, tta=False).metrics['accuracy'], evaluate(b, sample_ds, tta=False).metrics['accuracy']
    assert ea > 0.5 and ea > eb - 0.08, (ea, eb)
    t = train(sample_ds, epochs=1, progress=False).biovis['training']      # auto without a budget: float32, untimed (reproducible under any load)
    assert (t['precision'], t['precision_step_s']) == ('fp32', {}) and 'without a time budget' in t['precision_why']
    with pytest.raises(ValueError, match="precision must be one of \\('auto', 'bf16', 'fp32'\\), not 'fp16'"): train(sample_ds, epochs=1, progress=False, precision='fp16')


def test_learns_the_sample(trained):
    "Eight epochs on 960 images: far above chance (1/8) on the held-out test split."
    _, learn, ev = trained
    assert ev.split == 'test' and ev.metrics['accuracy'] > 0.6 and ev.metrics['auc'] > 0.85


def test_grayscale_two_class_npz(tmp_path):
    rng = np.random.default_rng(0); out = {}
    for s, n in (('train', 80), ('val', 20), ('test', 40)):
        y = np.arange(n) % 2
        x = np.clip(rng.normal(60 + 120 * y[:, None, None], 25, (n, 28, 28)), 0, 255).astype(np.uint8)
        out[f'{s}_images'], out[f'{s}_labels'] = x, y[:, None]
    np.savez(tmp_path/'toy.npz', **out)
    ds = from_npz(tmp_path/'toy.npz')
    learn = train(ds, epochs=3, progress=False, augment=False)
    assert learn.biovis['channels'] == 1
    assert evaluate(learn, ds).metrics['accuracy'] > 0.9


def test_early_stop_and_checkpoint_keep_the_epoch_they_say(sample_ds, tmp_path):
    learn = train(sample_ds, epochs=30, lr=1e-6, patience=1, progress=False, checkpoint_dir=tmp_path)
    tr = learn.biovis['training']
    assert tr['epochs_run'] < 30          # nothing to gain at lr 1e-6: stops early
    assert (tmp_path/'best.pth').exists()
    vals = [v[2] for v in learn.recorder.values]
    x, y = sample_ds.tensors('valid')
    acc = (predict_proba(learn.model, x).argmax(1) == y).mean()
    # the weights in the model are those of the epoch the metadata says it kept (the best only when it is better by more than chance)
    assert abs(acc - vals[tr['epoch_kept']]) < 1e-6, (acc, vals, tr['epoch_kept_why'])
    assert tr['epoch_kept'] == len(vals) - 1 or vals[tr['epoch_kept']] == max(vals)


def test_train_plus_valid_refuses_evaluation_on_valid(sample_ds):
    learn = train(sample_ds, epochs=1, progress=False, train_splits=('train', 'valid'))
    assert learn.biovis['dataset']['n_train'] == 1200
    with pytest.raises(ValueError, match='trained on it'): evaluate(learn, sample_ds, split='valid')
    cal = learn.biovis['calibration']            # nothing held out to fit a temperature on: T = 1, and why
    assert cal['temperature'] == 1.0 and cal['fitted_on'] is None and 'trained on' in cal['note']
    assert evaluate(learn, sample_ds).metrics['temperature'] == 1.0


def test_fit_temperature_is_the_nll_minimum():
    "On logits whose labels were drawn at temperature 1/2, the fit finds about 1/2, no grid point does better, and it is deterministic."
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 6))
    p = torch.softmax(torch.from_numpy(z * 2), 1).numpy()
    y = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    t = fit_temperature(z, y)
    assert abs(t - 0.5) < 0.05 and t == fit_temperature(z, y)
    assert min(nll(z, y, g) for g in np.geomspace(0.1, 10, 400)) >= nll(z, y, t) - 1e-9
    assert np.abs(temper(torch.softmax(torch.from_numpy(z), 1).numpy(), t) - torch.softmax(torch.from_numpy(z / t), 1).numpy()).max() < 1e-9


def test_temperature_scaling_calibrates_label_smoothing(sample_ds):
    "Label smoothing leaves the probabilities unsure; T fitted on valid lowers the NLL there and the ECE on test, and changes no prediction."
    learn = train(sample_ds, epochs=5, seed=0, label_smoothing=0.2, progress=False)
    cal = learn.biovis['calibration']
    xv, yv = sample_ds.tensors('valid')
    assert cal['fitted_on'] == 'valid' and cal['n'] == len(yv) and 0 < cal['temperature'] < 1     # sharpens
    zv = predict_logits(learn.model, xv)
    pv1, pvT = predict_proba(learn.model, xv), predict_proba(learn.model, xv, temperature=cal['temperature'])
    nll_of = lambda p: -np.log(p[np.arange(len(yv)), yv]).mean()
    assert nll_of(pvT) < nll_of(pv1) and abs(nll_of(pvT) - nll(zv, yv, cal['temperature'])) < 1e-4
    ev, raw = evaluate(learn, sample_ds), evaluate(learn, sample_ds, temperature=1)
    e0, e1 = expected_calibration_error(raw.y_true, raw.probs), expected_calibration_error(ev.y_true, ev.probs)
    print(f"test split: T = {cal['temperature']:.3f}, ECE {e0:.4f} -> {e1:.4f}, NLL {raw.metrics['nll']:.4f} -> {ev.metrics['nll']:.4f}")
    assert e1 < e0 and abs(ev.metrics['ece_uncalibrated'] - e0) < 1e-6 and abs(ev.metrics['ece'] - e1) < 1e-6
    assert np.array_equal(ev.probs.argmax(1), raw.probs.argmax(1)) and ev.metrics['accuracy'] == raw.metrics['accuracy']
    assert np.array_equal(ev.probs.argmax(1), predict_logits(learn.model, sample_ds.tensors('test')[0]).argmax(1))


def test_prediction_is_deterministic_eval_mode(sample_ds):
    learn = train(sample_ds, epochs=1, progress=False)
    x, _ = sample_ds.tensors('test')
    assert np.array_equal(predict_proba(learn.model, x[:16]), predict_proba(learn.model, x[:16]))


def test_tta_is_rotation_invariant(trained, sample_ds):
    _, learn, _ = trained
    x, _ = sample_ds.tensors('test')
    p = predict_proba(learn.model, x[:32], tta=True)
    q = predict_proba(learn.model, np.ascontiguousarray(np.rot90(x[:32], 1, (1, 2))), tta=True)
    assert np.abs(p - q).max() < 1e-4


def test_metrics_against_sklearn_and_by_hand():
    from sklearn.metrics import roc_auc_score, f1_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500); logits = rng.normal(size=(500, 4)); logits[np.arange(500), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, p, list('abcd'))
    assert abs(m['auc'] - roc_auc_score(y, p, multi_class='ovr', average='macro')) < 1e-9
    assert abs(m['macro_f1'] - f1_score(y, p.argmax(1), average='macro')) < 1e-9
    assert m['confusion'].sum() == 500
    perfect = np.eye(4)[y]
    assert expected_calibration_error(y, perfect) == 0
    assert abs(expected_calibration_error(y, np.full((500, 4), 0.25)) - abs((y == 0).mean() - 0.25)) < 1e-9


def test_efficientnet_lite0_transfer_keeps_imagenet_weights_and_stats(sample_ds):
    "Transfer learning at 64 px: starts from the offline ImageNet weights, keeps ImageNet normalisation."
    import timm
    from biovis.models import IMAGENET_MEAN, load_lite0_imagenet
    small = type(sample_ds)(sample_ds.classes, sample_ds.labels[:400], sample_ds.splits[:400].copy(), array=sample_ds.array[:400],
                            name='tiny')
    small.splits[:] = np.where(np.arange(400) % 5 == 0, 'valid', np.where(np.arange(400) % 5 == 1, 'test', 'train'))
    learn = train(small, arch='efficientnet_lite0', size=64, epochs=1, lr=1e-3, progress=False)
    assert learn.biovis['input_size'] == [64, 64] and learn.biovis['training']['pretrained'] is True
    norm = learn.model[0]
    assert torch.allclose(norm.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    ref = load_lite0_imagenet(timm.create_model('efficientnet_lite0'))
    # one epoch at a low rate moves the stem a little, not away from ImageNet
    w, w0 = learn.model[1].conv_stem.weight.detach().cpu(), ref.conv_stem.weight
    assert (w - w0).norm() / w0.norm() < 0.2
    assert evaluate(learn, small).metrics['n'] == 80
