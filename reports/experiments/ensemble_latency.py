"""What an ensemble costs when serving: the `Predictor`'s time per request for one cnn_small and for an `Ensemble` of 2 and
4 (PneumoniaMNIST's 600 s model), 28 x 28 grayscale, one image per request and a batch of 64, no TTA (the X-ray policy has
one view). Weights are random: the time does not depend on them. Medians of `--repeats` timed calls after a warm-up.

    python reports/experiments/ensemble_latency.py      # writes reports/experiments/ensemble_latency.json
"""
import json, os, platform, statistics, time, argparse
from pathlib import Path
import numpy as np, torch
from biovis.models import create_model
from biovis.inference import Predictor

ap = argparse.ArgumentParser(); ap.add_argument('--repeats', type=int, default=300); a = ap.parse_args()
meta = dict(arch='cnn_small', classes=['normal', 'pneumonia'], input_size=[28, 28], channels=1, policy=None, calibration={'temperature': 1.0})
x1 = np.random.default_rng(0).integers(0, 255, (1, 28, 28, 1), dtype=np.uint8)
x64 = np.random.default_rng(1).integers(0, 255, (64, 28, 28, 1), dtype=np.uint8)
load0 = os.getloadavg()[0]
res = {}
for k in (1, 2, 4):
    torch.manual_seed(0)
    p = Predictor(create_model('cnn_small', 2, 1, pretrained=False, members=k), dict(meta, members=k), device='cpu')
    row = {}
    for name, x in (('one_image', list(x1)), ('batch_64', list(x64))):
        for _ in range(20): p.predict_proba(x)
        t = []
        for _ in range(a.repeats if name == 'one_image' else a.repeats // 10):
            t0 = time.perf_counter(); p.predict_proba(x); t.append(time.perf_counter() - t0)
        row[f'{name}_ms_median'] = round(statistics.median(t) * 1e3, 4)
    res[k] = row
    print(k, row, flush=True)
for k in (2, 4):
    res[k]['ratio_to_one_model'] = {n: round(res[k][n] / res[1][n], 2) for n in res[1]}
out = dict(created=time.strftime('%Y-%m-%dT%H:%M:%S%z'), machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)',
           load_average_start=round(load0, 2), load_average_end=round(os.getloadavg()[0], 2), repeats=a.repeats,
           members={str(k): v for k, v in res.items()})
Path(__file__).with_name('ensemble_latency.json').write_text(json.dumps(out, indent=1))
