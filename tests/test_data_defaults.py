"""Issue 14, defaults that fit the data: every 2-D MedMNIST set by name (`data list`, `data fetch`, `load_dataset`), folders the
loader does not use are named, a classifier's `--budget` sets the epochs from a measured epoch, and the network and image size
are chosen for the images."""
import functools, hashlib, http.server, json, logging, threading, time

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

# every request goes through a proxy on a closed port: the download fails at once, here and on a machine with internet
OFFLINE = {k: 'http://127.0.0.1:9' for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY')} | {'no_proxy': '', 'NO_PROXY': ''}


def _npz(path, n=(40, 10, 10), shape=(28, 28), n_classes=2, seed=0):
    "A MedMNIST-format file with images whose brightness encodes the class."
    rng, out = np.random.default_rng(seed), {}
    for split, k in zip(('train', 'val', 'test'), n):
        y = np.arange(k) % n_classes
        out[f'{split}_images'] = np.clip(rng.normal(60 + 100 * y[:, None, None], 15, (k, *shape)), 0, 255).astype(np.uint8)
        out[f'{split}_labels'] = y[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return path


def _files(root, sizes, n=12, modality=None):
    "An `ImageDataset` of `n` JPEG files whose sizes cycle through `sizes` ((W, H) pairs)."
    from biovis.data import ImageDataset
    root.mkdir(parents=True, exist_ok=True)
    ps = []
    for i in range(n):
        ps.append(root/f'{i}.jpg'); Image.new('RGB', sizes[i % len(sizes)], (i * 20 % 255, 90, 120)).save(ps[-1])
    splits = np.array((['train'] * 8 + ['valid'] * 2 + ['test'] * 2) * (n // 12), dtype=object)
    return ImageDataset(['a', 'b'], np.arange(n) % 2, splits, paths=ps, modality=modality)


# --- every 2-D MedMNIST set by name ---------------------------------------------------------------------------------------

def test_fetch_offline_fails_fast_with_one_line_and_leaves_nothing(tmp_path):
    t = time.perf_counter()
    r = run_cli('data', 'fetch', 'pneumoniamnist', '--root', tmp_path/'data', '--timeout', '3', home=tmp_path, env=OFFLINE, timeout=120)
    assert r.returncode == 5, (r.returncode, r.stderr)                # EXIT_FETCH, as for every failed download
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'pneumoniamnist.npz' in lines[0] and 'zenodo.org' in lines[0] and 'pass its path' in lines[0]
    assert not (tmp_path/'data').exists()                             # no partial file, not even the folder made for it
    assert time.perf_counter() - t < 60


def test_fetch_unknown_and_3d_names_are_usage_errors(tmp_path):
    from biovis.data import medmnist_sets
    r = run_cli('data', 'fetch', 'nosuchmnist', home=tmp_path, env=OFFLINE, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert 'unknown' in r.stderr and all(f in r.stderr for f in medmnist_sets())      # every valid name is listed
    r = run_cli('data', 'fetch', 'organmnist3d', home=tmp_path, env=OFFLINE, timeout=120)
    assert r.returncode == 2 and '3-D' in r.stderr and 'not supported' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'data').exists()


def test_fetch_medmnist_by_size_checks_the_md5_and_moves_atomically(tmp_path):
    "A local server stands in for Zenodo: the file of the 64-px size lands as NAME/NAME_64.npz only with the right MD5."
    from biovis.data import fetch_medmnist, DataFetchError
    srv_dir = tmp_path/'srv'; f = _npz(srv_dir/'dermamnist_64.npz', shape=(64, 64))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv_dir)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{srv.server_port}/dermamnist_64.npz'
    try:
        with pytest.raises(DataFetchError, match='MD5'):           # the official MD5 (from medmnist.INFO) is not this file's
            fetch_medmnist('dermamnist', 64, root=tmp_path/'data', url=url, progress=False)
        assert not (tmp_path/'data').exists()
        p = fetch_medmnist('dermamnist', 64, root=tmp_path/'data', url=url, md5=hashlib.md5(f.read_bytes()).hexdigest(), progress=False)
        assert p == tmp_path/'data'/'dermamnist'/'dermamnist_64.npz' and p.read_bytes() == f.read_bytes()
        assert [x.name for x in p.parent.iterdir()] == ['dermamnist_64.npz']       # no .part file left
    finally: srv.shutdown()
    with pytest.raises(ValueError, match='28, 64, 128, 224'): fetch_medmnist('dermamnist', 32)


def test_data_list_shows_every_2d_set_with_task_modality_and_presence(tmp_path):
    from biovis.data import medmnist_sets
    _npz(tmp_path/'data'/'pneumoniamnist'/'pneumoniamnist.npz')
    _npz(tmp_path/'data'/'dermamnist_64.npz', shape=(64, 64))
    r = run_cli('data', 'list', '--root', tmp_path/'data', '--json', home=tmp_path, check=0)
    rows = {(x := json.loads(l))['name']: x for l in r.stdout.splitlines()}
    assert list(rows) == list(medmnist_sets()) and not any(n.endswith('3d') for n in rows)
    assert (rows['pneumoniamnist']['task'], rows['pneumoniamnist']['modality'], rows['pneumoniamnist']['here']) == ('binary-class', 'xray', '28')
    assert (rows['bloodmnist']['modality'], rows['bloodmnist']['classes'], rows['bloodmnist']['here']) == ('microscopy', 8, '-')
    assert rows['dermamnist']['here'] == '64' and rows['organamnist']['modality'] == 'ct_mr'
    table = run_cli('data', 'list', '--root', tmp_path/'data', home=tmp_path, check=0).stdout
    assert 'modality' in table.splitlines()[0] and 'pneumoniamnist' in table


def test_load_dataset_knows_medmnist_sets_by_name(tmp_path, monkeypatch):
    from biovis.data import load_dataset
    monkeypatch.setenv('BIOVIS_DATA', str(tmp_path))
    _npz(tmp_path/'pneumoniamnist'/'pneumoniamnist.npz')
    ds = load_dataset('pneumoniamnist')
    assert (ds.name, ds.classes, ds.modality, len(ds)) == ('pneumoniamnist', ['normal', 'pneumonia'], 'xray', 60)
    with pytest.raises(FileNotFoundError, match='biovis data fetch dermamnist --size 64'): load_dataset('dermamnist_64')


# --- folders the loader does not use ---------------------------------------------------------------------------------------

def _class_folders(root, splits=('train', 'test'), per=3):
    for s in splits:
        for c in ('a', 'b'):
            (root/s/c).mkdir(parents=True, exist_ok=True)
            for i in range(per): Image.new('L', (28, 28), 40 + 150 * (c == 'b') + i).save(root/s/c/f'{i}.png')
    return root


def test_unused_folders_are_warned_about_and_recorded(tmp_path, caplog):
    from biovis.data import from_folder
    plain = from_folder(_class_folders(tmp_path/'plain'))
    assert plain.skipped == []
    root = _class_folders(tmp_path/'cells', splits=('TRAIN', 'TEST', 'TEST_SIMPLE', 'val', 'valid'))
    (root/'.cache').mkdir()                                           # hidden folders are nobody's data
    with caplog.at_level(logging.WARNING, logger='biovis'):
        ds = from_folder(root)
    assert ds.skipped == ['TEST_SIMPLE/', 'valid/']                  # val/ is read; a second validation folder is not
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and 'TEST_SIMPLE/ (6 images)' in warn[0] and 'valid/ (6 images)' in warn[0], warn
    assert sorted(set(ds.splits)) == ['test', 'train', 'valid'] and len(ds) == 18
    assert 'TEST_SIMPLE' in repr(ds)
    ds.save_manifest(tmp_path/'m.csv')
    assert '# skipped TEST_SIMPLE/|valid/' in (tmp_path/'m.csv').read_text().splitlines()


# --- size and architecture chosen for the images ---------------------------------------------------------------------------

def test_choose_model_small_images_get_the_small_cnn_at_their_size():
    from biovis.data import ImageDataset
    from biovis.workflow import choose_model
    ds = ImageDataset(['a', 'b'], [0, 1] * 6, ['train'] * 8 + ['valid'] * 2 + ['test'] * 2, array=np.zeros((12, 28, 28, 3), np.uint8),
                      modality='microscopy')
    c = choose_model(ds)
    assert (c['arch'], c['size'], c['pretrained'], c['chosen_by']) == ('cnn_small', 28, False, 'the images')
    assert c['why'].startswith('28x28 microscopy images: cnn_small at 28 px, trained from scratch, because the images are small')


def test_choose_model_photographs_get_pretrained_efficientnet(tmp_path):
    from biovis.workflow import choose_model
    c = choose_model(_files(tmp_path/'photos', [(320, 240)], modality='photograph'))
    assert (c['arch'], c['size'], c['pretrained'], c['image_size'], c['varying']) == ('efficientnet_lite0', 224, True, [240, 320], False)
    assert c['why'].startswith('320x240 photographs: efficientnet_lite0 at 224 px, pretrained on ImageNet, because'), c['why']
    c = choose_model(_files(tmp_path/'crops', [(90, 100), (120, 130), (140, 150)]))      # crops of varying size
    assert (c['arch'], c['size'], c['varying']) == ('efficientnet_lite0', 128, True) and 'vary in size' in c['why']
    big = choose_model(_files(tmp_path/'big', [(1024, 768)]))
    assert big['size'] == 224                                         # never above the weights' own resolution


def test_choose_model_keeps_what_the_user_said(tmp_path, monkeypatch):
    import biovis.workflow as wf
    photos = _files(tmp_path/'photos', [(320, 240)])
    c = wf.choose_model(photos, arch='cnn_small')
    assert (c['arch'], c['size'], c['chosen_by']) == ('cnn_small', 64, '--arch') and 'as asked (--arch)' in c['why']
    assert wf.choose_model(photos, size=32)['arch'] == 'cnn_small'                     # a small --size: the small CNN
    assert (wf.choose_model(photos, size=160)['arch'], wf.choose_model(photos, size=160)['size']) == ('efficientnet_lite0', 160)
    assert wf.choose_model(photos, pretrained=False)['pretrained'] is False
    monkeypatch.setattr(wf, '_lite0_ready', lambda: False)            # no offline weights: the small CNN, and it says why
    c = wf.choose_model(photos)
    assert c['arch'] == 'cnn_small' and 'not installed' in c['why']
    with pytest.raises(ValueError, match='unknown architecture'): wf.choose_model(photos, arch='vgg99')


# --- a time budget for classification --------------------------------------------------------------------------------------

def test_epochs_for_budget():
    from biovis.workflow import epochs_for_budget, MAX_BUDGET_EPOCHS
    assert epochs_for_budget(60, 7) == 8
    assert epochs_for_budget(60, 7, max_epochs=5) == 5                # --epochs is the upper bound
    assert epochs_for_budget(5, 7) == 1                               # at least one
    assert epochs_for_budget(1e6, 0.01) == MAX_BUDGET_EPOCHS


def test_measure_epoch_scales_the_probe_to_the_split():
    from biovis.data import ImageDataset
    from biovis.workflow import measure_epoch
    n = 640
    ds = ImageDataset(['a', 'b'], np.arange(n) % 2, ['train'] * 512 + ['valid'] * 64 + ['test'] * 64,
                      array=np.random.default_rng(0).integers(0, 255, (n, 28, 28, 1), dtype=np.uint8))
    m = measure_epoch(ds, 'cnn_small', 28, bs=128)
    assert (m['batch'], m['n_train'], m['steps']) == (64, 512, 2)
    assert m['epoch_s'] >= m['step_s'] * 512 / 64 and m['probe_s'] < 30


def _two_blobs(n: int = 160):
    "Two classes of 16-px grayscale images, dark and bright: 96 train, 32 valid, 32 test."
    from biovis.data import ImageDataset
    y = np.arange(n) % 2
    x = np.clip(np.random.default_rng(0).normal(60 + 120 * y[:, None, None, None], 20, (n, 16, 16, 1)), 0, 255).astype(np.uint8)
    return ImageDataset(['a', 'b'], y, ['train'] * 96 + ['valid'] * 32 + ['test'] * 32, array=x)


def test_budget_stop_ends_the_fit_and_keeps_the_best_epoch():
    from biovis.train import train
    from biovis.workflow import BudgetStop
    ds = _two_blobs()
    stop = BudgetStop(0.0)
    learn = train(ds, epochs=4, bs=32, progress=False, cbs=[stop])
    assert stop.stopped and learn.biovis['training']['epochs_run'] == 1


def test_budget_stop_shortens_the_schedule_so_it_still_anneals():
    "Epochs slower than planned: the fit is cut to the epochs that fit and the one-cycle learning rate still ends annealed."
    from fastai.callback.core import Callback
    from biovis.train import train
    from biovis.workflow import BudgetStop
    ds, now = _two_blobs(), [0.0]
    class TenSecondEpochs(Callback):          # the clock BudgetStop reads: each epoch takes 10 s
        order = 60
        def after_epoch(self): now[0] += 10
    stop = BudgetStop(35.0, clock=lambda: now[0])
    learn = train(ds, epochs=6, bs=32, lr=4e-3, progress=False, cbs=[TenSecondEpochs(), stop])
    assert stop.stopped and stop.planned == 6 and stop.epochs_fit == 3
    assert learn.biovis['training']['epochs_run'] == 3 and now[0] <= 35
    lrs = learn.recorder.lrs
    # the last of 9 steps runs at 8/9 of the shortened schedule (~5 % of the peak); cut at epoch 3 of 6 it would be near the peak
    assert max(lrs) > 1e-3 and lrs[-1] < 4e-3 / 10, (max(lrs), lrs[-1])


def test_cli_train_with_budget_prints_and_records_its_choices(tmp_path):
    "A 28-px class folder with an extra TEST_SIMPLE/: the small CNN at 28 px, epochs from a measured epoch, all in the metadata."
    from biovis.data import export_folder, load_dataset
    from biovis.registry import ModelRegistry
    root = export_folder(load_dataset('sample'), tmp_path/'cells', per_class=8)
    export_folder(load_dataset('sample'), tmp_path/'extra', per_class=1)
    (tmp_path/'extra'/'test').rename(root/'TEST_SIMPLE')
    r = run_cli('train', '--data', root, '--name', 'cells', '--budget', '30', '--epochs', '2', '--no-tta', '-q', home=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert '28x28 images: cnn_small at 28 px, trained from scratch, because the images are small' in out, out
    line = next(l for l in out.splitlines() if l.startswith('budget 30 s: an epoch of cnn_small at 28 px'))
    assert 'TEST_SIMPLE/ (8 images)' in r.stderr                      # the warning about the folder not used
    meta = ModelRegistry(tmp_path/'models').metadata('cells', 'v1')
    t = meta['training']
    assert t['budget_s'] == 30 and 1 <= t['epochs_chosen'] <= 2 and t['epochs'] == t['epochs_chosen'] and t['budget_why'] == line
    assert t['epoch_seconds_measured'] > 0 and t['budget_stopped'] is False
    assert (meta['model_choice']['arch'], meta['model_choice']['size'], meta['model_choice']['chosen_by']) == ('cnn_small', 28, 'the images')
    assert meta['arch'] == 'cnn_small' and meta['input_size'] == [28, 28] and meta['dataset']['skipped'] == ['TEST_SIMPLE/']
    card = (ModelRegistry(tmp_path/'models').path('cells', 'v1')/'MODEL_CARD.md').read_text()
    assert f"- **Network and size chosen**: {meta['model_choice']['why']}" in card and f'- **Time budget**: {line}' in card
    assert '- **Folders not used**: TEST_SIMPLE/' in card


def test_validation_far_above_test_is_warned_in_the_card():
    "Issue 14: validation that lies (0.99 on near-copies vs 0.87 on the test folder) is named in the model card."
    from biovis.workflow import validation_gap
    from biovis.registry import model_card
    w = validation_gap(0.99, 0.87)
    assert w and '0.120 above' in w and validation_gap(0.90, 0.87) is None
    meta = dict(name='m', version='v1', classes=['a', 'b'], arch='cnn_small', input_size=[28, 28], channels=3, warnings=[w])
    assert f'- **Warning**: {w}' in model_card(meta)
    assert '**Warning**' not in model_card(dict(meta, warnings=[]))


def test_class_weights_only_for_imbalanced_training_classes():
    from biovis.train import class_weights
    w, why = class_weights(np.array([0] * 388 + [1] * 3494), ['normal', 'pneumonia'])       # this PneumoniaMNIST copy's train split
    assert np.allclose(w * [388, 3494], 3882 / 2) and 'normal: 388 images x 5.00' in why and '9.0 times' in why
    assert class_weights(np.array([0] * 852 + [1] * 2330), ['a', 'b']) == (None, '')        # BloodMNIST-like 2.7 : 1
    assert class_weights(np.array([0] * 852 + [1] * 2330), ['a', 'b'], balance=True)[0] is not None
    w, why = class_weights(np.array([0] * 10 + [2] * 50), ['a', 'b', 'c'])                 # an absent class gets no weight
    assert w[1] == 0 and np.isclose(w[0] * 10, w[2] * 50) and 'asked' not in why


def test_imbalanced_training_split_is_weighed_and_recalls_the_rare_class():
    "1 : 9 training classes that overlap, balanced test: unweighted, the rare class is mostly called the common one; weighed, it is found."
    from biovis.data import ImageDataset
    from biovis.train import train
    from biovis.models import predict_proba
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 360 + [0, 1] * 40 + [0] * 100 + [1] * 100)
    level = 100 + 30 * y + rng.normal(0, 30, len(y))            # one brightness per image: the classes overlap (d' = 1)
    x = np.clip(level[:, None, None, None] + rng.normal(0, 5, (len(y), 16, 16, 1)), 0, 255).astype(np.uint8)
    ds = ImageDataset(['rare', 'common'], y, ['train'] * 400 + ['valid'] * 80 + ['test'] * 200, array=x)
    xt, yt = ds.tensors('test')
    recall = {}
    for balance in (False, None):
        learn = train(ds, epochs=6, bs=32, progress=False, balance=balance, calibrate_on=None)
        recall[balance] = float((predict_proba(learn.model, xt).argmax(1)[yt == 0] == 0).mean())
        tr = learn.biovis['training']
        assert (tr['class_weights'] is None) == (balance is False) and '9.0 times' in tr['class_weights_why']
        assert tr['class_weights_why'].startswith('classes not weighed (asked)' if balance is False else 'each class weighed equally')
    assert recall[None] > recall[False] + 0.2, recall


def _separable(n=160, seed=0):
    from biovis.data import ImageDataset
    y = np.arange(n) % 2
    x = np.clip(np.random.default_rng(seed).normal(60 + 120 * y[:, None, None, None], 20, (n, 16, 16, 1)), 0, 255).astype(np.uint8)
    return ImageDataset(['a', 'b'], y, ['train'] * 96 + ['valid'] * 32 + ['test'] * 32, array=x)


def test_the_last_epoch_is_kept_unless_the_best_beats_it_by_more_than_chance():
    "Equally good epochs: the last (annealed) one stays, not the first to reach the best accuracy; a last epoch that went wrong is replaced by the best."
    import torch
    from fastai.callback.core import Callback
    from biovis.train import train
    from biovis.models import predict_proba
    ds = _separable()
    xv, yv = ds.tensors('valid')
    learn = train(ds, epochs=4, bs=32, progress=False, calibrate_on=None)
    tr = learn.biovis['training']
    accs = [v[2] for v in learn.recorder.values]
    assert max(accs) == 1.0 and accs.index(1.0) < 3, accs      # the old rule (first best) would keep an early epoch
    assert tr['epoch_kept'] == 3, tr

    class WreckLastEpoch(Callback):          # the last epoch's weights replaced by noise before it is validated
        order = 50
        def before_validate(self):
            if self.epoch == self.n_epoch - 1:
                with torch.no_grad():
                    for p in self.model.parameters(): p.copy_(torch.randn_like(p) * 3)
    learn = train(ds, epochs=4, bs=32, progress=False, calibrate_on=None, cbs=[WreckLastEpoch()])
    tr = learn.biovis['training']
    assert learn.recorder.values[-1][2] <= 0.75 and tr['epoch_kept'] < 3, (learn.recorder.values, tr)
    assert 'McNemar p = ' in tr['epoch_kept_why'] and 'kept' in tr['epoch_kept_why']
    assert (predict_proba(learn.model, xv).argmax(1) == yv).mean() == tr['best_valid_accuracy'] == 1.0


def test_train_precision_is_recorded_probed_alike_and_chosen_from_the_command_line(tmp_path):
    "`biovis train --budget`: the probe picks the faster precision where bfloat16 is native (both timed, in the metadata), says why, and times the epoch in it; `--precision fp32` trains and records float32; an unknown precision is a usage error."
    from biovis.registry import ModelRegistry
    from biovis.train import bf16_native
    auto = run_cli('train', '--data', 'sample', '--name', 'a', '--budget', '20', '--epochs', '1', '--no-tta', '-q', home=tmp_path, timeout=600)
    fp32 = run_cli('train', '--data', 'sample', '--name', 'b', '--budget', '20', '--epochs', '1', '--no-tta', '-q', '--precision', 'fp32', home=tmp_path, timeout=600)
    assert auto.returncode == 0 and fp32.returncode == 0, (auto.stderr[-2000:], fp32.stderr[-2000:])
    reg = ModelRegistry(tmp_path/'models')
    ta, tb = reg.metadata('a', 'v1')['training'], reg.metadata('b', 'v1')['training']
    if bf16_native('cpu'):
        assert set(ta['precision_step_s']) == {'fp32', 'bf16'} and ta['precision'] == min(ta['precision_step_s'], key=ta['precision_step_s'].get)
    else: assert ta['precision'] == 'fp32'
    assert f"precision: {ta['precision_why']}" in auto.stdout
    assert ('here in bfloat16' in auto.stdout) == (ta['precision'] == 'bf16'), auto.stdout
    assert (tb['precision'], tb['precision_why'], list(tb['precision_step_s'])) == ('fp32', 'float32, as asked', ['fp32'])
    assert 'here in bfloat16' not in fp32.stdout
    bad = run_cli('train', '--data', 'sample', '--name', 'c', '--epochs', '1', '--precision', 'fp16', home=tmp_path, timeout=600)
    assert bad.returncode == 2 and "invalid choice: 'fp16'" in bad.stderr
    assert 'c' not in reg.names()


def test_budget_stop_lengthens_the_schedule_again_after_a_slow_spell():
    "One slow epoch early (other work beside training) cuts the plan, and the fit gets its epochs back when the epochs are quick again, inside the budget; the mean of all epochs would have kept it cut at 4."
    from fastai.callback.core import Callback
    from biovis.train import train
    from biovis.workflow import BudgetStop
    ds, now = _two_blobs(), [0.0]
    class OneSlowEpoch(Callback):             # the clock BudgetStop reads: epoch 1 takes 25 s, the others 10 s
        order = 60
        def after_epoch(self): now[0] += 25 if self.epoch == 1 else 10
    stop = BudgetStop(100.0, clock=lambda: now[0])
    learn = train(ds, epochs=8, bs=32, lr=4e-3, progress=False, cbs=[OneSlowEpoch(), stop])
    assert learn.biovis['training']['epochs_run'] == 8 and stop.epochs_fit == 8 and not stop.stopped
    assert now[0] == 95 <= 100
    lrs = learn.recorder.lrs
    assert lrs[-1] < 4e-3 / 10, lrs[-1]                                 # annealed at the end of the 8 epochs


def test_budget_stop_does_not_flip_at_the_boundary_and_stays_inside_the_budget():
    "Epoch times hovering around the boundary (10.4 s, 9.6 s, ...): the plan is cut once and not lengthened back and forth; without the half-epoch margin it flipped 9 <-> 10 and ended at 100.4 s of 100."
    from fastai.callback.core import Callback
    from biovis.train import train
    from biovis.workflow import BudgetStop
    ds, now, seen = _two_blobs(), [0.0], []
    class Hovering(Callback):
        order = 60
        def after_epoch(self): now[0] += 10 if self.epoch == 0 else (10.4 if self.epoch % 2 else 9.6)
    class Plan(Callback):
        order = 71
        def after_epoch(self): seen.append(self.learn.n_epoch)
    stop = BudgetStop(100.0, clock=lambda: now[0])
    train(ds, epochs=10, bs=32, progress=False, cbs=[Hovering(), stop, Plan()])
    assert now[0] <= 100 and stop.epochs_fit == 9 and stop.stopped, (now[0], seen)
    assert all(b <= a for a, b in zip(seen, seen[1:])), seen          # never lengthened again
