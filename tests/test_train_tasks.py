"""Detection metrics of binary targets (gllora.train.tasks): AUROC and TPR at a fixed FPR,
against cases counted by hand."""

import numpy as np
import pytest

from gllora.train import tasks


def test_auroc_hand_counted_with_a_tie():
    # Positives 0.9, 0.4, 0.35; negatives 0.8, 0.4, 0.1. Pairs (pos > neg): 0.9 beats all
    # three (3); 0.4 beats 0.1 and ties 0.4 (1.5); 0.35 beats 0.1 (1). 5.5 of 9 pairs.
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.35, 0.1])
    positive = np.array([True, False, True, False, True, False])
    assert tasks.auroc(scores, positive) == pytest.approx(5.5 / 9, abs=1e-12)
    # Negative control: flipping the labels gives the complement.
    assert tasks.auroc(scores, ~positive) == pytest.approx(3.5 / 9, abs=1e-12)
    assert np.isnan(tasks.auroc(scores, np.ones(6, bool)))


def test_stratified_auroc_counts_pairs_within_strata_only():
    # Stratum 0: positives 0.9, 0.2; negatives 0.5 -> pairs 0.9>0.5 (1), 0.2<0.5 (0): 1 of 2.
    # Stratum 1: positive 3.0; negatives 3.0, 1.0 -> a tie (0.5) and a win (1): 1.5 of 2.
    # Stratum 2: positives only: no pair. Across strata: 2.5 of 4.
    scores = np.array([0.9, 0.2, 0.5, 3.0, 3.0, 1.0, 7.0])
    positive = np.array([True, True, False, True, False, False, True])
    strata = np.array([0, 0, 0, 1, 1, 1, 2])
    got, sd = tasks.stratified_auroc(scores, positive, strata)
    assert got == pytest.approx(2.5 / 4, abs=1e-12)
    # Null spread: stratum 0 and 1 each P N (P + N + 1) / 12 = 2 * 4 / 12.
    assert sd == pytest.approx(np.sqrt(2 * (2 * 4 / 12)) / 4, abs=1e-12)
    # Negative control: the plain AUROC of the same scores counts cross-stratum pairs.
    assert tasks.auroc(scores, positive) != pytest.approx(got)


def test_stratified_auroc_of_a_confounder_alone_is_chance():
    """A score that is the stratum itself (the learning rate, binned) separates positives
    from negatives when positives sit in high strata (plain AUROC near 1), yet within
    strata it is a constant: exactly 0.5."""
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 8, 400)
    positive = rng.random(400) < strata / 10  # more positives in high strata
    assert tasks.auroc(strata.astype(float), positive) > 0.7
    got, _ = tasks.stratified_auroc(strata.astype(float), positive, strata)
    assert got == pytest.approx(0.5, abs=1e-12)
    assert all(np.isnan(tasks.stratified_auroc([1.0, 2.0], [True, False], [0, 1])))
    with pytest.raises(ValueError, match="one shape"):
        tasks.stratified_auroc([1.0, 2.0], [True, False], [0])


def test_tpr_at_fpr_hand_counted():
    # 200 negatives at 0..199, so 1% FPR allows 2 above the threshold: t = 197.
    neg = np.arange(200.0)
    pos = np.array([250.0, 198.0, 197.0, 196.5, 10.0])
    scores = np.concatenate([neg, pos])
    positive = np.concatenate([np.zeros(200, bool), np.ones(5, bool)])
    # Above 197: 250 and 198 (197 itself ties the threshold negative).
    assert tasks.tpr_at_fpr(scores, positive, 0.01) == pytest.approx(2 / 5)
    # No false alarm allowed: only 250 is above the top negative 199.
    assert tasks.tpr_at_fpr(scores, positive, 0.0) == pytest.approx(1 / 5)
    # Under 100 negatives, 1% allows none: the top negative is the threshold.
    small = np.array([5.0, 3.0, 4.0, 1.0])
    assert tasks.tpr_at_fpr(small, np.array([True, True, False, False]), 0.01) == 0.5
    with pytest.raises(ValueError, match="fpr must lie in"):
        tasks.tpr_at_fpr(small, np.array([True, True, False, False]), 1.0)


def test_binary_metrics_report_the_detection_metrics():
    target = tasks.Target("bad", "binary", ("bad",))
    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    y = np.array([[1.0], [0.0], [0.0], [1.0]])
    m = tasks.metrics([target], logits, y)["bad"]
    assert m["auroc"] == pytest.approx(0.5)  # 2.0 beats both, -3.0 beats none
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.5)  # only 2.0 is above 0.5
    assert m["accuracy"] == pytest.approx(0.5)
