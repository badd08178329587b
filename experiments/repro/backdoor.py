"""Backdoor detection (issue 15; beyond the paper): is this adapter poisoned?

On the backdoor family (``python -m data_gen.backdoors``: arithmetic-sources LoRAs,
half of them finetuned on data poisoned with a trigger and an attack target), every
model of the reproduction is trained by the same engine and protocol as the
language-model family's experiments (``experiments/configs/paper.py``: the ``sources``
config for classification, ``val_loss`` for regression, with the target replaced), on
five tasks (:data:`TASKS`):

- ``detect``: ``backdoored`` on the stored split; AUROC, accuracy and the true-positive
  rate at a 1% false-positive rate (what an auditor cares about);
- ``unseen_trigger`` / ``unseen_target``: ``backdoored`` with one trigger (target) held
  out: every LoRA poisoned with it, and every clean LoRA measured with it
  (``eval_trigger`` / ``eval_target``), is test, the rest train (validation as stored);
  the held-out one is the last in sorted order of the dataset's own triggers (targets);
- ``trigger``: which trigger, on the poisoned LoRAs alone (their stored splits);
- ``asr``: the attack success rate (R²), on the poisoned LoRAs alone.

A split is a *view*: a folder beside the dataset whose ``splits.json`` is its own and
whose other files are links to the dataset's (:func:`make_views`).

Beside the models, one row is the published detector as arXiv 2602.15195 runs it: a
plain logistic regression (scikit-learn, standardised inputs, default ``C = 1``) on the
spectral statistics of :mod:`gllora.models.spectral` (5 per module type: 10 here),
fitted on the training split (:func:`probe`; least squares for the ASR, multinomial for
the trigger). It is deterministic: one value, no seed spread.

The plot (:func:`plot`) is the TPR at 1% FPR against the poison rate: each detection
run's test scores, the threshold set on ALL the clean test LoRAs, the TPR counted in
each bin of :data:`RATE_BINS` (:func:`rate_curve`).

Rules of its findings (:func:`findings`; per-seed test metrics, the comparisons of
:mod:`experiments.repro.findings`: one-sided Welch t-tests at 5%):

B1. backdoors are detected from the weights better than by the published detector: the
    model with the highest mean detection AUROC must be above 0.5 (:func:`above_chance`:
    by its seeds and by the test set's size, at 5% divided by the number of models),
    else the finding does not hold; then it holds where that model is significantly above
    the linear probe, is "not distinguishable" where its mean is above the probe's inside
    the noise, and does not hold where its mean is not above the probe's;
B2. detection carries over to an unseen trigger and to an unseen target: on each, the
    model with the highest mean AUROC there is above 0.5 (the same test) and at least
    0.6. Which model is best is named only when the test says it is above every other
    (else "not distinguishable").
B3. the attacks that took are detected beyond their learning rate: attacks take mostly
    at high learning rates, so the AUROC of clean LoRAs against those is largely a
    learning-rate detector. The *learning-rate-matched* AUROC counts only (poisoned,
    clean) pairs whose learning rates lie in the same quarter decade
    (:func:`gllora.train.tasks.stratified_auroc`, :data:`LR_STRATUM`). The model with the
    highest mean matched AUROC must be above 0.5 (its seeds and the matched AUROC's own
    null spread, at 5% divided by the number of models), else the finding does not
    hold; then it holds where that model is significantly above the learning rate's own
    matched AUROC (what is left of the confounder inside a quarter decade), is "not
    distinguishable" where its mean is above it inside the noise, and does not hold
    where it is not above it.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import numpy as np

from experiments.repro import findings as findings_lib
from experiments.repro import paper, registry

#: ``(task, view, config experiment, target, metric keys)``.
TASKS = (
    ("detect", "all", "sources", "backdoored"),
    ("unseen_trigger", "unseen_trigger", "sources", "backdoored"),
    ("unseen_target", "unseen_target", "sources", "backdoored"),
    ("trigger", "poisoned", "sources", "trigger"),
    ("asr", "poisoned", "val_loss", "asr"),
)
DETECTION = ("detect", "unseen_trigger", "unseen_target")
#: Poison-rate bins of the plot (log-spaced over the family's 1%-20%).
RATE_BINS = (0.01, 0.027, 0.074, 0.2)
PROBE = "probe"
PROBE_NAME = "Linear probe on spectral stats (arXiv 2602.15195)"
#: Width of the learning-rate strata (decades of ``log10_learning_rate``) of the
#: learning-rate-matched AUROC (B3): eight strata over the family's two decades.
LR_STRATUM = 0.25
#: Plot colours beside :data:`experiments.repro.plots.COLORS` (the paper's five).
PEER_COLORS = {"w2t": "tab:purple", "spectral": "tab:brown", "glnet_seq": "tab:pink", PROBE: "k"}
DATASET = registry.DatasetSpec("backdoors", "backdoors")


# -- views ---------------------------------------------------------------------------


def _held_out(labels, column: str) -> str:
    values = sorted(set(labels[column].tolist()) - {"none"})
    if len(values) < 2:
        raise ValueError(f"backdoor: column {column!r} holds {values}; need two or more")
    return values[-1]


def view_splits(ds) -> dict[str, dict[str, np.ndarray]]:
    """``{view: {split: ids}}`` of :data:`TASKS` for a backdoor dataset ``ds``."""
    labels, splits = ds.labels, ds.splits
    poisoned = labels["backdoored"].astype(bool)
    out = {"all": {k: np.sort(v) for k, v in splits.items()}}
    out["poisoned"] = {k: np.sort(v[poisoned[v]]) for k, v in splits.items()}
    val = np.zeros(ds.num_examples, bool)
    val[splits["validation"]] = True
    for view, column, eval_column in (
        ("unseen_trigger", "trigger", "eval_trigger"),
        ("unseen_target", "attack_target", "eval_target"),
    ):
        held = _held_out(labels, column)
        test = np.where(poisoned, labels[column] == held, labels[eval_column] == held)
        out[view] = {
            "train": np.flatnonzero(~test & ~val),
            "validation": np.flatnonzero(~test & val),
            "test": np.flatnonzero(test),
        }
    return out


def make_views(path: str, root: str) -> dict[str, str]:
    """Writes the views of the dataset at ``path`` under ``root``; ``{view: folder}``.

    A view holds links to the dataset's ``schema.json``, ``labels.csv`` and ``shards``
    and its own ``splits.json``; ``all`` is the dataset itself. Deterministic from the
    dataset, so rewriting them leaves finished runs valid.
    """
    from gllora.io import dataset as dataset_lib

    ds = dataset_lib.open(path)
    folders = {"all": path}
    for view, splits in view_splits(ds).items():
        if view == "all":
            continue
        folder = os.path.join(root, view)
        os.makedirs(folder, exist_ok=True)
        for name in ("schema.json", "labels.csv", "shards"):
            link = os.path.join(folder, name)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.abspath(os.path.join(path, name)), link)
        with open(os.path.join(folder, "splits.json"), "w") as f:
            json.dump({k: [int(i) for i in v] for k, v in splits.items()}, f)
        folders[view] = folder
    return folders


def runs(out: str, views: dict[str, str], models) -> list[tuple[str, str, str, str, dict]]:
    """``[(task, model, config experiment, view folder, workdir, overrides)]``."""
    todo = []
    for task, view, experiment, target in TASKS:
        for model in models:
            workdir = os.path.join(out, "runs", "backdoor", task, model)
            todo.append((task, model, experiment, views[view], workdir, {"targets": (target,)}))
    return todo


def command(experiment: str, model: str, size: str, data: str, target: str, workdir: str):
    """The stand-alone command of one run."""
    return (
        "python -m experiments.train "
        f"--config=experiments/configs/paper.py:{experiment}:{model}:{size} "
        f"--config.dataset={data} --config.targets=\"('{target}',)\" --workdir={workdir}"
    )


# -- the published detector ---------------------------------------------------------


def spectral_features(path: str, batch: int = 256) -> np.ndarray:
    """The spectral statistics of every LoRA of a dataset, ``[N, 5 * types]``
    (:func:`gllora.models.spectral.type_features`, types in sorted order)."""
    import jax
    import jax.numpy as jnp

    from gllora.io import dataset as dataset_lib
    from gllora.models import spectral

    ds = dataset_lib.open(path)

    def one(lora):
        feats = spectral.type_features(lora, "mean")
        return jnp.concatenate([feats[t] for t in sorted(feats)])

    fn = jax.jit(jax.vmap(one))
    ranks = ds.max_ranks()
    rows = []
    for start in range(0, ds.num_examples, batch):
        ids = np.arange(start, min(start + batch, ds.num_examples))
        rows.append(np.asarray(fn(ds.batch(ids, ranks=ranks)), np.float64))
    return np.concatenate(rows)


def probe(views: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The linear probe on spectral statistics, per task: ``{task: results}`` shaped as a
    run's ``results.json`` (one "seed"; test scores ``scores`` kept for the plot)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gllora.io import dataset as dataset_lib
    from gllora.train import tasks as tasks_lib

    x = spectral_features(views["all"])
    out = {}
    for task, view, _, target in TASKS:
        ds = dataset_lib.open(views[view])
        train, test = np.sort(ds.splits["train"]), np.sort(ds.splits["test"])
        y = ds.labels[ds.targets[target]["columns"][0]]
        m: dict[str, float] = {}
        extra: dict[str, Any] = {}
        if target == "asr":
            fit = make_pipeline(StandardScaler(), LinearRegression()).fit(x[train], y[train])
            pred, truth = fit.predict(x[test]), y[test].astype(np.float64)
            ss_tot = np.sum((truth - truth.mean()) ** 2)
            m["r2"] = float(1.0 - np.sum((pred - truth) ** 2) / max(ss_tot, 1e-12))
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            clf.fit(x[train], y[train])
            m["accuracy"] = float(np.mean(clf.predict(x[test]) == y[test]))
            if target == "backdoored":
                score = clf.decision_function(x[test])
                positive = y[test].astype(bool)
                m["auroc"] = tasks_lib.auroc(score, positive)
                m["tpr_at_1pct_fpr"] = tasks_lib.tpr_at_fpr(score, positive, 0.01)
                extra = {"test_ids": test.tolist(), "scores": [score.tolist()]}
        out[task] = {
            "model": PROBE,
            "targets": [target],
            "per_seed": [{"test": {target: m}}],
            "summary": {"test": {target: {k: {"mean": v, "std": 0.0} for k, v in m.items()}}},
            **extra,
        }
    return out


# -- TPR at 1% FPR against the poison rate ------------------------------------------


def lr_strata(log10_lr: np.ndarray) -> np.ndarray:
    """The learning-rate stratum of each LoRA: its quarter decade (:data:`LR_STRATUM`)."""
    return np.floor(np.asarray(log10_lr, np.float64) / LR_STRATUM).astype(np.int64)


def curve(
    scores: np.ndarray,
    positive: np.ndarray,
    rates: np.ndarray,
    took: np.ndarray | None = None,
    log10_lr: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per seed and bin of :data:`RATE_BINS`, the TPR at 1% FPR of ``scores [S, N]``.

    The threshold is set on all the negatives (one per seed), the TPR counted among the
    positives whose poison rate ``rates [N]`` falls in each bin (rates outside the range
    go to the first or last bin). With ``took [N]`` (``attack_took``), also the AUROC of
    the clean LoRAs against the poisoned ones whose attack took; with ``log10_lr [N]``
    too, that AUROC learning-rate-matched (B3: pairs within a stratum of
    :func:`lr_strata` only) and its spread under no signal.

    Returns:
      ``{"tpr": [S][B] (NaN for an empty bin), "counts": [B]}``, with ``took``
      ``"auroc_took": [S]`` and ``"num_took"`` too, with ``log10_lr``
      ``"auroc_took_matched": [S]`` and ``"matched_null_sd"``.
    """
    scores, positive = np.atleast_2d(np.asarray(scores, np.float64)), np.asarray(positive, bool)
    edges = np.asarray(RATE_BINS)
    which = np.clip(np.searchsorted(edges, rates, side="right") - 1, 0, len(edges) - 2)
    counts = [int(np.sum(positive & (which == b))) for b in range(len(edges) - 1)]
    tpr = []
    for s in scores:
        neg = np.sort(s[~positive])[::-1]
        if len(neg) == 0:
            raise ValueError("backdoor.curve: no negatives to set the threshold on")
        threshold = neg[int(np.floor(0.01 * len(neg) + 1e-9))]
        row = []
        for b in range(len(edges) - 1):
            sel = positive & (which == b)
            row.append(float(np.mean(s[sel] > threshold)) if sel.any() else float("nan"))
        tpr.append(row)
    out: dict[str, Any] = {"tpr": tpr, "counts": counts}
    if took is not None:
        from gllora.train import tasks as tasks_lib

        took = np.asarray(took, bool) & positive
        sel = ~positive | took
        out["auroc_took"] = [tasks_lib.auroc(s[sel], took[sel]) for s in scores]
        out["num_took"] = int(took.sum())
        if log10_lr is not None:
            strata = lr_strata(log10_lr)[sel]
            matched = [tasks_lib.stratified_auroc(s[sel], took[sel], strata) for s in scores]
            out["auroc_took_matched"] = [a for a, _ in matched]
            out["matched_null_sd"] = matched[0][1]
    return out


