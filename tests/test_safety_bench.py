"The safety benchmark's parts on tiny data: the review queue's picks, the random strategy's seeds, the labels-to-target interpolation, the audit's recall."
import argparse

import numpy as np
import pytest

from biovis.bench.safety import (active_learning, audit_recall, labels_to_reach, queue_picks, random_picks, probs_and_embeddings,
                                 fit_small, _nearest)
from biovis.feedback.queue import margin_uncertainty, k_center_greedy


def test_labels_to_reach_interpolates_on_the_curve():
    assert labels_to_reach([100, 200, 400, 800], [0.80, 0.90, 0.94, 0.98]) == pytest.approx(500.0)   # 0.95 a quarter of the way from 400 to 800
    assert labels_to_reach([100, 200], [0.95, 0.97]) == 100.0                                      # reached at the start
    assert labels_to_reach([100, 200, 400], [0.90, 0.96, 0.93]) == pytest.approx(100 + 5 / 6 * 100)  # the first crossing counts
    assert labels_to_reach([100, 200, 400], [0.90, 0.94, 0.9499]) is None
    assert labels_to_reach([10, 20], [0.5, 0.7], target=0.6) == pytest.approx(15.0)


def test_queue_picks_are_new_unique_and_those_of_k_center_greedy():
    rng = np.random.default_rng(1)
    n, labelled = 300, list(range(0, 300, 7))
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    probs = rng.dirichlet(np.ones(5) * 0.5, n)
    picks = queue_picks(probs, emb, labelled, k=40, pool=4, chunk=15)
    assert len(picks) == 40 == len(set(picks)) and not set(picks) & set(labelled)
    # one chunk whose pool holds every unlabelled row: the picks are k_center_greedy's against *all* labelled rows
    # (queue_picks hands it only the nearest ones: same distances, smaller arrays)
    u = np.array([margin_uncertainty(dict(enumerate(p))) for p in probs])
    free = np.setdiff1d(np.arange(n), labelled)
    top = free[np.argsort(-u[free], kind='stable')]
    both = emb[np.concatenate([top, labelled])]
    mu, sd = both.mean(0), both.std(0) + 1e-6
    want = top[k_center_greedy((emb[top] - mu) / sd, (emb[labelled] - mu) / sd, 30, u[top])].tolist()
    assert queue_picks(probs, emb, labelled, k=30, pool=len(free), chunk=30) == want
    # from the pool of the most uncertain rows only: pool x k of them
    assert set(queue_picks(probs, emb, labelled, k=20, pool=2, chunk=20)) <= set(top[:40].tolist())


def test_queue_spreads_its_picks_over_the_embedding():
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.1, (50, 4)), rng.normal(5, 0.1, (50, 4))]).astype(np.float32)
    probs = np.tile([0.5, 0.5], (100, 1))                  # all as uncertain: only the distances decide
    picks = queue_picks(probs, emb, labelled=[0, 1, 2], k=20, chunk=20, pool=5)
    assert picks[0] >= 50                                   # first the cluster nobody labelled
    assert 5 <= sum(p >= 50 for p in picks) <= 15           # then both clusters


def test_nearest_is_the_nearest():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(70, 5))
    assert (_nearest(a, b, chunk=7) == np.linalg.norm(a[:, None] - b[None], axis=2).argmin(1)).all()


def test_random_picks_follow_their_seed():
    pick = lambda seed: random_picks(np.random.default_rng([seed, 1]), 100, [1, 2, 3], 10)
    assert pick(0) == pick(0) != pick(1)
    assert len(set(pick(0))) == 10 and not set(pick(0)) & {1, 2, 3}
    assert sorted(random_picks(np.random.default_rng(0), 5, [0, 1], 10)) == [2, 3, 4]   # no more than are left


def test_simulation_on_a_tiny_subset(sample_ds):
    x, y = sample_ds.tensors('train'); xt, yt = sample_ds.tensors('test')
    x, y, xt, yt = x[:200], y[:200], xt[:100], yt[:100]
    al = active_learning(x, y, xt, yt, len(sample_ds.classes), [10, 20, 40], seeds=(0, 1), epochs=1, min_steps=3, say=lambda *a: None)
    q, r = al['curves']['queue'], al['curves']['random']
    assert q['labels'] == r['labels'] == [10, 20, 40] and al['seeds'] == [0, 1]
    assert [c[0] for c in q['per_seed']] == [c[0] for c in r['per_seed']]     # same first labels and model per seed
    assert all(0 <= a <= 1 for c in q['per_seed'] + r['per_seed'] for a in c) and len(q['per_seed']) == 2
    assert q['mean'] == pytest.approx(np.mean(q['per_seed'], 0).tolist())
    m = fit_small(x[:20], y[:20], len(sample_ds.classes), epochs=1, min_steps=2, seed=0)
    p, e = probs_and_embeddings(m, x[:50])
    assert p.shape == (50, 8) and e.shape == (50, 32) and np.allclose(p.sum(1), 1, atol=1e-5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m2 = fit_small(x[20:60], y[20:60], len(sample_ds.classes), epochs=1, min_steps=2, seed=1, init=m)     # fine-tuned: a copy
    assert m2 is not m and all((before[k] == v).all() for k, v in m.state_dict().items())
    assert any(not (before[k] == v).all() for k, v in m2.state_dict().items() if v.is_floating_point())
    assert (m2.state_dict()['norm.mean'] == before['norm.mean']).all()                                   # the first round's input statistics


def _easy_set(n=300, seed=0):
    "Three classes a network tells apart at once: red, green and blue squares with noise."
    from biovis.data import ImageDataset
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 20, (n, 28, 28, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 180
    return ImageDataset(['red', 'green', 'blue'], y, np.full(n, 'train', object), array=x, name='easy', modality='microscopy')


def test_audit_finds_planted_flips_on_an_easy_set():
    # fold models trained to the end (no epoch picked on a handful of valid images), without label smoothing: sure of themselves
    r = audit_recall(_easy_set(), n=300, share=0.0134, k=2, epochs=4, say=lambda *a: None, bs=16, train_splits=('train', 'valid'),
                     label_smoothing=0)
    assert r['flipped'] == 4 and len(r['flipped_index']) == 4
    assert r['out_of_fold_accuracy'] > 0.9
    assert set(r['flipped_index']) <= set(r['flagged_index']) and r['audit_recall'] == 1.0
    assert r['audit_precision'] == r['found'] / r['flagged'] and r['audit_precision'] >= 0.5


def test_cli_has_the_safety_flag():
    from biovis.commands.core import Commands
    from biovis.commands.bench import add_commands, cmd_benchmark
    p = argparse.ArgumentParser(); sub = Commands(p.add_subparsers(dest='cmd'), argparse.ArgumentParser(add_help=False))
    add_commands(sub)
    a = p.parse_args(['benchmark', '--safety'])
    assert a.fn is cmd_benchmark and a.safety and not a.scaleout
