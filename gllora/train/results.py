"""Predictions and metrics of a run's models on dataset splits, and their mean +- std."""

from __future__ import annotations

from typing import Any

import numpy as np

from gllora import parallel
from gllora.train import tasks


def predict_split(predict, params, consts, source, ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Outputs of every seed on ``ids``: ``[S, N, num_outputs]`` (batches padded to one shape).

    ``predict``: :func:`gllora.train.steps.predict` jitted for ``source.layout``. Batches
    are split over the source's mesh (``batch_size`` rounded up to a multiple of its
    device count); the outputs come back whole on every process.
    """
    size = parallel.round_up(batch_size, source.mesh)
    outs = []
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])
        out = predict(params, consts, source.read(padded))
        outs.append(parallel.to_host(out)[:, : len(chunk)])
    return np.concatenate(outs, axis=1)


def evaluate_split(
    predict, targets, params, consts, source, ids, labels, batch_size
) -> list[dict[str, Any]]:
    """Per-seed metrics of ``params`` on ``ids``."""
    outputs = predict_split(predict, params, consts, source, ids, batch_size)
    return [tasks.metrics(targets, out, labels[ids]) for out in outputs]


def final_results(
    predict, targets, state, sources, splits, labels, config, seeds
) -> dict[str, Any]:
    """Metrics of each seed's best model on train, validation and test (read once, here)."""
    per_seed = [
        {"seed": s, "best_epoch": int(e)}
        for s, e in zip(seeds, parallel.to_host(state["best_epoch"]))
    ]
    for split in ("train", "validation", "test"):
        metrics = evaluate_split(
            predict,
            targets,
            state["best_params"],
            state["consts"],
            sources[split],
            splits[split],
            labels,
            config.eval_batch_size,
        )
        for entry, m in zip(per_seed, metrics):
            entry[split] = m
    return {
        "model": config.model,
        "targets": [t.name for t in targets],
        "num_seeds": len(seeds),
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{split: {target: {metric: {"mean", "std"}}}}`` over seeds (std with ddof=0)."""
    return {
        split: mean_std([entry[split] for entry in per_seed])
        for split in ("train", "validation", "test")
    }


def mean_std(values: list[Any]) -> Any:
    """Mean and standard deviation, leaf by leaf, of equally structured nested dicts."""
    if isinstance(values[0], dict):
        return {k: mean_std([v[k] for v in values]) for k in values[0]}
    arr = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr))}
