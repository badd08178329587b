"""Does each qualitative finding of the paper's section 5 hold here? Verdicts computed
from the numbers, with the rule stated beside each, so the report cannot be tuned
into agreement by wording.

Rules (``tied``: within the sum of the two standard deviations over seeds):

1. plain MLP near chance where GL symmetry matters: test accuracy within 5 points of
   the majority-class rate, or test R^2 below 0.1;
2. GL-net best or tied-best on quality (test R^2), attributes and membership (test
   accuracy);
3. MLP + SVD best or tied-best on dataset size;
4. Appendix D.3: GL-net's dataset-size accuracy within 10 points of equation 38 at its
   membership accuracy (it behaves like summing class predictions), MLP + SVD's more
   than 10 points above its own (it does not);
5. unseen ranks: GL-net and MLP + Dense lose at most 5 points of accuracy on average
   over the unseen ranks other than 1 (the paper notes a drop at rank 1), MLP + SVD
   loses more than 5;
6. cost: MLP + Dense runs out of memory at the larger GPT-3 sizes or its forward time
   grows more than 4x as fast as the input size; every other model's forward time per
   input at the largest size it ran stays under 1 s ("at most seconds") and grows no
   faster than the input size (linear work: "flat" as the paper plots it on a GPU holds
   on a CPU only if time stays constant, which the table shows directly).
"""

from __future__ import annotations

import numpy as np

from experiments.repro import paper, timing
from experiments.repro.tables import stat

CLASSIFICATION = ("attributes", "membership", "dataset_size", "sources")
REGRESSION = ("quality", "val_loss", "challenge_acc")


def _verdict(flags: list[bool]) -> str:
    if not flags:
        return "not tested (its experiments were not run)"
    if all(flags):
        return "holds"
    return "partly holds" if any(flags) else "does not hold"


def _best_or_tied(runs, experiment, key, model, models) -> tuple[bool, str]:
    vals = {m: stat(runs, experiment, m, "test", key) for m in models}
    vals = {m: v for m, v in vals.items() if v is not None}
    if model not in vals:
        return False, f"{experiment}: no {model} run"
    best = max(vals, key=lambda m: vals[m][0])
    mean, std = vals[model]
    tied = mean >= vals[best][0] - (std + vals[best][1])
    ranking = ", ".join(
        f"{paper.MODEL_NAMES[m]} {vals[m][0]:.3f}" for m in sorted(vals, key=lambda m: -vals[m][0])
    )
    return tied, f"{experiment} (test {key}): {ranking}"


def mlp_near_chance(runs, chance: dict[str, float]) -> dict:
    flags, lines = [], []
    for exp in CLASSIFICATION:
        v = stat(runs, exp, "mlp", "test", "accuracy")
        if v is None or exp not in chance:
            continue
        ok = v[0] - chance[exp] <= 0.05
        flags.append(ok)
        lines.append(f"{exp}: MLP {v[0]:.3f} vs majority class {chance[exp]:.3f}")
    for exp in REGRESSION:
        v = stat(runs, exp, "mlp", "test", "r2")
        if v is None:
            continue
        flags.append(v[0] < 0.1)
        lines.append(f"{exp}: MLP R² {v[0]:.3f}")
    return {"finding": "The plain MLP is near chance where GL symmetry matters",
            "verdict": _verdict(flags), "evidence": lines}  # fmt: skip


def glnet_best(runs, models) -> dict:
    flags, lines = [], []
    for exp, key in (("quality", "r2"), ("attributes", "accuracy"), ("membership", "accuracy")):
        if exp not in runs:
            continue
        ok, line = _best_or_tied(runs, exp, key, "glnet", models)
        flags.append(ok)
        lines.append(line)
    return {"finding": "GL-net is best or tied-best on quality, attribute and membership prediction",
            "verdict": _verdict(flags), "evidence": lines}  # fmt: skip


def svd_best_size(runs, models) -> dict:
    flags, lines = [], []
    if "dataset_size" in runs:
        ok, line = _best_or_tied(runs, "dataset_size", "accuracy", "mlp_svd", models)
        flags, lines = [ok], [line]
    return {"finding": "MLP + SVD is best on dataset size", "verdict": _verdict(flags),
            "evidence": lines}  # fmt: skip


def d3_strategy(runs, d3: dict) -> dict:
    flags, lines = [], []
    for model, want_close in (("glnet", True), ("mlp_svd", False)):
        r, size = d3.get(model), stat(runs, "dataset_size", model, "test", "accuracy")
        if not r or size is None:
            continue
        pred, summed = np.mean(r["eq38"]), np.mean(r["sum"])
        gap = size[0] - pred
        flags.append(abs(gap) <= 0.10 if want_close else gap > 0.10)
        lines.append(
            f"{paper.MODEL_NAMES[model]}: membership p = {np.mean(r['p']):.3f}, eq. 38 predicts "
            f"{pred:.3f}, summing its class predictions measures {summed:.3f}, its size model "
            f"scores {size[0]:.3f}"
        )
    return {"finding": "D.3: GL-net sizes datasets about as well as summing its class "
            "predictions would; MLP + SVD does far better than that",
            "verdict": _verdict(flags), "evidence": lines}  # fmt: skip


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
        at1 = f", rank 1: {np.mean(r1['accuracy']):.3f}" if r1 else ""
        lines.append(f"{paper.MODEL_NAMES[model]}: rank {train_rank} {base:.3f}, mean drop over "
                     f"ranks {sorted(others)} {drop:+.3f}{at1}")  # fmt: skip
    for model in ("glnet", "mlp_dense"):
        if model in drops:
            flags.append(drops[model] <= 0.05)
    if "mlp_svd" in drops:
        flags.append(drops["mlp_svd"] > 0.05)
    return {"finding": "GL-net and MLP + Dense generalise to unseen ranks; MLP + SVD does not",
            "verdict": _verdict(flags), "evidence": lines}  # fmt: skip


def cost_scaling(rows: list[dict]) -> dict:
    flags, lines = [], []
    size = lambda name: timing.GPT3[name][0] * timing.GPT3[name][1]  # input ~ L d
    for model in paper.MODELS:
        mine = [r for r in rows if r["model"] == model]
        ok = [r for r in mine if r["status"] == "ok"]
        oom = [r["gpt3"] for r in mine if r["status"] != "ok"]
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
    return {"finding": "MLP + Dense's cost grows with model size while the others stay flat",
            "verdict": _verdict(flags), "evidence": lines}  # fmt: skip


def all_findings(runs, models, chance, d3, fig4, fig5) -> list[dict]:
    return [
        mlp_near_chance(runs, chance),
        glnet_best(runs, models),
        svd_best_size(runs, models),
        d3_strategy(runs, d3),
        unseen_ranks(fig4),
        cost_scaling(fig5),
    ]
