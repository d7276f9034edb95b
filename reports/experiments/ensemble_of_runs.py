"""Test accuracy and AUC of the average of several runs' test probabilities (a deep ensemble), for insight only.

The probabilities are those `epoch_curves.py --save-probs` wrote for the model `biovis.train.train` returned, e.g.:

    for s in 42 1 2; do python reports/experiments/epoch_curves.py --epochs 25 --seed $s --tag ens_s$s \
        --save-probs reports/experiments/pneumonia_ens_s${s}_test_probs.npy; done
    python reports/experiments/ensemble_of_runs.py reports/experiments/pneumonia_ens_s{42,1,2}_test_probs.npy
"""
import sys
import numpy as np
from sklearn.metrics import roc_auc_score
from biovis.data import from_npz

data = sys.argv[sys.argv.index('--data') + 1] if '--data' in sys.argv else '../shared/data'
files = [a for a in sys.argv[1:] if a.endswith('.npy')]
_, y = from_npz(f'{data}/pneumoniamnist/pneumoniamnist.npz').tensors('test')
P = [np.load(f) for f in files]
auc = lambda p: roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class='ovr')
for f, p in zip(files, P): print(f'{f}: accuracy {(p.argmax(1) == y).mean():.4f}, AUC {auc(p):.4f}')
for k in range(2, len(P) + 1):
    p = np.mean(P[:k], 0)
    print(f'mean of the first {k}: accuracy {(p.argmax(1) == y).mean():.4f}, AUC {auc(p):.4f}')
