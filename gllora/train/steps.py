"""The steps of a run as pure functions: apply, create_train_state, train_step, predict.

As in flax's ``examples/imagenet/train.py``: module-level functions of explicit
arguments, jitted where they are called (``jax.jit(functools.partial(train_step,
setup), ...)``), with the static parts of a run (the model, the optimiser, the targets,
the batch layout, augmentation) in one frozen :class:`Setup`.

Shapes: ``S`` seeds train together (every leaf of the state has a leading ``[S]``), each
on its own ``B`` examples; a batch carries both axes in the model's layout
(:func:`gllora.lora.batch_axes`): ``u [S, B, k, n, r]`` (``"leading"``) or
``[k, n, S, B, r]`` (``"rank_major"``). :func:`apply` sees ONE example; every other
function ``vmap``s it over examples, then seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gllora import group, models
from gllora.lora import Lora, batch_axes, seed_axes
from gllora.models import w2t
from gllora.train import tasks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run's steps close over: fixed for the run, not traced."""

    model: nn.Module
    tx: optax.GradientTransformation
    targets: tuple[tasks.Target, ...]
    layout: str  # the model's batch layout (gllora.models.layout)
    # "gl" / "o": a random group element on every training example; "perm_sign": W2T's
    # random permutation of the rank components and joint sign flips (each p = 0.5).
    augment: str = "none"
    augment_max_cond: float = 4.0
    # Parameters, inputs and arithmetic; "float64" (with jax_enable_x64) makes runs that
    # differ only in summation order (devices, batching of seeds) agree to ~1e-15.
    dtype: str = "float32"


