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
    if hasattr(source, "sources"):  # several structures: each structure's ids apart
        out = None
        which = source.ds.structure_of(ids)
        for s, sub in enumerate(source.sources):
            sel = np.flatnonzero(which == s)
            if len(sel) == 0:
                continue
            local = source.ds.local_ids(ids[sel], s)
            got = predict_split(predict, params, consts, sub, local, batch_size)
            if out is None:
                out = np.zeros((got.shape[0], len(ids), got.shape[2]), got.dtype)
            out[:, sel] = got
        return out
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
        if hasattr(sources[split], "sources"):  # several structures: metrics of each too
            outputs = predict_split(
                predict,
                state["best_params"],
                state["consts"],
                sources[split],
                splits[split],
                config.eval_batch_size,
            )
            for entry, out in zip(per_seed, outputs):
                entry.setdefault("per_structure", {})[split] = _per_structure(
                    sources[split].ds, out, splits[split], labels, targets
                )
    results = {
        "model": config.model,
        "targets": [t.name for t in targets],
        "num_seeds": len(seeds),
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }
    if "per_structure" in per_seed[0]:
        results["summary_per_structure"] = {
            split: {
                name: mean_std([e["per_structure"][split][name] for e in per_seed])
                for name in per_seed[0]["per_structure"][split]
            }
            for split in per_seed[0]["per_structure"]
        }
    return results


def _per_structure(ds, outputs: np.ndarray, ids: np.ndarray, labels, targets) -> dict[str, Any]:
    """``{structure: metrics}`` of one seed's ``outputs [N, C]`` on global ``ids``."""
    which = ds.structure_of(ids)
    return {
        name: tasks.metrics(targets, outputs[which == s], labels[ids[which == s]])
        for s, (name, _) in enumerate(ds.structures)
        if (which == s).any()
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
