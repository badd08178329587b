"""Formatting results for the terminal (no flags: importable by every entrypoint)."""

from __future__ import annotations

from typing import Any

_MAIN = {
    "regression": ("mse", "r2", "kendall_tau"),
    "binary": ("loss", "accuracy"),
    "multilabel": ("loss", "accuracy"),
    "categorical": ("loss", "accuracy"),
}


def summary_table(results: dict[str, Any]) -> str:
    """One line per target and split: mean +- std over seeds of its main metrics."""
    lines = [f"{results['model']}: {results['num_seeds']} seed(s)"]
    for split in ("train", "validation", "test"):
        summary = results["summary"][split]
        for target in results["targets"]:
            metrics = summary[target]
            shown = [k for k in ("mse", "r2", "kendall_tau", "loss", "accuracy") if k in metrics]
            cells = ", ".join(
                f"{k} {metrics[k]['mean']:.3f} +- {metrics[k]['std']:.3f}" for k in shown
            )
            lines.append(f"  {split:<10} {target:<16} {cells}")
    return "\n".join(lines)
