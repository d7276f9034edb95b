"""Test accuracy and AUC of the average of several runs' test probabilities (a deep ensemble), for insight only.

The probabilities are those `epoch_curves.py --save-probs` wrote for the model `biovis.train.train` returned, e.g.:

    for s in 42 1 2; do python reports/experiments/epoch_curves.py --epochs 25 --seed $s --tag ens_s$s \
        --save-probs reports/experiments/pneumonia_ens_s${s}_test_probs.npy; done
    python reports/experiments/ensemble_of_runs.py reports/experiments/pneumonia_ens_s{42,1,2}_test_probs.npy
"""
import sys
import numpy as np
from biovis.data import from_npz
from biovis.evaluate import classification_metrics

data = sys.argv[sys.argv.index('--data') + 1] if '--data' in sys.argv else '../shared/data'
files = [a for a in sys.argv[1:] if a.endswith('.npy')]
ds = from_npz(f'{data}/pneumoniamnist/pneumoniamnist.npz')
_, y = ds.tensors('test')
P = [np.load(f) for f in files]
m = lambda p: classification_metrics(y, p, ds.classes)       # the library's accuracy and macro one-vs-rest AUC
for f, p in zip(files, P): print(f"{f}: accuracy {m(p)['accuracy']:.4f}, AUC {m(p)['auc']:.4f}")
for k in range(2, len(P) + 1):
    p = np.mean(P[:k], 0)
    print(f"mean of the first {k}: accuracy {m(p)['accuracy']:.4f}, AUC {m(p)['auc']:.4f}")
