"""The reproduction's figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

import numpy as np

from experiments.repro import paper, timing

COLORS = {
    "mlp": "tab:gray",
    "mlp_oalign": "tab:orange",
    "mlp_svd": "tab:green",
    "mlp_dense": "tab:blue",
    "glnet": "tab:red",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure4(fig4: dict[str, dict], chance: float | None, out: str) -> list[str]:
    """``figure4_accuracy.png`` and ``figure4_loss.png``: test metric against rank."""
    plt = _pyplot()
    paths = []
    for metric, label in (("accuracy", "test accuracy"), ("loss", "test loss (BCE)")):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for model, per_rank in fig4.items():
            ranks = sorted(r for r, v in per_rank.items() if v is not None)
            if not ranks:
                continue
            mean = [np.mean(per_rank[r][metric]) for r in ranks]
            std = [np.std(per_rank[r][metric]) for r in ranks]
            ax.errorbar(
                ranks, mean, yerr=std, marker="o", capsize=3, color=COLORS.get(model),
                label=paper.MODEL_NAMES.get(model, model),
            )  # fmt: skip
        if metric == "accuracy" and chance is not None:
            ax.axhline(chance, color="k", ls=":", lw=1, label="majority class")
        ax.axvline(4, color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank of the test LoRAs (trained on rank 4)")
        ax.set_ylabel(label)
        ax.set_title(f"Figure 4: persona attributes, {label}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"figure4_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def figure5(rows: list[dict], cap_gb: float, out: str) -> list[str]:
    """``figure5_preprocess.png``, ``figure5_forward.png``, ``figure5_memory.png``:
    against the GPT-3 model size; out-of-memory points drawn as crosses at the top, errors
    (failures that are not a measured out of memory) as hollow squares there."""
    plt = _pyplot()
    paths = []
    counts = rows[0].get("settings", {}) if rows else {}
    panels = (
        (
            "preprocess",
            "preprocess_s",
            f"preprocessing time, {counts.get('preprocess', '?')} inputs (s)",
        ),
        ("forward", "forward_s", f"forward time, {counts.get('forward', '?')} inputs (s)"),
        ("memory", "peak_mb", "peak memory above start-up (MB)"),
    )
    models = list(dict.fromkeys(r["model"] for r in rows))
    for name, key, label in panels:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        top = 1.0
        for r in rows:
            if r["status"] == "ok":
                top = max(top, _value(r, key) or 0.0)
        for model in models:
            mine = [r for r in rows if r["model"] == model]
            ok = [r for r in mine if r["status"] == "ok"]
            if name == "preprocess" and model in ("mlp", "glnet"):
                continue  # no preprocessing
            x = [timing.GPT3_PARAMS[r["gpt3"]] for r in ok]
            y = [max(_value(r, key), 1e-4) for r in ok]
            color = COLORS.get(model)
            ax.plot(x, y, marker="o", color=color, label=paper.MODEL_NAMES.get(model, model))
            oom = [timing.GPT3_PARAMS[r["gpt3"]] for r in mine if r["status"] == "oom"]
            if oom:
                ax.scatter(oom, [top * 3] * len(oom), marker="x", s=60, color=color)
            err = [timing.GPT3_PARAMS[r["gpt3"]] for r in mine if r["status"] not in ("ok", "oom")]
            if err:
                ax.scatter(err, [top * 6] * len(err), marker="s", s=50, facecolors="none",
                           edgecolors=color)  # fmt: skip
        if name == "memory":
            ax.axhline(cap_gb * 1024, color="k", ls=":", lw=1, label=f"cap {cap_gb:g} GB")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GPT-3 model size (parameters); x: out of memory, square: error")
        ax.set_ylabel(label)
        ax.set_title(f"Figure 5: {name}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. only MLP and GL-net were run: neither preprocesses
            ax.text(0.5, 0.5, "no model of this run preprocesses", transform=ax.transAxes,
                    ha="center")  # fmt: skip
        fig.tight_layout()
        path = os.path.join(out, f"figure5_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _value(row: dict, key: str) -> float | None:
    if key == "peak_mb":
        return max(row.get("preprocess_peak_mb", 0.0), row.get("forward_peak_mb", 0.0))
    return row.get(key)
