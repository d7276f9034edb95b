"""BloodMNIST at 28 px: how far four ways of spending about 600 s of training get, alone and averaged (issue 14), for insight only.

Save mode reads registered models (a registry version folder; `prefix` picks one member of an ensemble) and writes their TTA
probabilities on the official test split, with their plain accuracy on the train / valid / test splits:

    python reports/experiments/blood_ceiling.py --save NAME=VERSION_DIR[:arch[:prefix]] ... --out reports/experiments/blood_ceiling

Default mode recomputes every single model and every average of 2..k of them from the saved probabilities:

    python reports/experiments/blood_ceiling.py reports/experiments/blood_ceiling
"""
import itertools, json, sys
from pathlib import Path
import numpy as np
from biovis.data import from_npz
from biovis.evaluate import classification_metrics

data = sys.argv[sys.argv.index('--data') + 1] if '--data' in sys.argv else '../shared/data'
ds = from_npz(f'{data}/bloodmnist/bloodmnist.npz')
_, y = ds.tensors('test')
m = lambda p: {k: round(float(v), 5) for k, v in classification_metrics(y, p, ds.classes).items() if k in ('accuracy', 'auc')}

if '--save' in sys.argv:
    import torch
    from biovis.models import create_model, predict_proba
    out = Path(sys.argv[sys.argv.index('--out') + 1])
    specs = [a for a in sys.argv[sys.argv.index('--save') + 1:] if '=' in a]
    probs, info = {}, {}
    for s in specs:
        name, rest = s.split('=', 1)
        parts = rest.split(':')
        d, arch, prefix = parts[0], parts[1] if len(parts) > 1 else 'cnn_small', parts[2] if len(parts) > 2 else ''
        meta = json.loads((Path(d)/'metadata.json').read_text())
        sd = torch.load(Path(d)/'model.pt', map_location='cpu', weights_only=True)
        if prefix: sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        net = create_model(arch, len(ds.classes), 3); net.load_state_dict(sd); net.eval()
        probs[name] = predict_proba(net, ds.tensors('test')[0], tta=True, views=meta['policy'].get('tta_views')).astype(np.float32)
        plain = {sp: round(float((predict_proba(net, ds.tensors(sp)[0]).argmax(1) == ds.tensors(sp)[1]).mean()), 4) for sp in ('train', 'valid', 'test')}
        tr = {k: meta['training'].get(k) for k in ('epochs', 'epochs_run', 'seconds', 'precision', 'label_smoothing', 'seed')}
        if prefix: tr['seed'] = meta['training']['ensemble']['seeds'][int(prefix.split('.')[1])]     # this member's own
        info[name] = dict(arch=arch, member=prefix or None, training=tr,
                          plain_accuracy=plain, test_tta=m(probs[name]))
        print(name, info[name])
    np.savez_compressed(f'{out}_test_probs.npz', **probs)
    Path(f'{out}_models.json').write_text(json.dumps(info, indent=1) + '\n')
else:
    base = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else 'reports/experiments/blood_ceiling'
    P = dict(np.load(f'{base}_test_probs.npz'))
    rows = [dict(models=list(c), **m(np.mean([P[i] for i in c], 0))) for k in range(1, len(P) + 1) for c in itertools.combinations(P, k)]
    for r in rows: print(f"{' + '.join(r['models'])}: accuracy {r['accuracy']:.4f}, AUC {r['auc']:.5f}")
    Path(f'{base}_averages.json').write_text(json.dumps(rows, indent=1) + '\n')
