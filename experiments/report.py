"""Formatting results for the terminal (no flags, no JAX: importable by every entrypoint).

Regression metrics are printed with their units: ``mse`` is in standardised units (the
targets scaled by their training mean and standard deviation, as the loss is; then
``r2 = 1 - mse`` on a split with the training statistics), ``mse_target_units`` in the
targets' own units (what :class:`gllora.Predictor` returns).
"""

from __future__ import annotations

from typing import Any

#: Shown metrics, in order, with the label printed for each.
SHOWN = {
    "mse": "mse (standardised)",
    "mse_target_units": "mse (target units)",
    "r2": "r2",
    "kendall_tau": "kendall_tau",
    "loss": "loss",
    "accuracy": "accuracy",
}


def metric_cells(metrics: dict[str, Any]) -> str:
    """``"mse (standardised) 0.123 +- 0.004, r2 ..."`` for one target's ``{metric: {mean,
    std}}`` (the summary of a results file); regression shows no ``loss`` (it is the mse)."""
    shown = [k for k in SHOWN if k in metrics and not (k == "loss" and "mse" in metrics)]
    return ", ".join(
        f"{SHOWN[k]} {metrics[k]['mean']:.4g} +- {metrics[k]['std']:.2g}" for k in shown
    )


def metric_lines(summary: dict[str, Any], split: str) -> list[str]:
    """One line per target of one split's summary (``{target: {metric: {mean, std}}}``)."""
    return [
        f"{split} {target}: {metric_cells(metrics)}"
        for target, metrics in summary.items()
        if isinstance(metrics, dict) and "mean" not in metrics  # not the summed loss
    ]


def summary_table(results: dict[str, Any]) -> str:
    """One line per target and split: mean +- std over seeds of its main metrics."""
    lines = [f"{results['model']}: {results['num_seeds']} seed(s)"]
    for split in ("train", "validation", "test"):
        summary = results["summary"][split]
        for target in results["targets"]:
            lines.append(f"  {split:<10} {target:<16} {metric_cells(summary[target])}")
    return "\n".join(lines)
