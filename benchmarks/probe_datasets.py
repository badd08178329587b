r"""Linear probes on a LoRA dataset folder: are its labels learnable from the weights?

For every target of a dataset, fits a probe on three featurisations of each LoRA and
prints a markdown table of test scores beside chance:

- ``raw``: the flattened factors ``u``, ``v`` of every module (not GL(r)-invariant);
- ``dense``: the flattened products ``u v^T`` (invariant, ``sum n * m`` features);
- ``svals``: the singular values of every ``u v^T`` (invariant, ``sum r`` features),
  from the ``r x r`` core of two thin QRs, never the ``n x m`` matrix;
- ``spectral``: the spectral detector's statistics (5 per module type, averaged over
  the type's modules: :mod:`gllora.models.spectral`), the inputs of the ``spectral``
  model, so its probe is the best a linear head on them reaches here.

Probes: features standardised on the training split; logistic regression (sklearn,
L2, ``C=1``) per column for binary and multi-label targets (mean per-label accuracy),
multinomial logistic regression for categorical targets (accuracy), ridge regression
with the penalty picked by leave-one-out (``RidgeCV``) for regression targets (R^2).
Training on the dataset's stored ``train`` split, scores on its ``test`` split. Chance:
the training split's most frequent value (accuracy), or R^2 = 0.

The paper's pattern (Tables 3-4): raw factors near chance on class membership, dense
products well above it, singular values best on dataset size.

Run::

    python benchmarks/probe_datasets.py --dataset=/tmp/personas [--dataset=...]
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from absl import app, flags

from gllora.io import dataset

FEATURES = ("raw", "dense", "svals", "spectral")


def featurize(ds: dataset.Dataset, kind: str, batch: int = 256) -> np.ndarray:
    """Features ``[N, d]`` float32 of every LoRA of ``ds`` (see the module docstring)."""
    if kind == "spectral":
        return _spectral_statistics(ds, batch)
    rows = []
    for start in range(0, ds.num_examples, batch):
        factors = ds.factors(range(start, min(start + batch, ds.num_examples)))
        parts = []
        for name in ds.spec.order:
            u, v = factors[name]
            if kind == "raw":
                parts += [u.reshape(len(u), -1), v.reshape(len(v), -1)]
            elif kind == "dense":
                parts.append(np.einsum("bnr,bmr->bnm", u, v).reshape(len(u), -1))
            elif kind == "svals":
                _, ru = np.linalg.qr(u.astype(np.float64))
                _, rv = np.linalg.qr(v.astype(np.float64))
                parts.append(np.linalg.svd(ru @ np.swapaxes(rv, -1, -2), compute_uv=False))
            else:
                raise ValueError(f"unknown feature kind {kind!r}; known: {FEATURES}")
        rows.append(np.concatenate(parts, axis=1).astype(np.float32))
    return np.concatenate(rows)


def _spectral_statistics(ds: dataset.Dataset, batch: int) -> np.ndarray:
    """The ``spectral`` model's own features (``features_only``), ``[N, 5 * types]``."""
    import jax
    import jax.numpy as jnp

    from gllora import models

    model = models.build("spectral", 1)
    variables = model.init(jax.random.PRNGKey(0), ds.get(0))

    def one(lora):
        return jnp.concatenate(model.apply(variables, lora, features_only=True).values)

    stats = jax.jit(jax.vmap(one))
    rows = [
        np.asarray(stats(ds.batch(np.arange(start, min(start + batch, ds.num_examples)))))
        for start in range(0, ds.num_examples, batch)
    ]
    return np.concatenate(rows).astype(np.float32)


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(0)
    std = train.std(0)
    std[std < 1e-12] = 1.0
    return (train - mean) / std, (test - mean) / std


def _accuracy_probe(x_tr, y_tr, x_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_tr)) < 2:
        return float(np.mean(y_te == y_tr[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the probe is untuned anyway
        clf = LogisticRegression(C=1.0, max_iter=300).fit(x_tr, y_tr)
    return float(np.mean(clf.predict(x_te) == y_te))


def _chance(y_tr, y_te) -> float:
    values, counts = np.unique(y_tr, return_counts=True)
    return float(np.mean(y_te == values[np.argmax(counts)]))


def probe_target(ds, name, features, train, test) -> dict[str, float]:
    """Test scores of one target: ``{"chance": ..., kind: ...}`` (accuracy or R^2)."""
    t = ds.targets[name]
    y = ds.target_values(name)  # [N, columns]
    out = {}
    if t["task"] == "regression":
        from sklearn.linear_model import RidgeCV

        out["chance"] = 0.0
        for kind, x in features.items():
            x_tr, x_te = _standardize(x[train], x[test])
            scores = []
            for c in range(y.shape[1]):
                model = RidgeCV(alphas=np.logspace(-2, 5, 8)).fit(x_tr, y[train, c])
                pred = model.predict(x_te)
                resid = np.sum((y[test, c] - pred) ** 2)
                total = np.sum((y[test, c] - y[test, c].mean()) ** 2)
                scores.append(1 - resid / total)
            out[kind] = float(np.mean(scores))
        return out
    columns = range(y.shape[1])
    out["chance"] = float(np.mean([_chance(y[train, c], y[test, c]) for c in columns]))
    for kind, x in features.items():
        x_tr, x_te = _standardize(x[train], x[test])
        out[kind] = float(
            np.mean([_accuracy_probe(x_tr, y[train, c], x_te, y[test, c]) for c in columns])
        )
    return out


def probe_dataset(path: str, kinds=FEATURES) -> tuple[str, dict]:
    """Probes every target of the dataset at ``path``; returns a markdown table and scores."""
    ds = dataset.open(path)
    start = time.perf_counter()
    features = {kind: featurize(ds, kind) for kind in kinds}
    train, test = ds.splits["train"], ds.splits["test"]
    results = {}
    for name in ds.targets:
        results[name] = probe_target(ds, name, features, train, test)
    seconds = time.perf_counter() - start
    dims = ", ".join(f"{k} {features[k].shape[1]:,}" for k in kinds)
    lines = [
        (
            f"{path}: {ds.num_examples} LoRAs (train {len(train)}, test {len(test)}); "
            f"features: {dims}; {seconds:.0f} s"
        ),
        "",
        "| target | task (metric) | chance | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    for name, scores in results.items():
        task = ds.targets[name]["task"]
        metric = "R^2" if task == "regression" else "acc"
        cells = " | ".join(f"{scores[k]:.3f}" for k in kinds)
        lines.append(f"| {name} | {task} ({metric}) | {scores['chance']:.3f} | {cells} |")
    return "\n".join(lines), results


FLAGS = flags.FLAGS
flags.DEFINE_multi_string("dataset", None, "Dataset folder(s) to probe.")
flags.DEFINE_list("features", list(FEATURES), "Feature kinds to probe.")


def main(argv):
    del argv
    if not FLAGS.dataset:
        raise app.UsageError("--dataset is required")
    for path in FLAGS.dataset:
        table, _ = probe_dataset(path, tuple(FLAGS.features))
        print(table, "\n", flush=True)


if __name__ == "__main__":
    app.run(main)
