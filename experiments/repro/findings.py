"""Does each qualitative finding of the paper's section 5 hold here? Verdicts computed
from the numbers, with the rule stated beside each, so the report cannot be tuned
into agreement by wording.

Rules (per-seed test metrics; 3 seeds at the quick and paper sizes):

0. Comparing two models: a one-sided Welch t-test on their per-seed values at the 5%
   level (sample variances, Welch-Satterthwaite degrees of freedom). A model is *best*
   when it has the highest mean and the test says it is above every other model; a
   model whose difference from the top is inside the noise is *not distinguishable*
   from it, never "best" or "tied"; otherwise it is *below*.
1. plain MLP near chance where GL symmetry matters: test accuracy within 5 points of
   the majority-class rate, or test R^2 below 0.1;
2. GL-net best on quality (test R^2), attributes and membership (test accuracy): holds
   where it is best, is "not distinguishable" where it is inside the noise of the top,
   does not hold where it is below;
3. MLP + SVD best on dataset size (the same rule);
4. Table 2: MLP + O-Align, MLP + SVD and MLP + Dense perform similarly on quality: no
   pair of them is told apart by a two-sided Welch test at 5%;
5. Appendix D.3: GL-net's dataset-size accuracy is within 10 points both of equation 38
   at its membership accuracy and of the measured accuracy of summing its own class
   predictions, and at least 5 points above the majority-class rate (a chance-level
   size model says nothing about a strategy); MLP + SVD's is more than 10 points above
   both (it does not size datasets by summing classes);
6. Table 5: several models predict the validation loss and the held-out (ARC-C)
   accuracy almost perfectly: at least two models reach test R^2 >= 0.95 on each, MLP +
   SVD among them on both (the paper: .999 and .983); and membership is the harder
   task: the best source-membership accuracy is below 0.75 (the paper: 62.5%);
7. unseen ranks (Figure 4): GL-net and MLP + Dense lose at most 5 points of accuracy on
   average over the unseen ranks other than 1, MLP + SVD loses more than 5. Rank 1 is
   left out of the mean because the paper names it as the exception (it is reported
   beside);
8. cost (Figure 5): MLP + Dense runs out of memory at the larger GPT-3 sizes, or its
   forward time grows more than 4x as fast as the input; every other model runs every
   size at under 1 s per input with time growing no faster than 1.5x the input (the
   paper's "barely longer" plotted on a GPU; on a CPU linear growth in the work is the
   fair reading, and this rule accepts it). A measurement that failed with an error
   that is not a measured out of memory makes that model "not tested".

At ``--size=tiny`` no verdict is given ("tiny: not judged"): its datasets are too small
for any of these numbers to mean something.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from experiments.repro import paper, timing

CLASSIFICATION = ("attributes", "membership", "dataset_size", "sources")
REGRESSION = ("quality", "val_loss", "challenge_acc")
ALPHA = 0.05
NOT_JUDGED = "tiny: not judged"
#: The model a finding is about did not run: that experiment does not count.
MISSING = object()


# -- per-seed values and the comparison rule ----------------------------------------


def per_seed(runs, experiment: str, model: str, split: str, key: str) -> np.ndarray | None:
    """The per-seed values of one metric of one run, or ``None`` if the run is missing."""
    try:
        results = runs[experiment][model]
        target = results["targets"][0]
        return np.asarray([s[split][target][key] for s in results["per_seed"]], np.float64)
    except (KeyError, IndexError, TypeError):
        return None


def p_greater(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided Welch t-test p-value for ``mean(a) > mean(b)``.

    With no spread on either side (identical seeds), the sign of the difference decides.
    A single value on a side has no variance estimate: it counts as zero spread.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va = a.var(ddof=1) / len(a) if len(a) > 1 else 0.0
    vb = b.var(ddof=1) / len(b) if len(b) > 1 else 0.0
    diff = a.mean() - b.mean()
    scale = max(abs(a.mean()), abs(b.mean()), 1e-300)
    if va + vb <= (1e-12 * scale) ** 2:  # no spread beyond the rounding of the mean
        return 0.0 if diff > 0 else 1.0
    t = diff / math.sqrt(va + vb)
    terms = [v**2 / (len(x) - 1) for v, x in ((va, a), (vb, b)) if len(x) > 1]
    df = (va + vb) ** 2 / sum(terms) if sum(terms) > 0 else 1.0
    return float(stats.t.sf(t, df))


def rank(runs, experiment: str, key: str, models) -> dict[str, tuple[str, float, float]]:
    """``{model: (standing, mean, p)}`` with standing ``"best"``, ``"not distinguishable"``
    (from the top, ``p`` that the top is above it) or ``"below"``; only models that ran."""
    vals = {m: per_seed(runs, experiment, m, "test", key) for m in models}
    vals = {m: v for m, v in vals.items() if v is not None and len(v)}
    if not vals:
        return {}
    top = max(vals, key=lambda m: vals[m].mean())
    out = {}
    for m, v in vals.items():
        if m == top:
            continue
        p = p_greater(vals[top], v)
        out[m] = ("not distinguishable" if p >= ALPHA else "below", float(v.mean()), p)
    clear = all(s == "below" for s, _, _ in out.values())
    out[top] = ("best" if clear else "not distinguishable", float(vals[top].mean()), 0.0)
    return out


def _verdict(flags: list) -> str:
    """``True`` holds, ``None`` inside the noise, ``False`` does not hold."""
    if not flags:
        return "not tested (its experiments were not run)"
    if all(f is True for f in flags):
        return "holds"
    if not any(f is False for f in flags):
        return "not distinguishable (inside the seed noise)"
    return "partly holds" if any(f is not False for f in flags) else "does not hold"


def _finding(text: str, flags: list, lines: list[str]) -> dict:
    return {"finding": text, "verdict": _verdict(flags), "evidence": lines}


def _ranking_line(experiment: str, key: str, ranked: dict) -> str:
    order = sorted(ranked, key=lambda m: -ranked[m][1])
    parts = []
    for m in order:
        standing, mean, p = ranked[m]
        note = (
            "" if standing == "best" else f" ({standing}, p = {p:.2f})" if p else f" ({standing})"
        )
        parts.append(f"{paper.MODEL_NAMES.get(m, m)} {mean:.3f}{note}")
    return f"{experiment} (test {key}): " + ", ".join(parts)


def _is_best(runs, experiment: str, key: str, model: str, models) -> tuple[object, str]:
    """``(True | None | False | MISSING, evidence line)`` for ``model`` being best."""
    ranked = rank(runs, experiment, key, models)
    if model not in ranked:  # nothing to judge: the finding is not tested there
        return MISSING, f"{experiment}: no {paper.MODEL_NAMES.get(model, model)} run (not tested)"
    standing = ranked[model][0]
    flag = True if standing == "best" else None if standing == "not distinguishable" else False
    return flag, _ranking_line(experiment, key, ranked)


# -- the findings ---------------------------------------------------------------------


def mlp_near_chance(runs, chance: dict[str, float]) -> dict:
    flags, lines = [], []
    for exp in CLASSIFICATION:
        v = per_seed(runs, exp, "mlp", "test", "accuracy")
        if v is None or exp not in chance:
            continue
        flags.append(bool(v.mean() - chance[exp] <= 0.05))
        lines.append(f"{exp}: MLP {v.mean():.3f} vs majority class {chance[exp]:.3f}")
    for exp in REGRESSION:
        v = per_seed(runs, exp, "mlp", "test", "r2")
        if v is None:
            continue
        flags.append(bool(v.mean() < 0.1))
        lines.append(f"{exp}: MLP R² {v.mean():.3f}")
    return _finding("The plain MLP is near chance where GL symmetry matters", flags, lines)


def glnet_best(runs, models) -> dict:
    flags, lines = [], []
    for exp, key in (("quality", "r2"), ("attributes", "accuracy"), ("membership", "accuracy")):
        if exp not in runs:
            continue
        flag, line = _is_best(runs, exp, key, "glnet", models)
        flags += [] if flag is MISSING else [flag]
        lines.append(line)
    return _finding("GL-net is best on quality, attribute and membership prediction", flags, lines)


def svd_best_size(runs, models) -> dict:
    flags, lines = [], []
    if "dataset_size" in runs:
        flag, line = _is_best(runs, "dataset_size", "accuracy", "mlp_svd", models)
        flags, lines = ([] if flag is MISSING else [flag]), [line]
    return _finding("MLP + SVD is best on dataset size", flags, lines)


def others_similar_on_quality(runs) -> dict:
    trio = ("mlp_oalign", "mlp_svd", "mlp_dense")
    vals = {m: per_seed(runs, "quality", m, "test", "r2") for m in trio}
    vals = {m: v for m, v in vals.items() if v is not None}
    flags, lines = [], []
    names = list(vals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = 2 * min(p_greater(vals[a], vals[b]), p_greater(vals[b], vals[a]))
            flags.append(bool(p >= ALPHA))
            lines.append(
                f"{paper.MODEL_NAMES[a]} {vals[a].mean():.3f} vs {paper.MODEL_NAMES[b]} "
                f"{vals[b].mean():.3f}: two-sided p = {min(p, 1.0):.2f}"
            )
    return _finding(
        "Table 2: MLP + O-Align, MLP + SVD and MLP + Dense perform similarly on quality",
        flags,
        lines,
    )


def d3_strategy(runs, d3: dict, chance: dict[str, float]) -> dict:
    flags, lines = [], []
    floor = chance.get("dataset_size")
    for model, strategy in (("glnet", True), ("mlp_svd", False)):
        r, size = d3.get(model), per_seed(runs, "dataset_size", model, "test", "accuracy")
        if not r or size is None:
            continue
        pred, summed, acc = float(np.mean(r["eq38"])), float(np.mean(r["sum"])), size.mean()
        if strategy:
            above = floor is None or acc - floor >= 0.05
            flags.append(bool(abs(acc - pred) <= 0.10 and abs(acc - summed) <= 0.10 and above))
        else:
            flags.append(bool(acc - pred > 0.10 and acc - summed > 0.10))
        chance_text = f", majority class {floor:.3f}" if floor is not None else ""
        lines.append(
            f"{paper.MODEL_NAMES[model]}: membership p = {np.mean(r['p']):.3f}, eq. 38 predicts "
            f"{pred:.3f}, summing its class predictions measures {summed:.3f}, its size model "
            f"scores {acc:.3f}{chance_text}"
        )
    return _finding(
        "D.3: GL-net sizes datasets about as well as summing its class predictions "
        "would; MLP + SVD does far better than that",
        flags,
        lines,
    )


def table5(runs, models) -> dict:
    flags, lines = [], []
    for exp in ("val_loss", "challenge_acc"):
        vals = {m: per_seed(runs, exp, m, "test", "r2") for m in models}
        vals = {m: float(v.mean()) for m, v in vals.items() if v is not None}
        if not vals:
            continue
        good = sorted(m for m, v in vals.items() if v >= 0.95)
        flags.append(len(good) >= 2 and "mlp_svd" in good)
        shown = ", ".join(
            f"{paper.MODEL_NAMES.get(m, m)} {v:.3f}"
            for m, v in sorted(vals.items(), key=lambda x: -x[1])
        )
        lines.append(
            f"{exp} (test R²; >= 0.95 needed by two models, MLP + SVD among them): {shown}"
        )
    vals = {m: per_seed(runs, "sources", m, "test", "accuracy") for m in models}
    vals = {m: float(v.mean()) for m, v in vals.items() if v is not None}
    if vals:
        best = max(vals, key=vals.get)
        flags.append(vals[best] < 0.75)
        lines.append(
            f"sources (membership is harder: best below 0.75): {paper.MODEL_NAMES.get(best, best)} "
            f"{vals[best]:.3f}"
        )
    return _finding(
        "Table 5: several models predict validation loss and held-out accuracy almost "
        "perfectly (MLP + SVD among them); source membership is the harder task",
        flags,
        lines,
    )


def unseen_ranks(fig4: dict, train_rank: int = 4) -> dict:
    flags, lines, drops = [], [], {}
    for model in ("glnet", "mlp_dense", "mlp_svd", "mlp_oalign"):
        per = fig4.get(model)
        if not per or per.get(train_rank) is None:
            continue
        base = np.mean(per[train_rank]["accuracy"])
        others = [r for r, v in per.items() if v is not None and r not in (1, train_rank)]
        if not others:
            continue
        drop = base - np.mean([np.mean(per[r]["accuracy"]) for r in others])
        drops[model] = drop
        r1 = per.get(1)
        at1 = (
            f"; rank 1 (left out, the paper's exception): {np.mean(r1['accuracy']):.3f}"
            if r1
            else ""
        )
        lines.append(f"{paper.MODEL_NAMES[model]}: rank {train_rank} {base:.3f}, mean drop over "
                     f"ranks {sorted(others)} {drop:+.3f}{at1}")  # fmt: skip
    for model in ("glnet", "mlp_dense"):
        if model in drops:
            flags.append(bool(drops[model] <= 0.05))
    if "mlp_svd" in drops:
        flags.append(bool(drops["mlp_svd"] > 0.05))
    return _finding(
        "GL-net and MLP + Dense generalise to unseen ranks (rank 1 aside); MLP + SVD does not",
        flags,
        lines,
    )


def _is_oom(row: dict) -> bool:
    return row.get("status") == "oom"


def cost_scaling(rows: list[dict]) -> dict:
    flags, lines, untested = [], [], []
    size = lambda name: timing.GPT3[name][0] * timing.GPT3[name][1]  # input ~ L d
    for model in paper.MODELS:
        mine = [r for r in rows if r["model"] == model]
        errors = [r for r in mine if r["status"] not in ("ok", "oom")]
        if errors:
            for r in errors:
                message = str(r.get("error", r.get("reason", "")))[:160]
                lines.append(
                    f"{paper.MODEL_NAMES[model]}: ERROR at {r['gpt3']} ({r['status']}: "
                    f"{message}); not tested"
                )
            untested.append(paper.MODEL_NAMES[model])
            continue  # a failure that is not a measured out of memory proves nothing
        ok = [r for r in mine if r["status"] == "ok"]
        oom = [r["gpt3"] for r in mine if _is_oom(r)]
        if not ok:
            if mine:
                lines.append(
                    f"{paper.MODEL_NAMES[model]}: out of memory at every size ({', '.join(oom)})"
                )
                flags.append(model == "mlp_dense")
            continue
        lo, hi = ok[0], ok[-1]
        growth = hi["forward_s"] / max(lo["forward_s"], 1e-9)
        input_growth = size(hi["gpt3"]) / size(lo["gpt3"])
        per_input = hi["forward_s"] / hi["settings"]["forward"]
        text = (f"{paper.MODEL_NAMES[model]}: forward {lo['forward_s']:.2f} s at {lo['gpt3']} -> "
                f"{hi['forward_s']:.2f} s at {hi['gpt3']} (x{growth:.1f}; input x{input_growth:.0f}); "
                f"{per_input * 1e3:.1f} ms per input at {hi['gpt3']}")  # fmt: skip
        if oom:
            text += f"; out of memory at {', '.join(oom)}"
        lines.append(text)
        if model == "mlp_dense":
            flags.append(bool(oom) or growth > 4 * input_growth)
        else:
            flags.append(per_input < 1.0 and growth <= 1.5 * input_growth and not oom)
    found = _finding(
        "MLP + Dense's cost grows with model size while the others stay nearly flat "
        "(linear growth in the input accepted as 'barely longer' on a CPU)",
        flags,
        lines,
    )
    if untested:
        tested = f"{found['verdict']} for the models measured; " if flags else ""
        found["verdict"] = (
            f"{tested}not tested for {', '.join(untested)} (an error, not a measurement)"
        )
    return found


def all_findings(runs, models, chance, d3, fig4, fig5, size: str = "quick") -> list[dict]:
    found = [
        mlp_near_chance(runs, chance),
        glnet_best(runs, models),
        others_similar_on_quality(runs),
        svd_best_size(runs, models),
        d3_strategy(runs, d3, chance),
        table5(runs, models),
        unseen_ranks(fig4),
        cost_scaling(fig5),
    ]
    if size == "tiny":
        for f in found:
            f["verdict"] = NOT_JUDGED
    return found