def build_model(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    return models.build(config.model, num_outputs=num_outputs, **dict(config.models[config.model]))


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    lr = (
        optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
        if config.schedule == "cosine"
        else config.learning_rate
    )
    if config.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.sgd(lr, momentum=0.9)
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def make_setup(
    config: ml_collections.ConfigDict, targets, total_steps: int, layout: str | None = None
) -> Setup:
    """The :class:`Setup` a config asks for (``layout``: the model's, unless given)."""
    model = build_model(config, sum(t.num_outputs for t in targets))
    return Setup(
        model=model,
        tx=make_optimizer(config, total_steps),
        targets=tuple(targets),
        layout=layout or models.layout(config.model),
        augment=str(config.augment),
        augment_max_cond=float(config.augment_max_cond),
        dtype=str(config.get("dtype", "float32")),
    )


# -- the model on one example ------------------------------------------------------------


def scale_input(lora: Lora, scales: tuple[Array, ...]) -> Lora:
    """Multiplies each group's ``u`` and ``v`` by fixed scalars (``scales[g] = [c_u, c_v]``).

    Scalars commute with every ``g``: GL-invariant models stay GL-invariant. They put
    LoRA entries of any magnitude (~1e-3 for real adapters) in the range where
    LayerNorm's epsilon does not swamp the signal.
    """
    if isinstance(scales, dict):  # several structures: scales keyed by group key
        scales = tuple(scales[g.key] for g in lora.spec.groups)
    return lora.replace(
        u=tuple(u * s[0] for u, s in zip(lora.u, scales)),
        v=tuple(v * s[1] for v, s in zip(lora.v, scales)),
    )


def input_scales(ds, ids: np.ndarray, ranks, enabled: bool) -> tuple[np.ndarray, ...]:
    """Per group ``[1/rms(u), 1/rms(v)]`` over up to 256 training LoRAs (or ones); numpy."""
    if not enabled:
        return tuple(np.ones(2, np.float32) for _ in ds.spec.groups)
    sample = ds.batch(np.sort(ids[:256]), ranks=ranks)
    out = []
    for u, v, rank in zip(sample.u, sample.v, sample.rank):
        live = float(rank.sum())  # live (unpadded) columns over the sample
        cu, cv = _rms(u, live * u.shape[-2]), _rms(v, live * v.shape[-2])
        out.append(np.asarray([1.0 / max(cu, 1e-30), 1.0 / max(cv, 1e-30)], np.float32))
    return tuple(out)


def _rms(x: np.ndarray, count: float) -> float:
    """Root mean square of the ``count`` live entries of ``x`` (padding is zero)."""
    return math.sqrt(float((x.astype(np.float64) ** 2).sum()) / max(count, 1.0))


def _variables(params, consts) -> dict[str, Any]:
    """The model's variables: its parameters and every constant but the input scales."""
    return {"params": params, **{k: v for k, v in consts.items() if k != "input_scale"}}


def apply(
    setup: Setup,
    params,
    consts,
    lora: Lora | models.Featurized,
    *,
    train: bool = False,
    key: Array | None = None,
) -> Array:
    """The model on ONE (input-scaled, in training augmented) LoRA, or on its features
    computed ahead by :func:`featurize`: ``[num_outputs]``.

    ``consts`` holds the input scales and the model's non-parameter collections (its
    ``lora_spec`` record, O-Align's template).
    """
    variables = _variables(params, consts)
    ahead = isinstance(lora, models.Featurized)  # features computed ahead (featurize)
    if ahead:
        lora = jax.tree_util.tree_map(lambda x: x.astype(setup.dtype), lora)
    else:
        lora = scale_input(lora.astype(setup.dtype), consts["input_scale"])
    if not train:
        return setup.model.apply(variables, lora)
    k_drop, k_aug = jax.random.split(key)
    # Features are computed ahead only for runs without augmentation (train/loop.py).
    if setup.augment == "perm_sign" and not ahead:
        lora = w2t.augment_lora(k_aug, lora, 0.5)
    elif setup.augment != "none" and not ahead:
        lora = group.random_action(k_aug, lora, setup.augment, max_cond=setup.augment_max_cond)
    return setup.model.apply(variables, lora, train=True, rngs={"dropout": k_drop})


def _init_variables(setup: Setup, key: Array, template, scales) -> tuple[Any, Any]:
    if isinstance(template, (tuple, list)):  # several structures: the union of their inits
        from gllora.train.multi import merge_variables

        variables = merge_variables(
            [dict(setup.model.init(key, scale_input(t, scales))) for t in template]
        )
    else:
        variables = dict(setup.model.init(key, scale_input(template, scales)))
    params = variables.pop("params")
    return _cast(params, setup.dtype), _cast({**variables, "input_scale": scales}, setup.dtype)


def _cast(tree, dtype: str):
    """Floating-point leaves of ``tree`` cast to ``dtype`` (integer records kept)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


# -- the state ------------------------------------------------------------------------


def create_train_state(setup: Setup, keys: Array, templates: Lora, scales) -> dict[str, Any]:
    """Every seed's state before training.

    Args:
      keys: the seeds' PRNG key data, ``[S, 2]``.
      templates: one LoRA per seed, ``[S, ...]`` (layout ``"leading"``): the input shapes,
        and O-Align's template; for a dataset of several structures, a tuple of them,
        one per structure (the parameters are the union of the inits).
      scales: the input scales (:func:`input_scales`), shared by the seeds (a dict by
        group key for several structures).

    Returns:
      ``{"step", "params", "consts", "opt_state", "best_params", "best_loss",
      "best_epoch", "key"}``, every leaf but ``step`` with a leading ``[S]``.
    """
    init_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), 1))(keys)
    params, consts = jax.vmap(lambda k, t: _init_variables(setup, k, t, scales), in_axes=(0, 0))(
        init_keys, templates
    )
    S = keys.shape[0]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "consts": consts,
        "opt_state": jax.vmap(setup.tx.init)(params),
        # A copy: the train step donates its state, and one buffer cannot be donated twice.
        "best_params": jax.tree_util.tree_map(jnp.copy, params),
        "best_loss": jnp.full((S,), jnp.inf, jnp.float32),
        "best_epoch": jnp.zeros((S,), jnp.int32),
        "key": jnp.asarray(keys),
    }


# -- the steps ------------------------------------------------------------------------


def train_step(setup: Setup, state: dict[str, Any], batch: Lora, y: Array, w: Array):
    """One optimiser step for every seed.

    Args:
      batch: ``S x B`` examples in ``setup.layout``.
      y: labels ``[S, B, C]``; ``w``: example weights ``[S, B]``.

    Returns:
      ``(state, loss [S])``: dropout and augmentation keys are a function of the seed's
      key, the step and the example's position only.
    """
    step = state["step"]
    example_axes = batch_axes(batch, setup.layout)
    y, w = y.astype(setup.dtype), w.astype(setup.dtype)

    def per_seed(params, opt_state, consts, key_data, lora, y, w):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
        keys = jax.random.split(key, y.shape[0])

        def loss_fn(p):
            out = jax.vmap(
                lambda x, k: apply(setup, p, consts, x, train=True, key=k),
                in_axes=(example_axes, 0),
            )(lora, keys)
            return tasks.loss(setup.targets, out, y, w)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = setup.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, loss = jax.vmap(
        per_seed, in_axes=(0, 0, 0, 0, seed_axes(batch, setup.layout), 0, 0)
    )(state["params"], state["opt_state"], state["consts"], state["key"], batch, y, w)
    return {**state, "params": params, "opt_state": opt_state, "step": step + 1}, loss


def predict(setup: Setup, params, consts, batch: Lora, layout: str) -> Array:
    """Every seed's outputs on one batch of ``B`` examples in ``layout``: ``[S, B, C]``.

    The same examples for every seed (``batch`` has no seed axis), except for a
    :class:`~gllora.models.Featurized` batch (:func:`featurize`), which is per seed:
    ``[S, B, ...]``.
    """
    if isinstance(batch, models.Featurized):
        per_example = lambda p, c, x: jax.vmap(lambda e: apply(setup, p, c, e))(x)
        return jax.vmap(per_example)(params, consts, batch)
    axes = batch_axes(batch, layout)

    def per_seed(p, c):
        return jax.vmap(lambda x: apply(setup, p, c, x), in_axes=(axes,))(batch)

    return jax.vmap(per_seed)(params, consts)


def featurize(setup: Setup, params, consts, batch: Lora, layout: str) -> models.Featurized:
    """Every seed's model inputs on one batch of ``B`` examples, computed ahead of the
    model (only for ``models.fixed_features`` models, without augmentation: the features
    do not change during training): a :class:`~gllora.models.Featurized` with leaves
    ``[S, B, k, F]``, which :func:`apply` and :func:`predict` take in place of a batch.

    ``params`` are not read (the features have none) but complete the variables.
    """
    axes = batch_axes(batch, layout)

    def per_seed(p, c):
        one = lambda x: setup.model.apply(
            _variables(p, c), scale_input(x.astype(setup.dtype), c["input_scale"]),
            features_only=True,
        )  # fmt: skip
        return jax.vmap(one, in_axes=(axes,))(batch)

    return jax.vmap(per_seed)(params, consts)


def update_best(state: dict[str, Any], val_loss: Array, epoch: Array) -> dict[str, Any]:
    """Keeps each seed's parameters of its lowest validation loss so far."""
    improved = val_loss < state["best_loss"]
    pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return {
        **state,
        "best_params": jax.tree_util.tree_map(pick, state["params"], state["best_params"]),
        "best_loss": jnp.where(improved, val_loss, state["best_loss"]),
        "best_epoch": jnp.where(improved, epoch, state["best_epoch"]),
    }
