"""Evaluating a trained run on a dataset split, from its checkpoint alone.

Batches are split over a mesh (default: every device of every process, as in training);
under ``jax.distributed`` every process calls :func:`evaluate_workdir` and gets the same
result.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from gllora import parallel
from gllora.io import dataset as dataset_lib
from gllora.spec import check_match
from gllora.train import pipeline, tasks
from gllora.train import results as results_lib
from gllora.train.predictor import Predictor


def evaluate_workdir(
    workdir: str, split: str = "test", dataset_path: str | None = None, mesh: Mesh | None = None
) -> dict[str, Any]:
    """Per-seed metrics of the run's best models on ``split`` of its dataset.

    ``mesh``: the devices (default :func:`gllora.parallel.make_mesh`: all of them).

    Returns:
      ``{"split", "per_seed": [{target: metrics}], "summary": {target: {metric: {mean, std}}}}``.
    """
    predictor = Predictor.from_workdir(workdir, parallel.make_mesh() if mesh is None else mesh)
    with open(os.path.join(workdir, "targets.json")) as f:
        meta = json.load(f)
    ds = dataset_lib.open(dataset_path or meta["dataset"])
    check_match(
        predictor.spec, ds.spec, f"{ds.path}: modules differ from those {workdir} was trained on"
    )
    if split not in ds.splits:
        raise ValueError(f"{ds.path}: no split {split!r}; splits: {sorted(ds.splits)}")
    ids = np.sort(ds.splits[split])
    labels = tasks.encode(ds, predictor.targets)
    layout = predictor.setup.layout
    source = pipeline.Source(ds, predictor.ranks, None, predictor.mesh, layout)
    per_seed = results_lib.evaluate_split(
        predictor.predict_fn(layout),
        predictor.targets,
        predictor.params,
        predictor.consts,
        source,
        ids,
        labels,
        int(predictor.config.eval_batch_size),
    )
    return {
        "workdir": workdir,
        "dataset": ds.path,
        "split": split,
        "per_seed": per_seed,
        "summary": results_lib.mean_std(per_seed),
    }