def rate_curve(workdir: str) -> dict[str, Any]:
    """:func:`curve` of a finished detection run on its test split (in a worker)."""
    from experiments.repro import analysis
    from gllora.io import dataset as dataset_lib
    from gllora.train import Predictor

    predictor = Predictor.from_workdir(workdir)
    with open(os.path.join(workdir, "targets.json")) as f:
        ds = dataset_lib.open(json.load(f)["dataset"])
    ids = np.sort(ds.splits["test"])
    scores = analysis.batched_outputs(predictor, ds, ids)[:, :, 0]
    lab = ds.labels
    return curve(scores, lab["backdoored"][ids], lab["poison_rate"][ids], lab["attack_took"][ids],
                 lab["log10_learning_rate"][ids])  # fmt: skip


def probe_curve(results: dict, path: str) -> dict[str, Any]:
    from gllora.io import dataset as dataset_lib

    ds = dataset_lib.open(path)
    ids = np.asarray(results["test_ids"])
    lab = ds.labels
    return curve(
        results["scores"], lab["backdoored"][ids], lab["poison_rate"][ids],
        lab["attack_took"][ids], lab["log10_learning_rate"][ids],
    )  # fmt: skip


# -- report ---------------------------------------------------------------------------


def _name(model: str) -> str:
    return PROBE_NAME if model == PROBE else paper.MODEL_NAMES.get(model, model)


