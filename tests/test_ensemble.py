"""An ensemble (issue 14): a time budget that fits several short runs trains several models and averages their probabilities;
the registry, the Predictor, Grad-CAM, the drift reference and the ONNX export take it as they take one model."""
import numpy as np
import pytest
import torch

from conftest import run_cli


def test_ensemble_plan_splits_a_long_budget():
    from biovis.workflow import ensemble_plan, MEMBER_EPOCHS, MAX_MEMBERS, MAX_BUDGET_EPOCHS
    plan = dict(fit=110, fit_s=540.0, epoch_s=4.9)                     # PneumoniaMNIST's 600 s: 110 epochs fit
    e = ensemble_plan(plan)
    assert (e['members'], e['member_s'], e['epochs']) == (110 // MEMBER_EPOCHS, 135.0, 27)
    assert 'an ensemble' in e['why'] and '4 models of 27 epochs' in e['why']
    blood = ensemble_plan(dict(fit=36, fit_s=540.0, epoch_s=15.0))     # BloodMNIST's 600 s: one model of 36 epochs, as before
    assert (blood['members'], blood['epochs'], blood['why']) == (1, 36, 'one model')
    assert ensemble_plan(plan, max_epochs=40)['members'] == 1          # --epochs bounds the epochs in all
    two = ensemble_plan(plan, members=2)                               # --members, asked
    assert (two['members'], two['epochs']) == (2, 55) and 'asked' in two['why']
    huge = ensemble_plan(dict(fit=10 ** 6, fit_s=1e6, epoch_s=1.0))
    assert (huge['members'], huge['epochs']) == (MAX_MEMBERS, MAX_BUDGET_EPOCHS)
    with pytest.raises(ValueError, match='at least 1'): ensemble_plan(plan, members=-1)


def test_an_ensemble_trains_registers_serves_explains_and_exports(tmp_path, sample_ds):
    "`biovis train --members 2`: two models from seeds 42 and 43 in one registered version; the Predictor's probabilities are the temperature-scaled mean of the members', Grad-CAM and the ONNX export work on it."
    from biovis.registry import ModelRegistry
    from biovis.inference import Predictor
    from biovis.models import Ensemble, predict_proba, temper
    r = run_cli('train', '--data', 'sample', '--name', 'ens', '--members', '2', '--epochs', '2', '--no-tta', '-q', home=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reg = ModelRegistry(tmp_path/'models')
    meta = reg.metadata('ens', 'v1')
    e = meta['training']['ensemble']
    assert meta['members'] == 2 and e['seeds'] == [42, 43] and [m['seed'] for m in e['members_fit']] == [42, 43]
    assert all(m['epochs_run'] == 2 for m in e['members_fit']) and 0 < e['valid_accuracy'] <= 1
    assert meta['training']['best_valid_accuracy'] == e['valid_accuracy'] and meta['training']['epoch_kept_why'].startswith('2 members')
    card = (reg.path('ens', 'v1')/'MODEL_CARD.md').read_text()
    assert '- **Architecture**: `cnn_small` x 2 (an ensemble' in card and '- **Epoch kept**: 2 members, each its own: seed 42: ' in card
    p = Predictor.from_registry('ens', registry=reg)
    assert isinstance(p.model, Ensemble) and len(p.model.members) == 2
    x, y = sample_ds.tensors('test')
    probs = p.predict_proba(list(x))
    assert (probs.argmax(1) == y).mean() > 0.3                          # a trained model, not a constant
    state, _ = reg.load_state_dict('ens', 'v1')
    from biovis.models import create_model
    members = []
    for i in range(2):                                                  # each member rebuilt alone from its part of the state dict
        m = create_model('cnn_small', len(meta['classes']), 3, pretrained=False)
        m.load_state_dict({k.split('.', 2)[2]: v for k, v in state.items() if k.startswith(f'members.{i}.')})
        members.append(predict_proba(m.eval(), x))
    assert np.abs(members[0] - members[1]).max() > 1e-3                 # two different models
    np.testing.assert_allclose(probs, temper(np.mean(members, 0), p.temperature), atol=1e-4)
    heat, img, pred = p.explain(x[0])
    assert heat.shape == img.shape[:2] and 0 <= heat.min() and 0.5 < heat.max() <= 1           # the members' mean map, resized
    assert pred.label in meta['classes']
    assert meta['drift']['file']                                        # a drift reference, on the last member's embedding
    pf, emb = p.features(x[:4])
    np.testing.assert_allclose(pf, probs[:4], atol=1e-5)
    assert emb.shape[0] == 4 and emb.shape[1] > 0 and p.ood_p_values(emb) is not None
    r = run_cli('models', 'export', 'ens', '--onnx', '--out', tmp_path/'ens.onnx', '--models-dir', tmp_path/'models', home=tmp_path, check=0)
    po = Predictor.from_registry('ens-onnx', registry=reg)
    np.testing.assert_allclose(po.predict_proba(list(x)), probs, atol=1e-4)
    import json
    from biovis.errors import RegistryError
    f = reg.path('ens', 'v1')/'metadata.json'
    for bad in (3, 'three', 1):             # metadata that does not match the weights: a registry error, never a half-built model
        f.write_text(json.dumps(dict(meta, members=bad)))
        with pytest.raises(RegistryError, match='cannot load weights'): Predictor.load_model(reg, 'ens', 'v1')


def test_a_member_count_under_one_is_refused(tmp_path):
    "`--members 0` or a negative count: a clear error, the bad-input exit status, and nothing registered (0 does not mean 'choose')."
    from biovis.registry import ModelRegistry
    from biovis.cli import EXIT_BAD_INPUT
    for n, extra in (('0', ()), ('-2', ('--budget', '30'))):
        r = run_cli('train', '--data', 'sample', '--name', 'bad', '--members', n, '--epochs', '1', '--no-tta', '-q', *extra, home=tmp_path, timeout=600)
        assert r.returncode == EXIT_BAD_INPUT and f'members must be at least 1, not {n}' in r.stderr, (r.returncode, r.stderr[-2000:])
    assert not (tmp_path/'models').exists() or ModelRegistry(tmp_path/'models').names() == []
