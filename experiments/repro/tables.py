"""Markdown tables of the reproduction beside the paper's numbers (Tables 2-5, D.3,
Figures 4-5 as numbers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.repro import paper, timing

Runs = dict[str, dict[str, dict[str, Any]]]  # experiment -> model -> results.json


def stat(runs: Runs, experiment: str, model: str, split: str, key: str):
    """``(mean, std)`` of one metric of one run, or ``None`` if the run is missing."""
    try:
        results = runs[experiment][model]
        target = results["targets"][0]
        m = results["summary"][split][target][key]
        return m["mean"], m["std"]
    except KeyError:
        return None


def fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    mean, std = value
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _table(title: str, columns: list[str], rows: list[list[str]], note: str = "") -> str:
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _side_by_side(runs, experiment, spec, paper_numbers, models) -> list[list[str]]:
    """``spec``: ``[(header, split, key, digits, scale, paper_key)]``."""
    rows = []
    for model in models:
        ours = [fmt(stat(runs, experiment, model, s, k), d, sc) for _, s, k, d, sc, _ in spec]
        theirs = paper_numbers.get(model, {})
        ref = [fmt(theirs.get(pk), d) for _, _, _, d, _, pk in spec]
        rows.append([paper.MODEL_NAMES[model], *ours, *ref])
    return rows


def table2(runs: Runs, models) -> str:
    spec = [
        ("Train MSE", "train", "mse", 3, 1, "train_mse"),
        ("Test MSE", "test", "mse", 3, 1, "test_mse"),
        ("τ", "test", "kendall_tau", 3, 1, "tau"),
        ("R²", "test", "r2", 3, 1, "r2"),
    ]
    cols = ["model"] + [h for h, *_ in spec] + [f"paper {h}" for h, *_ in spec]
    note = (
        "Persona quality score (the CLIP-score analogue), standardised with training "
        "statistics; paper: CelebA-LoRA normalised CLIP score."
    )
    rows = _side_by_side(runs, "quality", spec, paper.TABLE2, models)
    return _table("Table 2: quality-score regression", cols, rows, note)


def table3(runs: Runs, models) -> str:
    spec = [
        ("Train loss", "train", "loss", 3, 1, "train_loss"),
        ("Test loss", "test", "loss", 3, 1, "test_loss"),
        ("Test acc (%)", "test", "accuracy", 1, 100, "test_acc"),
    ]
    cols = ["model"] + [h for h, *_ in spec] + [f"paper {h}" for h, *_ in spec]
    left = _table(
        "Table 3 (left): persona attributes (5 style bits; paper: 5 CelebA attributes)",
        cols,
        _side_by_side(runs, "attributes", spec, paper.TABLE3_ATTRIBUTES, models),
        "Mean per-label accuracy and binary cross-entropy.",
    )
    right = _table(
        "Table 3 (right): digit-subset class membership (paper: Imagenette classes)",
        cols,
        _side_by_side(runs, "membership", spec, paper.TABLE3_MEMBERSHIP, models),
    )
    return left + "\n" + right


def table4(runs: Runs, models, d3: dict[str, dict]) -> str:
    spec = [
        ("Train loss", "train", "loss", 3, 1, "train_loss"),
        ("Test acc (%)", "test", "accuracy", 1, 100, "test_acc"),
    ]
    cols = ["model"] + [h for h, *_ in spec] + [f"paper {h}" for h, *_ in spec]
    size = _table(
        "Table 4: dataset-size prediction on digit subsets (10-way; paper: Imagenette)",
        cols,
        _side_by_side(runs, "dataset_size", spec, paper.TABLE4, models),
    )
    rows = []
    for model in models:
        r = d3.get(model)
        ours_size = fmt(stat(runs, "dataset_size", model, "test", "accuracy"), 1, 100)
        ref = paper.D3.get(model, {})
        ref_sum = ref.get("sum")
        rows.append(
            [
                paper.MODEL_NAMES[model],
                _pct(r["p"]) if r else "-",
                _pct(r["eq38"]) if r else "-",
                _pct(r["sum"]) if r else "-",
                ours_size,
                f"{ref['p']:.1f}" if ref else "-",
                f"{ref['eq38']:.1f}" if ref else "-",
                fmt(ref_sum, 1) if ref_sum else "-",
                f"{ref['measured']:.1f}" if ref else "-",
            ]
        )
    cols = [
        "model", "membership acc p (%)", "eq. 38 at p (%)", "sum of class predictions (%)",
        "size model (%)", "paper p", "paper eq. 38", "paper sum", "paper size model",
    ]  # fmt: skip
    n = next((r["num_test"] for r in d3.values() if r), 0)
    probs = next((r["size_probs"] for r in d3.values() if r), [])
    note = (
        "Appendix D.3: if a membership model is right on each of the 10 bits with "
        "probability p (independently), summing its bits predicts the size correctly with "
        "the probability of equation 38; P(eta) is the size distribution of the test split "
        f"({n} LoRAs: {', '.join(f'{i}: {x:.2f}' for i, x in enumerate(probs) if x > 0)}). "
        "'sum of class predictions' applies each seed's Table 3 membership model to the "
        "same test split and sums its bits. Per seed, then mean ± std."
    )
    return size + "\n" + _table("Table 4 (Appendix D.3): the summing strategy", cols, rows, note)


def _pct(values) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def table5(runs: Runs, models) -> str:
    cols = ["model", "membership acc", "val-loss R²", "challenge-acc R²"]
    cols += ["paper membership acc", "paper val-loss R²", "paper ARC-C R²"]
    rows = []
    for model in models:
        ref = paper.TABLE5.get(model, {})
        rows.append(
            [
                paper.MODEL_NAMES[model],
                fmt(stat(runs, "sources", model, "test", "accuracy")),
                fmt(stat(runs, "val_loss", model, "test", "r2")),
                fmt(stat(runs, "challenge_acc", model, "test", "r2")),
                fmt(ref.get("membership_acc")),
                fmt(ref.get("val_loss_r2")),
                fmt(ref.get("challenge_r2")),
            ]
        )
    note = (
        "Arithmetic sources (paper: Qwen2-ARC-LoRA): 19 source-membership bits, "
        "validation loss and held-out challenge accuracy; all on the test split."
    )
    return _table("Table 5: language-model LoRAs", cols, rows, note)


def figure4_table(fig4: dict[str, dict], ranks) -> str:
    cols = ["model"] + [f"r={r}" for r in ranks]
    rows = []
    for metric, digits, scale in (("accuracy", 1, 100), ("loss", 3, 1)):
        for model, per_rank in fig4.items():
            cells = []
            for r in ranks:
                v = per_rank.get(r)
                cells.append(
                    "n/a"
                    if v is None
                    else fmt((np.mean(v[metric]), np.std(v[metric])), digits, scale)
                )
            rows.append([f"{paper.MODEL_NAMES[model]} ({metric})", *cells])
    note = (
        "Models trained on rank-4 persona LoRAs (the Table 3 attribute runs), tested on the "
        "test split of persona datasets of each rank (same personas, images, "
        "hyperparameters and seeds; only the rank differs). Accuracy in %. The MLP on raw "
        "factors takes only its training rank (lower ranks zero-padded; higher: n/a). "
        f"Paper: {paper.FIGURE4}"
    )
    return _table("Figure 4: generalisation to unseen ranks", cols, rows, note)


def figure5_status(row: dict) -> str:
    """``ok``, ``OOM (<kind>)`` (a measured or planned out of memory) or ``ERROR``."""
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "oom":
        return f"OOM ({row.get('oom_kind', 'measured')})"
    return "ERROR"


def figure5_table(rows: list[dict], cap_gb: float) -> str:
    counts = rows[0]["settings"] if rows and "settings" in rows[0] else {}
    pre, fwd = counts.get("preprocess", "?"), counts.get("forward", "?")
    cols = ["GPT-3", "layers x d", "model", f"preprocess {pre} (s)", f"forward {fwd} (s)"]
    cols += ["forward batch", "peak memory (MB)", "status"]
    out = []
    for r in rows:
        layers, d = timing.GPT3[r["gpt3"]]
        ok = r["status"] == "ok"
        peak = max(r.get("preprocess_peak_mb", 0), r.get("forward_peak_mb", 0)) if ok else None
        why = str(r.get("reason") or r.get("error") or "")[:80]
        out.append(
            [
                r["gpt3"],
                f"{layers} x {d}",
                paper.MODEL_NAMES.get(r["model"], r["model"]),
                f"{r['preprocess_s']:.3f}"
                if ok and r["model"] in ("mlp_oalign", "mlp_svd", "mlp_dense")
                else "-",
                f"{r['forward_s']:.2f}" if ok else "-",
                str(r.get("forward_batch", "-")) if ok else "-",
                f"{peak:.0f}" if ok else "-",
                "ok" if ok else f"{figure5_status(r)}: {why}",
            ]
        )
    note = (
        f"One rank-4 LoRA on one [d, d] attention matrix per layer; {pre} inputs "
        f"preprocessed, {fwd} forwarded. Each measurement in its own process on one CPU "
        f"core, capped at {cap_gb:g} GB above start-up. OOM: a measured out of memory "
        "(planned: the compiled programs' buffers do not fit under the cap; allocation: "
        "an allocation failed; killed: the process was killed at the cap). ERROR: any other "
        "failure, with its message: not a measurement, and the cost finding does not judge "
        "that model. Times exclude compilation; the forward includes featurisation "
        f"(gllora's models featurise inside). Paper: {paper.FIGURE5}"
    )
    return _table("Figure 5: runtime and memory across the GPT-3 family", cols, out, note)
