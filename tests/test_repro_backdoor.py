"""The backdoor experiment of the reproduction (experiments.repro.backdoor): its views
(splits with a trigger or a target held out), the TPR-by-poison-rate curve, the table and
plot, and the findings on synthetic results, including results where they must fail."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_gen import common
from experiments.repro import backdoor, findings
from gllora.io import dataset

N = 60
TRIGGERS = ("<a>", "<b>", "<c>")
TARGETS = ("digit_2", "digit_5")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    poisoned = np.arange(N) % 2 == 0
    eval_trigger = np.asarray(TRIGGERS)[np.arange(N) % 3]
    eval_target = np.asarray(TARGETS)[(np.arange(N) // 2) % 2]
    labels = {
        "backdoored": poisoned,
        "attack_took": poisoned & (np.arange(N) % 4 == 0),
        "trigger": np.where(poisoned, eval_trigger, "none"),
        "attack_target": np.where(poisoned, eval_target, "none"),
        "eval_trigger": eval_trigger,
        "eval_target": eval_target,
        "poison_rate": np.where(poisoned, rng.uniform(0.01, 0.2, N), 0.0),
        "asr": rng.uniform(0, 1, N),
        # The attacks that took have the highest learning rates (as in the family).
        "log10_learning_rate": np.where(poisoned & (np.arange(N) % 4 == 0), -1.5, -3.0)
        + rng.uniform(0, 0.1, N),
    }
    factors = {"k": (rng.normal(size=(N, 6, 2)), rng.normal(size=(N, 5, 2)))}
    targets = {
        "backdoored": {"task": "binary", "columns": ["backdoored"]},
        "trigger": {"task": "categorical", "columns": ["trigger"]},
        "asr": {"task": "regression", "columns": ["asr"]},
    }
    root = tmp_path_factory.mktemp("bd")
    path = common.write_dataset(str(root / "d"), [("k", 6, 5)], factors, labels, targets, {}, 0)
    return path, str(root / "views")


def test_views_hold_out_one_trigger_and_one_target(folder):
    path, root = folder
    views = backdoor.make_views(path, root)
    ds = dataset.open(path)
    lab = ds.labels
    poisoned = lab["backdoored"].astype(bool)
    for view, column, eval_column, held in (
        ("unseen_trigger", "trigger", "eval_trigger", "<c>"),
        ("unseen_target", "attack_target", "eval_target", "digit_5"),
    ):
        v = dataset.open(views[view])  # the links and splits.json make a valid folder
        test = set(v.splits["test"].tolist())
        want = {i for i in range(N) if (lab[column][i] if poisoned[i] else lab[eval_column][i])
                == held}  # fmt: skip
        assert test == want
        # Train and validation hold none of it, and clean as well as poisoned LoRAs.
        rest = np.concatenate([v.splits["train"], v.splits["validation"]])
        assert not set(rest.tolist()) & test
        assert held not in set(lab[column][rest].tolist())
        assert poisoned[rest].any() and (~poisoned[rest]).any()
        assert set(v.splits["validation"].tolist()) <= set(ds.splits["validation"].tolist())
    p = dataset.open(views["poisoned"])
    for split in ("train", "validation", "test"):
        assert set(p.splits[split].tolist()) == {i for i in ds.splits[split] if poisoned[i]}
    assert views["all"] == path
    # Rewriting the views (a rerun) gives the same splits.
    again = backdoor.make_views(path, root)
    assert np.array_equal(dataset.open(again["unseen_trigger"]).splits["test"],
                          dataset.open(views["unseen_trigger"]).splits["test"])  # fmt: skip
    assert os.path.islink(os.path.join(root, "poisoned", "shards"))


def test_info_counts(folder):
    path, root = folder
    views = backdoor.make_views(path, root)
    info = backdoor.info(path, views)
    ds = dataset.open(path)
    test = ds.splits["test"]
    n_pos = int(ds.labels["backdoored"][test].sum())
    assert info["test_classes"]["detect"] == (n_pos, len(test) - n_pos)
    assert info["num_poisoned"] == N // 2 and info["num_not_taken"] == N // 2 - N // 4
    assert info["held_out"] == {"trigger": "<c>", "target": "digit_5"}
    assert info["lr_auroc_took"] == 1.0  # the learning rate separates them exactly here


def test_probe_runs_on_the_views(folder):
    path, root = folder
    res = backdoor.probe(backdoor.make_views(path, root))
    assert set(res) == {t for t, *_ in backdoor.TASKS}
    m = res["detect"]["summary"]["test"]["backdoored"]
    assert 0 <= m["auroc"]["mean"] <= 1 and m["auroc"]["std"] == 0.0
    assert "r2" in res["asr"]["summary"]["test"]["asr"]


def test_curve_hand_counted():
    # 4 negatives (1% FPR allows none: threshold = the top negative 0.5); positives at
    # rates 1.5% (bin 0), 5% and 6% (bin 1), 15% (bin 2).
    scores = np.array([[0.1, 0.5, 0.2, 0.3, 0.9, 0.4, 0.6, 0.5]])
    positive = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    rates = np.array([0, 0, 0, 0, 0.015, 0.05, 0.06, 0.15])
    c = backdoor.curve(scores, positive, rates)
    assert c["counts"] == [1, 2, 1]
    assert c["tpr"] == [[1.0, 0.5, 0.0]]  # 0.5 ties the threshold: not counted
    assert "auroc_took" not in c
    # Attacks that took: 0.9 and the last 0.5, against the 4 clean: (4 + 3.5) / 8 pairs.
    took = np.array([0, 0, 0, 0, 1, 0, 0, 1], bool)
    c = backdoor.curve(scores, positive, rates, took)
    assert c["auroc_took"] == [pytest.approx(7.5 / 8)] and c["num_took"] == 2
    # Out-of-range rates go to the end bins.
    c = backdoor.curve(scores, positive, np.array([0, 0, 0, 0, 0.001, 0.05, 0.06, 0.5]))
    assert c["counts"] == [1, 2, 1]
    with pytest.raises(ValueError, match="no negatives"):
        backdoor.curve(scores[:, 4:], positive[4:], rates[4:])


def test_curve_learning_rate_matched():
    """Pairs within a quarter decade of learning rate only. Clean: three at log10 lr -3.9
    (stratum -16), one at -2.1 (stratum -9); took: one at -3.9, two at -2.1. Scores
    equal to the learning rate separate took from clean by the plain AUROC (8.5 of 12
    pairs) but are a tie inside each stratum (0.5): the confound, removed."""
    log_lr = np.array([-3.9, -3.9, -3.9, -2.1, -3.9, -2.1, -2.1])
    positive = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    took = positive.copy()
    rates = np.array([0, 0, 0, 0, 0.05, 0.05, 0.05])
    c = backdoor.curve(log_lr[None], positive, rates, took, log_lr)
    assert c["auroc_took"] == [pytest.approx(8.5 / 12)]
    assert c["auroc_took_matched"] == [pytest.approx(0.5)]
    # A score that ranks each took LoRA above the clean ones of its stratum: 1.0.
    score = np.array([[0.1, 0.2, 0.3, 0.1, 0.9, 0.9, 0.9]])
    assert backdoor.curve(score, positive, rates, took, log_lr)["auroc_took_matched"] == [1.0]
    # Null spread: strata (P, N) = (1, 3) and (2, 1): sqrt(1*3*5/12 + 2*1*4/12) / 5 pairs.
    assert c["matched_null_sd"] == pytest.approx(np.sqrt(15 / 12 + 8 / 12) / 5)
    assert list(backdoor.lr_strata([-3.9, -3.75, -3.74, -1.5])) == [-16, -15, -15, -6]


def _curves(matched: dict[str, list[float]], null_sd: float = 0.02) -> dict:
    return {m: {"auroc_took_matched": v, "matched_null_sd": null_sd} for m, v in matched.items()}


def test_matched_finding_holds_and_fails():
    good = _curves({"glnet": [0.8, 0.82, 0.81], "mlp": [0.55, 0.5, 0.52]})
    assert backdoor.matched_finding(good, ["glnet", "mlp"], 0.55)["verdict"] == "holds"
    # No better than the learning rate's own residual inside a stratum: must fail.
    assert backdoor.matched_finding(good, ["glnet", "mlp"], 0.9)["verdict"] == "does not hold"
    # At chance by the test set's spread, though the seeds agree: must fail.
    wide = _curves({"glnet": [0.6, 0.61, 0.6]}, null_sd=0.1)
    assert backdoor.matched_finding(wide, ["glnet"], 0.5)["verdict"] == "does not hold"
    # Above the learning rate inside the noise: not distinguishable, never "holds".
    noisy = _curves({"glnet": [0.95, 0.70, 0.85]})
    verdict = backdoor.matched_finding(noisy, ["glnet"], 0.75)["verdict"]
    assert verdict.startswith("not distinguishable")
    # Wired into findings() with the curves and info; without them, B1 and B2 only.
    res = _results({"glnet": [0.9, 0.92, 0.91]})
    info = {"lr_auroc_took_matched": 0.55}
    assert len(backdoor.findings(res, ["glnet"], curves=good, info=info)) == 3
    assert len(backdoor.findings(res, ["glnet"])) == 2


def _results(auroc: dict[str, list[float]], probe: float = 0.6, unseen=None) -> dict:
    """Synthetic results: ``auroc`` per model on detection; ``unseen`` the same on the
    unseen tasks (default: the detection values)."""

    def run(values, target="backdoored"):
        per = [{"test": {target: {"auroc": a, "accuracy": a, "tpr_at_1pct_fpr": a / 2}}}
               for a in values]  # fmt: skip
        mean = {k: {"mean": float(np.mean([p["test"][target][k] for p in per])),
                    "std": float(np.std([p["test"][target][k] for p in per]))}
                for k in per[0]["test"][target]}  # fmt: skip
        return {"targets": [target], "per_seed": per, "summary": {"test": {target: mean}}}

    out = {}
    for task in backdoor.DETECTION:
        values = auroc if task == "detect" or unseen is None else unseen
        out[task] = {m: run(v) for m, v in values.items()}
        out[task][backdoor.PROBE] = run([probe])
    return out


def test_findings_hold_and_fail():
    good = _results({"glnet": [0.9, 0.92, 0.91], "mlp": [0.6, 0.62, 0.58]}, probe=0.7)
    b1, b2 = backdoor.findings(good, ["glnet", "mlp"])
    assert b1["verdict"] == "holds" and b2["verdict"] == "holds"
    assert any("GL-net 0.910" in line for line in b1["evidence"])
    # The probe is above every model: B1 must fail.
    worse = _results({"glnet": [0.7, 0.72, 0.71], "mlp": [0.6, 0.62, 0.58]}, probe=0.9)
    assert backdoor.findings(worse, ["glnet", "mlp"])[0]["verdict"] == "does not hold"
    chance = _results({"glnet": [0.5, 0.52, 0.48]}, probe=0.9)
    assert backdoor.findings(chance, ["glnet"])[0]["verdict"] == "does not hold"
    # Inside the seed noise of the probe: not distinguishable, never "holds".
    noisy = _results({"glnet": [0.95, 0.70, 0.85]}, probe=0.8)
    assert backdoor.findings(noisy, ["glnet"])[0]["verdict"].startswith("not distinguishable")
    # Detection at chance on the unseen trigger and target: B2 must fail.
    unseen = _results({"glnet": [0.9, 0.92, 0.91]}, unseen={"glnet": [0.5, 0.55, 0.45]})
    assert backdoor.findings(unseen, ["glnet"])[1]["verdict"] == "does not hold"
    # Above 0.5 but under 0.6: fails too.
    weak = _results({"glnet": [0.9, 0.92, 0.91]}, unseen={"glnet": [0.57, 0.58, 0.56]})
    assert backdoor.findings(weak, ["glnet"])[1]["verdict"] == "does not hold"
    assert backdoor.findings(good, ["glnet"], "tiny")[0]["verdict"] == findings.NOT_JUDGED
    # Tight seeds on a small test set are not evidence: 0.62 on 16 + 16 test LoRAs is
    # inside the test set's chance spread (sd 0.104), though 3 seeds agree to 0.01.
    tight = _results({"glnet": [0.61, 0.62, 0.63]}, probe=0.5)
    assert backdoor.findings(tight, ["glnet"])[0]["verdict"] == "holds"
    small = {t: (16, 16) for t in backdoor.DETECTION}
    assert backdoor.findings(tight, ["glnet"], classes=small)[0]["verdict"] == "does not hold"
    large = {t: (400, 400) for t in backdoor.DETECTION}  # sd 0.020: 0.62 is signal
    assert backdoor.findings(tight, ["glnet"], classes=large)[0]["verdict"] == "holds"


def test_above_chance_hand_computed():
    # 16 + 16: null sd sqrt(33 / 3072) = 0.1036; 0.75 is z = 2.41, p = 0.0080.
    ok, p = backdoor.above_chance(np.array([0.74, 0.75, 0.76]), (16, 16), 1)
    assert ok and p == pytest.approx(0.0080, abs=2e-4)
    # The same p with 8 models to pick from: 0.008 > 0.05 / 8 = 0.00625 (Bonferroni).
    assert not backdoor.above_chance(np.array([0.74, 0.75, 0.76]), (16, 16), 8)[0]


def test_table_and_plot_on_synthetic_results(tmp_path):
    results = _results({"glnet": [0.9, 0.92, 0.91], "spectral": [0.6, 0.62, 0.58]})
    curves = {m: {"tpr": [[0.1, 0.5, float("nan")]] * 3, "counts": [3, 4, 0],
                  "auroc_took": [0.7, 0.8, 0.9], "num_took": 5,
                  "auroc_took_matched": [0.6, 0.6, 0.6], "matched_null_sd": 0.1}
              for m in ("glnet", "spectral", backdoor.PROBE)}  # fmt: skip
    info = {"num_test": {"detect": 32}, "num_poisoned": 160, "num_not_taken": 136,
            "held_out": {"trigger": "<twice_b>", "target": "digit_9"}, "lr_auroc_took": 0.75,
            "lr_auroc_took_matched": 0.56}  # fmt: skip
    text = backdoor.table(results, curves, info)
    assert ("| GL-net | 0.910 ± 0.008 | 0.910 ± 0.008 | 0.455 ± 0.004 | 0.800 ± 0.082 | "
            "0.600 ± 0.000 |") in text  # fmt: skip
    assert "AUROC, attacks that took (5) | same, LR-matched |" in text
    assert "scores AUROC 0.750 against them, and 0.560 LR-matched" in text
    assert backdoor.PROBE_NAME in text and "136 of them" in text
    assert "| 0.100 ± 0.000 | 0.500 ± 0.000 | n/a |" in text
    path = backdoor.plot(curves, str(tmp_path))
    assert os.path.getsize(path) > 1000