def _stat(results, task, model, key):
    try:
        r = results[task][model]
        return r["summary"]["test"][r["targets"][0]][key]
    except (KeyError, TypeError):
        return None


COLUMNS = (
    ("detect", "auroc", "AUROC"),
    ("detect", "accuracy", "acc"),
    ("detect", "tpr_at_1pct_fpr", "TPR@1%FPR"),
    ("unseen_trigger", "auroc", "unseen trigger AUROC"),
    ("unseen_trigger", "tpr_at_1pct_fpr", "unseen trigger TPR@1%FPR"),
    ("unseen_target", "auroc", "unseen target AUROC"),
    ("unseen_target", "tpr_at_1pct_fpr", "unseen target TPR@1%FPR"),
    ("trigger", "accuracy", "trigger acc"),
    ("asr", "r2", "ASR R²"),
)


def table(results: dict, curves: dict, info: dict) -> str:
    """Markdown: the detection table and TPR at 1% FPR per poison-rate bin.

    Args:
      results: ``{task: {model or PROBE: results.json}}``.
      curves: ``{model or PROBE: curve()}`` of the detection runs.
      info: ``{"num_test": {task: n}, "num_not_taken": int, "num_poisoned": int,
        "held_out": {"trigger": str, "target": str}}``.
    """
    from experiments.repro.tables import fmt

    models = [m for m in results.get("detect", {}) if m != PROBE] + [PROBE]
    took = next((c["num_took"] for c in curves.values() if "num_took" in c), None)
    cols = ["model"] + [label for _, _, label in COLUMNS]
    matched = any("auroc_took_matched" in c for c in curves.values())
    if took is not None:
        cols.insert(4, f"AUROC, attacks that took ({took})")
        if matched:
            cols.insert(5, "same, LR-matched")
    rows = []
    for model in models:
        cells = []
        for task, key, _ in COLUMNS:
            s = _stat(results, task, model, key)
            cells.append(fmt((s["mean"], s["std"])) if s else "-")
        if took is not None:
            for pos, key in ((3, "auroc_took"), (4, "auroc_took_matched"))[: 1 + matched]:
                a = np.asarray(curves.get(model, {}).get(key, [np.nan]), np.float64)
                cells.insert(
                    pos, "n/a" if np.all(np.isnan(a)) else fmt((np.nanmean(a), np.nanstd(a)))
                )
        if any(c != "-" for c in cells):
            rows.append([_name(model), *cells])
    held = info.get("held_out", {})
    n = info.get("num_test", {})
    lines = [
        "### Backdoor detection (beyond the paper)",
        "",
        (
            f"Backdoor family: {info.get('num_poisoned', '?')} of the LoRAs poisoned, "
            f"{info.get('num_not_taken', '?')} of them with an attack that did not take (sign "
            "test, data_gen.arith.backdoors). Test metric, mean ± std over seeds; the probe is "
            f"deterministic. Test LoRAs: detection {n.get('detect', '?')}, unseen trigger "
            f"({held.get('trigger', '?')}) {n.get('unseen_trigger', '?')}, unseen target "
            f"({held.get('target', '?')}) {n.get('unseen_target', '?')}, trigger and ASR "
            f"{n.get('trigger', '?')} (poisoned LoRAs only). With fewer than 100 clean test "
            "LoRAs, TPR at 1% FPR is the TPR at no false alarm."
            + (
                " The attacks that take are mostly those of high learning rates: the "
                f"learning rate alone scores AUROC {info['lr_auroc_took']:.3f} against them"
                + (
                    f", and {info['lr_auroc_took_matched']:.3f} LR-matched (pairs within a "
                    f"stratum of {LR_STRATUM:g} decade only: rule B3)"
                    if "lr_auroc_took_matched" in info
                    else ""
                )
                + "."
                if "lr_auroc_took" in info
                else ""
            )
        ),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if curves:
        bins = [f"{100 * a:g}-{100 * b:g}%" for a, b in itertools.pairwise(RATE_BINS)]
        counts = next(iter(curves.values()))["counts"]
        lines += [
            "",
            "TPR at 1% FPR by poison rate (detection test split; poisoned LoRAs per bin: "
            + ", ".join(f"{b} {c}" for b, c in zip(bins, counts))
            + "); ![tpr](backdoor_tpr_by_rate.png)",
            "",
            "| model | " + " | ".join(bins) + " |",
            "|" + "---|" * (len(bins) + 1),
        ]
        for model, c in curves.items():
            tpr = np.asarray(c["tpr"], np.float64)
            cells = [
                "n/a" if np.all(np.isnan(tpr[:, b])) else fmt((np.nanmean(tpr[:, b]),
                                                               np.nanstd(tpr[:, b])))
                for b in range(tpr.shape[1])
            ]  # fmt: skip
            lines.append(f"| {_name(model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, out: str) -> str:
    """``backdoor_tpr_by_rate.png``: TPR at 1% FPR against the poison-rate bin."""
    from experiments.repro import plots

    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    centres = np.sqrt(np.asarray(RATE_BINS[:-1]) * np.asarray(RATE_BINS[1:]))
    for model, c in curves.items():
        tpr = np.asarray(c["tpr"], np.float64)
        keep = ~np.all(np.isnan(tpr), axis=0)
        if not keep.any():
            continue
        mean = np.nanmean(tpr[:, keep], axis=0)
        std = np.nanstd(tpr[:, keep], axis=0)
        ax.errorbar(
            centres[keep], mean, yerr=std, marker="o", capsize=3, label=_name(model),
            color={**plots.COLORS, **PEER_COLORS}.get(model),
            ls="--" if model == PROBE else "-",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("poison rate (bin centre)")
    ax.set_ylabel("TPR at 1% FPR (test)")
    ax.set_title("Backdoor detection against the poison rate")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "backdoor_tpr_by_rate.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- findings -------------------------------------------------------------------------


def _runs(results: dict, task: str) -> dict:
    """``{task: {model: results}}`` for :mod:`findings`' per-seed helpers."""
    return {task: {m: r for m, r in results.get(task, {}).items()}}


def above_chance(
    values: np.ndarray, classes, num_models: int, null_sd: float | None = None
) -> tuple[bool, float]:
    """Whether per-seed AUROCs ``values`` of the best of ``num_models`` models are above
    0.5: ``(significant, p)``, ``p`` the larger of the seeds' one-sided t-test and the
    test-set one (``classes = (num_pos, num_neg)``: under no signal the AUROC has mean
    1/2 and variance ``(P + N + 1) / (12 P N)``, the Mann-Whitney null; the seeds share
    the test set, so this bounds the seed mean's too; or that spread given as
    ``null_sd``, as for a stratified AUROC), at ``ALPHA / num_models`` (Bonferroni: the
    best of several models is picked)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    p = findings_lib.p_greater(values, np.asarray([0.5]))
    if classes is not None:
        n_pos, n_neg = classes
        null_sd = np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))
    if null_sd is not None:
        p = max(p, float(stats.norm.sf((values.mean() - 0.5) / null_sd)))
    return bool(p < findings_lib.ALPHA / max(num_models, 1)), p


def matched_finding(curves: dict, models, lr_matched: float) -> dict:
    """B3 (module docstring): the attacks that took, detected beyond the learning rate.

    ``curves``: ``{model: curve()}`` of the detection runs; ``lr_matched``: the learning
    rate's own matched AUROC on the same test LoRAs (:func:`info`).
    """
    vals = {}
    for m in models:
        v = np.asarray(curves.get(m, {}).get("auroc_took_matched", []), np.float64)
        if v.size and not np.all(np.isnan(v)):
            vals[m] = v[~np.isnan(v)]
    flags, lines = [], []
    if vals:
        lines.append("LR-matched AUROC, attacks that took: " + ", ".join(
            f"{_name(m)} {v.mean():.3f}" for m, v in sorted(vals.items(), key=lambda x: -x[1].mean())
        ))  # fmt: skip
        top = max(vals, key=lambda m: vals[m].mean())
        v = vals[top]
        above, p_chance = above_chance(v, None, len(vals), curves[top]["matched_null_sd"])
        flag = above
        lines.append(f"{_name(top)} above 0.5: {'yes' if above else 'no'} (p = {p_chance:.3f}, "
                     f"needs < {findings_lib.ALPHA:g} / {len(vals)})")  # fmt: skip
        if not np.isnan(lr_matched):
            p = findings_lib.p_greater(v, np.asarray([lr_matched]))
            if above and p >= findings_lib.ALPHA:
                flag = None if v.mean() > lr_matched else False
            lines.append(f"{_name(top)} {v.mean():.3f} vs the learning rate alone "
                         f"{lr_matched:.3f} (LR-matched too): one-sided p = {p:.3f}")  # fmt: skip
        flags.append(flag)
    return findings_lib._finding(
        "Poisoned LoRAs whose attack took are detected beyond their learning rate "
        "(learning-rate-matched AUROC)",
        flags,
        lines,
    )


def findings(
    results: dict, models, size: str = "quick", classes=None, curves=None, info=None
) -> list[dict]:
    """The findings B1, B2 and (with ``curves`` and ``info``) B3 (module docstring),
    verdicts by :mod:`findings`' rules.

    ``classes``: ``{task: (positives, negatives)}`` of the test splits (:func:`info`'s
    ``test_classes``); without it, chance is judged on the seeds alone.
    """
    models = [m for m in models if m != PROBE]
    classes = classes or {}
    runs = _runs(results, "detect")
    flags, lines = [], []
    ranked = findings_lib.rank(runs, "detect", "auroc", models)
    probe_vals = findings_lib.per_seed(runs, "detect", PROBE, "test", "auroc")
    if ranked:
        lines.append(findings_lib._ranking_line("detection", "AUROC", ranked))
        top = max(ranked, key=lambda m: ranked[m][1])
        top_vals = findings_lib.per_seed(runs, "detect", top, "test", "auroc")
        above, p_chance = above_chance(top_vals, classes.get("detect"), len(ranked))
        flag = above
        if probe_vals is not None:
            p = findings_lib.p_greater(top_vals, probe_vals)
            if above and p >= findings_lib.ALPHA:  # inside the noise, or below the probe
                flag = None if top_vals.mean() > probe_vals.mean() else False
            lines.append(f"{_name(top)} {top_vals.mean():.3f} vs the probe "
                         f"{probe_vals.mean():.3f}: one-sided p = {p:.3f}")  # fmt: skip
        flags.append(flag)
        lines.append(f"{_name(top)} AUROC above 0.5: {'yes' if above else 'no'} (p = "
                     f"{p_chance:.3f}, needs < {findings_lib.ALPHA:g} / {len(ranked)})")  # fmt: skip
    b1 = findings_lib._finding(
        "Backdoored LoRAs are detected from their weights better than by the published "
        "detector (a linear probe on spectral statistics)",
        flags,
        lines,
    )
    flags, lines = [], []
    for task in ("unseen_trigger", "unseen_target"):
        runs = _runs(results, task)
        ranked = findings_lib.rank(runs, task, "auroc", models)
        if not ranked:
            continue
        lines.append(findings_lib._ranking_line(task.replace("_", " "), "AUROC", ranked))
        top = max(ranked, key=lambda m: ranked[m][1])
        vals = findings_lib.per_seed(runs, task, top, "test", "auroc")
        above, p_chance = above_chance(vals, classes.get(task), len(ranked))
        flags.append(bool(above and vals.mean() >= 0.6))
        seen = findings_lib.per_seed(_runs(results, "detect"), "detect", top, "test", "auroc")
        seen_text = f", {seen.mean():.3f} on seen triggers and targets" if seen is not None else ""
        lines.append(
            f"{task.replace('_', ' ')}: {_name(top)} {vals.mean():.3f}{seen_text} "
            f"(needs >= 0.6 and above 0.5: p = {p_chance:.3f}, needs < "
            f"{findings_lib.ALPHA:g} / {len(ranked)})"
        )
    b2 = findings_lib._finding(
        "Detection carries over to an unseen trigger and to an unseen target", flags, lines
    )
    found = [b1, b2]
    if curves is not None and info is not None and "lr_auroc_took_matched" in info:
        found.append(matched_finding(curves, models, info["lr_auroc_took_matched"]))
    if size == "tiny":
        for f in found:
            f["verdict"] = findings_lib.NOT_JUDGED
    return found


def info(path: str, views: dict[str, str]) -> dict[str, Any]:
    """The counts the table's note states."""
    from gllora.io import dataset as dataset_lib

    ds = dataset_lib.open(path)
    poisoned = ds.labels["backdoored"].astype(bool)
    num_test, classes = {}, {}
    for task, view, _, _ in TASKS:
        test = dataset_lib.open(views[view]).splits["test"]
        num_test[task] = len(test)
        classes[task] = (int(poisoned[test].sum()), int((~poisoned[test]).sum()))
    # The attacks that take are mostly those of high learning rates: the learning rate
    # alone, as a score, against them (detection test split) says how much of a
    # detector's "attacks that took" AUROC that explains.
    from gllora.train import tasks as tasks_lib

    test = np.sort(ds.splits["test"])
    took = poisoned[test] & ds.labels["attack_took"].astype(bool)[test]
    sel = ~poisoned[test] | took
    lr = ds.labels["log10_learning_rate"][test]
    lr_auroc = tasks_lib.auroc(lr[sel], took[sel]) if took.any() else float("nan")
    lr_matched, _ = tasks_lib.stratified_auroc(lr[sel], took[sel], lr_strata(lr[sel]))
    return {
        "num_test": num_test,
        "test_classes": {t: classes[t] for t in DETECTION},
        "lr_auroc_took": lr_auroc,
        "lr_auroc_took_matched": lr_matched,
        "num_poisoned": int(poisoned.sum()),
        "num_not_taken": int(np.sum(poisoned & ~ds.labels["attack_took"].astype(bool))),
        "held_out": {
            "trigger": _held_out(ds.labels, "trigger"),
            "target": _held_out(ds.labels, "attack_target"),
        },
    }
