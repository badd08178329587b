"""Prediction targets: what a model predicts, its loss and its metrics, as in the paper.

- regression: MSE on targets standardised with training statistics (the paper's
  "normalized CLIP score"); metrics ``mse`` (standardised units), ``mse_target_units``
  (the same errors in the targets' units: ``mse * std**2`` for one column), R^2,
  Kendall's tau.
- binary / multilabel: sigmoid cross-entropy; mean per-label accuracy and each label's;
  a binary target also gets ``auroc`` (area under the ROC curve, ties counted half) and
  ``tpr_at_1pct_fpr`` (:func:`tpr_at_fpr`: what a detector flags when it may raise a
  false alarm on at most 1% of the negatives), NaN where the split lacks a class.
- categorical: softmax cross-entropy; accuracy.

A target is named in ``config.targets`` either by a target of the dataset's schema
(``"attributes"``) or ad hoc as ``"task:col1,col2"`` (``"regression:val_loss"``).
Several targets train together: the model's outputs are their concatenation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from gllora.io.dataset import TASKS, Dataset

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Target:
    """One prediction target. ``offset:offset+num_outputs`` are its model outputs."""

    name: str
    task: str
    columns: tuple[str, ...]
    classes: tuple[Any, ...] = ()
    offset: int = 0
    # Regression standardisation (training statistics), one per column.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_outputs(self) -> int:
        if self.task == "categorical":
            return len(self.classes)
        if self.task == "binary":
            return 1
        return len(self.columns)

    @property
    def num_labels(self) -> int:
        """Columns of the label matrix: 1 for categorical (the class index)."""
        return 1 if self.task == "categorical" else len(self.columns)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Target":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def resolve(ds: Dataset, names: Sequence[str], train_ids: np.ndarray) -> list[Target]:
    """Resolves ``config.targets`` against a dataset; fails before training on any error.

    Raises:
      ValueError: an unknown target, task or column, or a column of the wrong type.
    """
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise ValueError(
            f"{ds.path}: no targets given; the dataset's targets: {sorted(ds.targets)}"
        )
    out, offset = [], 0
    for name in names:
        if name in ds.targets:
            t = ds.targets[name]
            task, columns, classes = t["task"], tuple(t["columns"]), tuple(t.get("classes", ()))
        elif ":" in name:
            task, _, cols = name.partition(":")
            columns = tuple(c.strip() for c in cols.split(",") if c.strip())
            if task not in TASKS:
                raise ValueError(
                    f"target {name!r}: unknown task {task!r}; tasks: {', '.join(TASKS)}"
                )
            classes = ()
        else:
            raise ValueError(
                f"{ds.path}: unknown target {name!r}; the dataset's targets are "
                f"{sorted(ds.targets)}, or write 'task:column[,column]' with a task in {TASKS}"
            )
        if task in ("binary", "categorical") and len(columns) != 1:
            raise ValueError(
                f"target {name!r}: a {task} target takes exactly one column, got {list(columns)}"
            )
        for c in columns:
            if c not in ds.columns:
                raise ValueError(
                    f"target {name!r}: unknown label column {c!r}; columns: {sorted(ds.columns)}"
                )
            kind = ds.columns[c]
            if task == "regression" and kind not in ("float", "int", "bool"):
                raise ValueError(
                    f"target {name!r}: regression needs a numeric column, {c!r} holds {kind}"
                )
            if task in ("binary", "multilabel"):
                values = ds.labels[c]
                if kind not in ("bool", "int") or not set(np.unique(values).tolist()) <= {0, 1}:
                    raise ValueError(
                        f"target {name!r}: {task} needs a 0/1 or bool column, {c!r} holds "
                        f"{kind} values such as {values[:3].tolist()}"
                    )
        if task == "categorical" and not classes:
            classes = tuple(sorted(set(ds.labels[columns[0]].tolist())))
        if task == "categorical" and len(classes) < 2:
            raise ValueError(f"target {name!r}: column {columns[0]!r} has fewer than 2 classes")
        mean = std = ()
        if task == "regression":
            y = np.stack([ds.labels[c].astype(np.float64)[train_ids] for c in columns], 1)
            mean, std = tuple(y.mean(0).tolist()), tuple(np.maximum(y.std(0), 1e-12).tolist())
        target = Target(name, task, columns, tuple(_plain(c) for c in classes), offset, mean, std)
        out.append(target)
        offset += target.num_outputs
    return out


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def encode(ds: Dataset, targets: Sequence[Target]) -> np.ndarray:
    """The training label matrix ``[N, sum(num_labels)]`` (float32): standardised regression
    values, 0/1 labels, class indices."""
    parts = []
    for t in targets:
        if t.task == "categorical":
            lookup = {c: i for i, c in enumerate(t.classes)}
            values = ds.labels[t.columns[0]].tolist()
            missing = sorted({v for v in values if v not in lookup}, key=str)
            if missing:
                raise ValueError(
                    f"target {t.name!r}: classes {missing[:5]} were not seen when the "
                    f"model was trained (its classes: {list(t.classes)[:10]})"
                )
            parts.append(np.asarray([lookup[v] for v in values], np.float64)[:, None])
        else:
            y = np.stack([ds.labels[c].astype(np.float64) for c in t.columns], 1)
            if t.task == "regression":
                y = (y - np.asarray(t.mean)) / np.asarray(t.std)
            parts.append(y)
    return np.concatenate(parts, 1).astype(np.float32)


def _split_labels(targets: Sequence[Target], y: Array) -> list[Array]:
    out, start = [], 0
    for t in targets:
        out.append(y[..., start : start + t.num_labels])
        start += t.num_labels
    return out


def loss(targets: Sequence[Target], outputs: Array, y: Array, weights: Array) -> Array:
    """Weighted mean loss over examples, summed over targets.

    Args:
      outputs: ``[B, num_outputs]``; y: ``[B, num_labels]``; weights: ``[B]`` (0 for padding).
    """
    total = 0.0
    denom = jnp.maximum(weights.sum(), 1.0)
    for t, y_t in zip(targets, _split_labels(targets, y)):
        out = outputs[:, t.offset : t.offset + t.num_outputs]
        if t.task == "regression":
            per = jnp.mean((out - y_t) ** 2, axis=1)
        elif t.task in ("binary", "multilabel"):
            per = jnp.mean(optax.sigmoid_binary_cross_entropy(out, y_t), axis=1)
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(out, y_t[:, 0].astype(jnp.int32))
        total = total + jnp.sum(per * weights) / denom
    return total


def metrics(targets: Sequence[Target], outputs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Metrics of one model on one split (numpy; no padding rows).

    Returns:
      ``{"loss": float, target_name: {metric: value}}``.
    """
    outputs, y = np.asarray(outputs, np.float64), np.asarray(y, np.float64)
    result: dict[str, Any] = {}
    total = 0.0
    for t, y_t in zip(targets, _split_labels(targets, y)):
        out = outputs[:, t.offset : t.offset + t.num_outputs]
        m: dict[str, Any] = {}
        if t.task == "regression":
            m["mse"] = float(np.mean((out - y_t) ** 2))  # standardised units, as the loss
            # The same errors in the targets' own units (what the Predictor returns).
            m["mse_target_units"] = float(np.mean(((out - y_t) * np.asarray(t.std)) ** 2))
            ss_res = ((out - y_t) ** 2).sum(0)
            ss_tot = ((y_t - y_t.mean(0)) ** 2).sum(0)
            m["r2"] = float(np.mean(1.0 - ss_res / np.maximum(ss_tot, 1e-12)))
            taus = [stats.kendalltau(out[:, j], y_t[:, j]).statistic for j in range(out.shape[1])]
            m["kendall_tau"] = float(np.nanmean(taus)) if len(y_t) > 1 else float("nan")
            m["loss"] = m["mse"]
        elif t.task in ("binary", "multilabel"):
            # Stable sigmoid cross-entropy: max(x, 0) - x y + log(1 + exp(-|x|)).
            bce = np.maximum(out, 0) - out * y_t + np.log1p(np.exp(-np.abs(out)))
            correct = (out > 0) == (y_t > 0.5)
            m["loss"] = float(bce.mean())
            m["accuracy"] = float(correct.mean())
            if t.task == "binary":
                m["auroc"] = auroc(out[:, 0], y_t[:, 0] > 0.5)
                m["tpr_at_1pct_fpr"] = tpr_at_fpr(out[:, 0], y_t[:, 0] > 0.5, 0.01)
            if t.task == "multilabel":
                m["per_label_accuracy"] = {c: float(a) for c, a in zip(t.columns, correct.mean(0))}
        else:
            logp = out - _logsumexp(out)
            idx = y_t[:, 0].astype(int)
            m["loss"] = float(-np.mean(logp[np.arange(len(idx)), idx]))
            m["accuracy"] = float(np.mean(out.argmax(1) == idx))
        total += m["loss"]
        result[t.name] = m
    result["loss"] = total
    return result


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores [N]`` for the labels ``positive [N]`` (bool):
    the probability that a random positive scores above a random negative, a tie
    counting one half (the Mann-Whitney statistic, from average ranks). NaN without
    both classes."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # average ranks: ties share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_auroc(
    scores: np.ndarray, positive: np.ndarray, strata: np.ndarray
) -> tuple[float, float]:
    """AUROC over the (positive, negative) pairs of the same stratum only, and its spread
    under no signal.

    The probability that a positive scores above a negative *of its own stratum* (a tie
    counts one half): ``sum_s U_s / sum_s P_s N_s``, ``U_s`` the Mann-Whitney statistic of
    stratum ``s`` with ``P_s`` positives and ``N_s`` negatives. A score that only tells the
    strata apart (a confounder binned into them) gets 0.5 in expectation, whatever its
    plain AUROC. Under no signal within strata each ``U_s`` has variance
    ``P_s N_s (P_s + N_s + 1) / 12`` and the strata are independent, so the standard
    deviation is ``sqrt(sum_s P_s N_s (P_s + N_s + 1) / 12) / sum_s P_s N_s``.

    Returns:
      ``(auroc, null_sd)``; both NaN when no stratum holds both classes.
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    strata = np.asarray(strata)
    if not scores.shape == positive.shape == strata.shape:
        raise ValueError(
            f"stratified_auroc: scores {list(scores.shape)}, positive {list(positive.shape)} "
            f"and strata {list(strata.shape)} must have one shape"
        )
    u = pairs = var = 0.0
    for s in np.unique(strata):
        sel = strata == s
        n_pos, n_neg = int(positive[sel].sum()), int((~positive[sel]).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        u += auroc(scores[sel], positive[sel]) * n_pos * n_neg
        pairs += n_pos * n_neg
        var += n_pos * n_neg * (n_pos + n_neg + 1) / 12.0
    if pairs == 0:
        return float("nan"), float("nan")
    return u / pairs, float(np.sqrt(var) / pairs)


def tpr_at_fpr(scores: np.ndarray, positive: np.ndarray, fpr: float) -> float:
    """The highest true-positive rate of a threshold rule ``score > t`` whose
    false-positive rate on these negatives is at most ``fpr``.

    At most ``floor(fpr * num_negatives)`` negatives may score above ``t``, so ``t`` is
    the next-highest negative score and positives must score strictly above it (a
    positive tied with that negative is not counted: flagging it would flag the
    negative too). With under ``1 / fpr`` negatives no false alarm is allowed at all.
    NaN without both classes.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"tpr_at_fpr: fpr must lie in [0, 1), got {fpr}")
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    neg = np.sort(scores[~positive])[::-1]
    if positive.sum() == 0 or len(neg) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(neg) + 1e-9))  # 1e-9: 0.01 * 300 is 3, not 2.99..
    return float(np.mean(scores[positive] > neg[allowed]))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    mx = x.max(1, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(1, keepdims=True))


def decode(targets: Sequence[Target], outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Model outputs in the targets' own units: regression values (de-standardised),
    label probabilities, class probabilities. ``{column or name: [B] or [B, C]}``."""
    outputs = np.asarray(outputs, np.float64)
    out: dict[str, np.ndarray] = {}
    for t in targets:
        o = outputs[..., t.offset : t.offset + t.num_outputs]
        if t.task == "regression":
            values = o * np.asarray(t.std) + np.asarray(t.mean)
            for j, c in enumerate(t.columns):
                out[c] = values[..., j]
        elif t.task in ("binary", "multilabel"):
            probs = 1.0 / (1.0 + np.exp(-o))
            for j, c in enumerate(t.columns):
                out[f"p({c})"] = probs[..., j]
        else:
            p = np.exp(o - o.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[t.columns[0]] = np.asarray(t.classes, dtype=object)[p.argmax(-1)]
            for j, c in enumerate(t.classes):
                out[f"p({t.columns[0]}={c})"] = p[..., j]
    return out
