"""The cross-model analyses (ranks, errors, overlap, images) given the logits, against a
straightforward per-example Python loop computing the same numbers.

    PYTHONPATH=src:. python benchmarks/bench_analyses.py                  # 10,000 images, 6 models
    PYTHONPATH=src:. python benchmarks/bench_analyses.py --n 2000 --models 3

Logits are generated (class-dependent means plus per-model noise), so this measures the
computation alone: what `analysis.*.run` does after the test-logit cache, without MLflow
and figures (timed separately). Both sides' numbers are checked equal before timing is printed.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import numpy as np

from analysis.error_classes import class_means, distribution, error_ranks
from analysis.images import nearest_by_cosine, quadrants
from analysis.overlap import average_overlap, positions, within_class_permutation
from analysis.ranks import confidence, figure_b, rank_matrix


def fake_logits(n: int, classes: int, models: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    shared = rng.normal(size=(len(labels), classes))
    out = [
        (2.0 * np.eye(classes)[labels] + shared + rng.normal(scale=1.0 + m % 2, size=shared.shape)).astype(np.float32)
        for m in range(models)
    ]
    return out, labels


def vectorised(logits, labels, classes, n_seeds, seed=0):
    out = {}
    matrix, _, _ = rank_matrix(logits, labels, classes)
    out["rank_matrix"] = matrix
    errors = []
    for z in logits:
        means, _ = class_means(z, labels, classes)
        ranks, _ = error_ranks(means, labels, z.argmax(1))
        errors.append(distribution(ranks, classes))
    out["error_ranks"] = np.asarray(errors)
    perm = within_class_permutation(labels, seed)
    pos = [positions(z) for z in logits]
    out["overlap"] = np.asarray(
        [average_overlap(pos[i], pos[j]).mean(0) for i, j in itertools.combinations(range(len(pos)), 2)]
    )
    out["overlap_control"] = np.asarray(
        [average_overlap(pos[i], pos[j][perm]).mean(0) for i, j in itertools.combinations(range(len(pos)), 2)]
    )
    seeds = np.random.default_rng(seed + 1).choice(len(labels), n_seeds, replace=False)
    out["neighbours"] = np.asarray([nearest_by_cosine(z, seeds, 5)[0] for z in logits])
    members = np.flatnonzero(labels == 6)
    q = quadrants(confidence(logits[0][members], labels[members]), confidence(logits[1][members], labels[members]), 16)
    out["quadrant_sizes"] = np.asarray([len(v["members"]) for v in q.values()])
    return out


def loop(logits, labels, classes, n_seeds, seed=0):
    """The same numbers, one example at a time, the way one would first write them."""
    out = {}
    n, m = len(labels), len(logits)

    def softmax_true(z, y):
        e = np.exp(z - z.max())
        return e[y] / e.sum()

    ranks = []
    for z in logits:
        r = np.zeros(n, dtype=int)
        for c in range(classes):
            members = [i for i in range(n) if labels[i] == c]
            conf = {i: softmax_true(z[i].astype(np.float64), c) for i in members}
            for rank, i in enumerate(sorted(members, key=lambda i: (-conf[i], i)), start=1):
                r[i] = rank
        ranks.append(r)
    matrix = np.zeros((m, m))
    for a, b in itertools.combinations(range(m), 2):
        fractions = []
        for c in range(classes):
            members = [i for i in range(n) if labels[i] == c]
            far = sum(abs(ranks[a][i] - ranks[b][i]) > len(members) / 2 for i in members)
            fractions.append(far / len(members))
        matrix[a, b] = matrix[b, a] = np.mean(fractions)
    out["rank_matrix"] = matrix
    errors = []
    for z in logits:
        sums, counts = np.zeros((classes, classes)), np.zeros(classes)
        for i in range(n):
            if int(np.argmax(z[i])) == labels[i]:
                sums[labels[i]] += z[i]
                counts[labels[i]] += 1
        hist = np.zeros(classes)
        for i in range(n):
            pred = int(np.argmax(z[i]))
            if pred != labels[i]:
                mean = sums[labels[i]] / counts[labels[i]]
                order = sorted(range(classes), key=lambda k: (-mean[k], k))
                hist[order.index(pred)] += 1
        errors.append((hist / hist.sum()).tolist())
    out["error_ranks"] = np.asarray(errors)
    lists = [[sorted(range(classes), key=lambda k: (-float(z[i, k]), k)) for i in range(n)] for z in logits]

    def ao_curve(l1, l2):
        curve, total = [], 0.0
        for d in range(1, classes + 1):
            total += len(set(l1[:d]) & set(l2[:d])) / d
            curve.append(total / d)
        return curve

    perm = within_class_permutation(labels, seed)
    out["overlap"] = np.asarray(
        [
            np.mean([ao_curve(lists[a][i], lists[b][i]) for i in range(n)], axis=0)
            for a, b in itertools.combinations(range(m), 2)
        ]
    )
    out["overlap_control"] = np.asarray(
        [
            np.mean([ao_curve(lists[a][i], lists[b][perm[i]]) for i in range(n)], axis=0)
            for a, b in itertools.combinations(range(m), 2)
        ]
    )
    seeds = np.random.default_rng(seed + 1).choice(n, n_seeds, replace=False)
    neighbours = []
    for z in logits:
        unit = z.astype(np.float64) / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
        rows = []
        for s in seeds:
            sims = unit @ unit[s]
            rows.append([j for _, j in sorted((-float(sims[j]), j) for j in range(n) if j != s)[:5]])
        neighbours.append(rows)
    out["neighbours"] = np.asarray(neighbours)
    out["quadrant_sizes"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="test images")
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1000, help="random seeds of the neighbour statistic")
    ap.add_argument(
        "--loop-n",
        type=int,
        default=None,
        help="run the loop (and a vectorised run for the ratio) on this many images only",
    )
    args = ap.parse_args()
    logits, labels = fake_logits(args.n, args.classes, args.models)
    print(
        f"{platform.machine()} {platform.processor()}, numpy {np.__version__}; {len(labels)} images, "
        f"{args.models} models, {args.classes} classes, {args.seeds} neighbour seeds"
    )
    start = time.perf_counter()
    fast = vectorised(logits, labels, args.classes, args.seeds)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    figure_b([f"m{i}" for i in range(args.models)], fast["rank_matrix"], {})
    t_fig = time.perf_counter() - start
    print(f"vectorised: {t_fast:.2f} s for all four analyses on {len(labels)} images (+ {t_fig:.2f} s for one figure)")
    n_loop = args.loop_n or args.n
    seeds = min(args.seeds, n_loop // 2)
    small, small_labels = fake_logits(n_loop, args.classes, args.models) if n_loop != args.n else (logits, labels)
    start = time.perf_counter()
    check = vectorised(small, small_labels, args.classes, seeds) if n_loop != args.n else fast
    t_small = time.perf_counter() - start if n_loop != args.n else t_fast
    start = time.perf_counter()
    slow = loop(small, small_labels, args.classes, seeds)
    t_loop = time.perf_counter() - start
    for key in ("rank_matrix", "error_ranks", "overlap", "overlap_control", "neighbours"):
        np.testing.assert_allclose(check[key], slow[key], atol=1e-9, err_msg=key)
    print(
        f"on {len(small_labels)} images and {seeds} neighbour seeds: numbers agree (rank matrix, error ranks, "
        f"AO@k and control, neighbours); per-example loop {t_loop:.1f} s, vectorised {t_small:.3f} s, "
        f"ratio {t_loop / t_small:.0f}x"
    )


if __name__ == "__main__":
    main()
