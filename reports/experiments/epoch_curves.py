"""Per-epoch test accuracy and AUC of one training run, for insight only (no default is chosen on these figures' test split).

The figures quoted in nbs/01b_policy.ipynb, nbs/03_train.ipynb and the closing notes of issue 14 come from runs of this script
(their JSON is beside it, `pneumonia_<tag>.json`), e.g.:

    python reports/experiments/epoch_curves.py --epochs 25 --jitter 0.1 --scale 0 --tag base25   # the X-ray policy before
    python reports/experiments/epoch_curves.py --epochs 72 --swa 0.25 --tag aug72                 # the X-ray policy now

`selected` is the model `biovis.train.train` returns (the epoch it keeps); the per-epoch rows read the test split after every
epoch; `--swa F` also averages the weights of the last fraction F of epochs (torch.optim.swa_utils) and reports that model.
"""
import json, time, argparse
from pathlib import Path
import numpy as np, torch
from sklearn.metrics import roc_auc_score
from fastai.callback.core import Callback
import biovis.train as T
from biovis.data import from_npz
from biovis.policy import policy_for
from biovis.models import predict_logits
from dataclasses import replace

ap = argparse.ArgumentParser()
ap.add_argument('--epochs', type=int, default=25); ap.add_argument('--scale', type=float, default=None)
ap.add_argument('--jitter', type=float, default=None); ap.add_argument('--rotate', type=float, default=None)
ap.add_argument('--shift', type=int, default=None); ap.add_argument('--mixup', type=float, default=0.0)
ap.add_argument('--wd', type=float, default=5e-4); ap.add_argument('--arch', default='cnn_small')
ap.add_argument('--seed', type=int, default=42); ap.add_argument('--set', default='pneumoniamnist')
ap.add_argument('--tag', default=''); ap.add_argument('--data', default='../shared/data'); ap.add_argument('--swa', type=float, default=0.0)
ap.add_argument('--save-probs', default='', help='also write the selected model\'s test probabilities to this .npy')
a = ap.parse_args()
ds = from_npz(f'{a.data}/{a.set}/{a.set}.npz')
pol = policy_for(ds.modality or None, 'exp')
kw = {k: getattr(a, k) for k in ('jitter', 'rotate', 'shift', 'scale') if getattr(a, k) is not None}
pol = replace(pol, **kw)
xt, yt = ds.tensors('test', None, ds.channels)


rows = []
class TestAUC(Callback):
    order = 100
    def after_epoch(self):
        z = predict_logits(self.learn.model, xt)
        p = torch.softmax(torch.tensor(z), 1).numpy()
        auc = roc_auc_score(yt, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(yt, p, multi_class='ovr')
        acc = float((p.argmax(1) == yt).mean())
        v = self.learn.recorder.values[-1] if self.learn.recorder.values else [None]*3
        rows.append(dict(epoch=self.epoch, valid_loss=float(v[1]), valid_acc=float(v[2]), test_acc=acc, test_auc=float(auc)))
        print(f'  ep {self.epoch:3d} valid {v[2]:.4f} test acc {acc:.4f} auc {auc:.4f}', flush=True)
class SWA(Callback):
    order = 101
    def before_fit(self):
        from torch.optim.swa_utils import AveragedModel
        self.avg = AveragedModel(self.learn.model); self.k = 0
    def after_epoch(self):
        if self.epoch >= int(self.n_epoch * (1 - a.swa)): self.avg.update_parameters(self.learn.model); self.k += 1
swa = SWA() if a.swa else None
cbs = [TestAUC()] + ([swa] if swa else [])
if a.mixup:
    from fastai.callback.mixup import MixUp
    cbs.append(MixUp(a.mixup))
t0 = time.time()
learn = T.train(ds, arch=a.arch, epochs=a.epochs, wd=a.wd, seed=a.seed, policy=pol, progress=False, cbs=cbs)
secs = time.time() - t0
z = predict_logits(learn.model, xt); p = torch.softmax(torch.tensor(z), 1).numpy()
auc = roc_auc_score(yt, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(yt, p, multi_class='ovr')
if swa:
    from torch.optim.swa_utils import update_bn
    m = swa.avg.module
    m.train()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm): mod.reset_running_stats(); mod.momentum = None
        for xb, yb in learn.dls.train: m(xb)
    m.eval()
    z = predict_logits(m, xt); p = torch.softmax(torch.tensor(z), 1).numpy()
    sauc = roc_auc_score(yt, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(yt, p, multi_class='ovr')
    print(f'SWA {a.tag} over {swa.k} epochs: acc {(p.argmax(1) == yt).mean():.4f} auc {sauc:.4f}', flush=True)
if a.save_probs: np.save(a.save_probs, p)
res = dict(args=vars(a), policy=pol.to_dict(), selected_acc=float((p.argmax(1) == yt).mean()), selected_auc=float(auc), secs=secs, rows=rows)
print(f'RESULT {a.tag} selected acc {res["selected_acc"]:.4f} auc {auc:.4f}  last {rows[-1]["test_acc"]:.4f}/{rows[-1]["test_auc"]:.4f}  max auc {max(r["test_auc"] for r in rows):.4f} secs {secs:.0f}', flush=True)
json.dump(res, open(Path(__file__).parent/f'{a.set.replace("mnist", "")}_{a.tag}.json', 'w'), indent=1)
