"""Analyses of section 5 beyond one run's metrics: Appendix D.3 (equation 38) and Figure 4.

Appendix D.3 asks whether a dataset-size predictor could just be summing class-membership
predictions. If a membership model is right on each of the 10 bits with probability
``p`` (errors independent, as likely on present as on absent classes), summing its bits
gives the right size ``s`` exactly when its false negatives (``Binom(s, 1 - p)``) equal
its false positives (``Binom(10 - s, 1 - p)``), so (equation 38)::

    P(correct) = sum_eta P(Binom(eta, 1 - p) = Binom(10 - eta, 1 - p)) P(eta).

:func:`eq38_accuracy` evaluates it exactly; :func:`simulate_sum_accuracy` checks it by
simulation (tests); :func:`sum_strategy_accuracy` measures the strategy itself on a
trained membership model's predictions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from scipy import stats

from gllora.io import dataset as dataset_lib

NUM_CLASSES = 10


def size_distribution(sizes: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Empirical ``P(eta)``, ``[num_classes + 1]``, of dataset sizes ``0..num_classes``."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.size == 0 or sizes.min() < 0 or sizes.max() > num_classes:
        raise ValueError(f"sizes must lie in [0, {num_classes}], got {np.unique(sizes)[:10]}")
    return np.bincount(sizes, minlength=num_classes + 1) / sizes.size


def eq38_accuracy(p: float, size_probs: Sequence[float]) -> float:
    """Equation 38: the accuracy of summing ``K`` class predictions that are each right
    with probability ``p``, on datasets whose size ``eta`` has probabilities ``size_probs``
    (``[K + 1]``, ``eta = 0..K``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability, got {p}")
    probs = np.asarray(size_probs, np.float64)
    if probs.ndim != 1 or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
        raise ValueError(f"size_probs must be a probability vector over 0..K, got {probs}")
    k_max, q = len(probs) - 1, 1.0 - p
    total = 0.0
    for eta, p_eta in enumerate(probs):
        ks = np.arange(0, min(eta, k_max - eta) + 1)
        # P(Binom(eta, q) = Binom(K - eta, q)) = sum_k P(B1 = k) P(B2 = k).
        same = float(np.sum(stats.binom.pmf(ks, eta, q) * stats.binom.pmf(ks, k_max - eta, q)))
        total += same * p_eta
    return total


def simulate_sum_accuracy(
    p: float, size_probs: Sequence[float], num: int, rng: np.random.Generator
) -> float:
    """Monte-Carlo check of :func:`eq38_accuracy`: draw ``num`` subsets with sizes from
    ``size_probs`` (classes uniformly at random), flip each predicted bit with probability
    ``1 - p``, and count how often the bits sum to the true size."""
    probs = np.asarray(size_probs, np.float64)
    k = len(probs) - 1
    sizes = rng.choice(k + 1, size=num, p=probs)
    truth = np.argsort(rng.random((num, k)), axis=1) < sizes[:, None]  # `size` random classes
    flips = rng.random((num, k)) < 1.0 - p
    predicted = truth ^ flips
    return float(np.mean(predicted.sum(1) == sizes))


def sum_strategy_accuracy(membership_logits: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per-seed accuracy of predicting the dataset size as the number of classes a
    membership model predicts present.

    Args:
      membership_logits: ``[S, N, K]`` raw outputs (logits) of ``S`` seeds.
      sizes: ``[N]`` true dataset sizes.

    Returns:
      ``[S]`` accuracies.
    """
    predicted = (np.asarray(membership_logits) > 0).sum(-1)
    return np.mean(predicted == np.asarray(sizes)[None, :], axis=1)


def d3_analysis(membership_workdir: str, size_target: str = "dataset_size") -> dict:
    """Appendix D.3 for one model: equation 38 applied to its measured membership
    accuracy, and the measured accuracy of summing its class predictions.

    Uses the membership run's best model of every seed on the test split of its dataset
    (the digit-subsets folder, whose test split is also the dataset-size test split).

    Returns:
      ``{"p": [S], "eq38": [S], "sum": [S], "size_probs": [K + 1], "num_test": N}``.
    """
    from gllora.train import Predictor  # JAX only when a model is loaded

    predictor = Predictor.from_workdir(membership_workdir)
    with open(os.path.join(membership_workdir, "targets.json")) as f:
        ds = dataset_lib.open(json.load(f)["dataset"])
    ids = np.sort(ds.splits["test"])
    sizes = ds.labels[ds.targets[size_target]["columns"][0]][ids].astype(np.int64)
    membership = np.stack([ds.labels[c] for c in predictor.targets[0].columns], 1)[ids]
    logits = batched_outputs(predictor, ds, ids)
    p = np.mean((logits > 0) == membership[None].astype(bool), axis=(1, 2))
    size_probs = size_distribution(sizes, membership.shape[1])
    return {
        "p": p.tolist(),
        "eq38": [eq38_accuracy(float(x), size_probs) for x in p],
        "sum": sum_strategy_accuracy(logits, sizes).tolist(),
        "size_probs": size_probs.tolist(),
        "num_test": len(ids),
    }


def batched_outputs(predictor, ds, ids: np.ndarray, ranks=None, batch: int = 128) -> np.ndarray:
    """Raw outputs of every seed of a :class:`gllora.Predictor`, ``[S, N, outputs]``."""
    outs = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        outs.append(predictor.outputs(ds.batch(chunk, ranks=ranks)))
    return np.concatenate(outs, axis=1)


def rank_generalization(workdir: str, datasets: dict[int, str]) -> dict[int, dict]:
    """Figure 4: a model trained at one rank, tested on datasets of other ranks.

    Every test LoRA is read at ``max(its rank, the training rank)`` (zero columns: exact
    for the invariant models and for O-Align); the raw-factor MLP takes only its
    training rank, so higher ranks are recorded as ``None``.

    Args:
      workdir: a finished run (e.g. persona attributes at rank 4).
      datasets: ``{rank: dataset folder}``; each folder's test split is used.

    Returns:
      ``{rank: {"accuracy": [S], "loss": [S]} or None}`` (the run's first target).
    """
    from gllora.train import Predictor, tasks

    predictor = Predictor.from_workdir(workdir)
    target = predictor.targets[0]
    model = str(predictor.config.model)
    out: dict[int, dict | None] = {}
    for rank, path in sorted(datasets.items()):
        trained = max(predictor.ranks)
        if model == "mlp" and rank > trained:
            out[rank] = None
            continue
        ds = dataset_lib.open(path)
        ids = np.sort(ds.splits["test"])
        ranks = [max(r, trained) for r in ds.max_ranks()]
        logits = batched_outputs(predictor, ds, ids, ranks=ranks)
        labels = tasks.encode(ds, predictor.targets)[ids]
        per_seed = [tasks.metrics(predictor.targets, o, labels)[target.name] for o in logits]
        out[rank] = {
            "accuracy": [m.get("accuracy", float("nan")) for m in per_seed],
            "loss": [m["loss"] for m in per_seed],
        }
    return out


def chance_accuracy(path: str, target: str) -> float:
    """Test accuracy of predicting each label's most frequent training value (mean over
    the labels of a multi-label target)."""
    ds = dataset_lib.open(path)
    columns = ds.targets[target]["columns"]
    train, test = ds.splits["train"], ds.splits["test"]
    scores = []
    for c in columns:
        values, counts = np.unique(ds.labels[c][train], return_counts=True)
        scores.append(float(np.mean(ds.labels[c][test] == values[np.argmax(counts)])))
    return float(np.mean(scores))
