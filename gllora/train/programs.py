"""The jitted programs of a run: the model applied to one example, the train step over
seeds and examples, prediction, best-model bookkeeping; and the model, optimiser and
input scales a config asks for."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from gllora import group, models, parallel
from gllora.io import dataset as dataset_lib
from gllora.lora import Lora, in_axes
from gllora.train import pipeline, tasks

Array = jax.Array


def build_model(config: ml_collections.ConfigDict, num_outputs: int):
    hparams = dict(config.models[config.model])
    return models.build(config.model, num_outputs=num_outputs, **hparams)


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


# -- the model as a function of one example --------------------------------------------


def scale_input(lora: Lora, scales: tuple[Array, ...]) -> Lora:
    """Multiplies each group's ``u`` and ``v`` by fixed scalars (``scales[g] = [c_u, c_v]``).

    Scalars commute with every ``g``: GL-invariant models stay GL-invariant. They put
    LoRA entries of any magnitude (~1e-3 for real adapters) in the range where
    LayerNorm's epsilon does not swamp the signal.
    """
    return lora.replace(
        u=tuple(u * s[0] for u, s in zip(lora.u, scales)),
        v=tuple(v * s[1] for v, s in zip(lora.v, scales)),
    )


def input_scales(
    ds: dataset_lib.Dataset, ids: np.ndarray, ranks, enabled: bool
) -> tuple[np.ndarray, ...]:
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


class Programs:
    """The jitted programs of a run: init, train step, prediction, best-model bookkeeping.

    They run on ``mesh`` (default: every device): batches come split along ``B``,
    predictions return replicated, and :meth:`place` pins the state's shardings.
    """

    def __init__(self, config, model, targets, tx, mesh: Mesh | None = None):
        self.config, self.model, self.targets, self.tx = config, model, targets, tx
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        replicated = parallel.replicated(self.mesh)
        self.state_shardings = None
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict, out_shardings=replicated)
        self.init = jax.jit(self._init)
        self.update_best = jax.jit(self._update_best, donate_argnums=0)

    def place(self, abstract, strict: bool = True):
        """Shardings of the state ``abstract`` on the mesh; the steps keep the state on them.

        Replicated, except the ``GroupedDense`` kernels under ``config.shard_params``
        (``strict=False``: replicate a kernel that does not split evenly).
        """
        shard_params = self.config.get("shard_params", "none")
        self.state_shardings = parallel.state_shardings(abstract, self.mesh, shard_params, strict)
        replicated = parallel.replicated(self.mesh)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(self.state_shardings, replicated)
        )
        self.update_best = jax.jit(
            self._update_best, donate_argnums=0, out_shardings=self.state_shardings
        )
        return self.state_shardings

    def _apply(self, params, consts, lora, train, key):
        lora = scale_input(lora, consts["input_scale"])
        variables = {"params": params, **{k: v for k, v in consts.items() if k != "input_scale"}}
        if not train:
            return self.model.apply(variables, lora)
        k_drop, k_aug = jax.random.split(key)
        if self.config.augment != "none":
            lora = group.random_action(
                k_aug, lora, self.config.augment, max_cond=self.config.augment_max_cond
            )
        return self.model.apply(variables, lora, train=True, rngs={"dropout": k_drop})

    def _init(self, key, template: Lora, scales):
        variables = self.model.init(key, scale_input(template, scales))
        params = variables.pop("params")
        return params, {**variables, "input_scale": scales}

    def _train_step(self, state, batch: Lora, y, w):
        """One step for every seed: ``batch`` ``[k, n, S, B, r]``, ``y [S, B, C]``, ``w [S, B]``."""
        step = state["step"]

        def per_seed(params, opt_state, consts, key_data, lora, y, w):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
            keys = jax.random.split(key, y.shape[0])

            def loss_fn(p):
                out = jax.vmap(
                    lambda x, k: self._apply(p, consts, x, True, k),
                    in_axes=(in_axes(lora, "rank_major"), 0),
                )(lora, keys)
                return tasks.loss(self.targets, out, y, w)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params, opt_state, loss = jax.vmap(
            per_seed, in_axes=(0, 0, 0, 0, pipeline.seed_in_axes(batch), 0, 0)
        )(state["params"], state["opt_state"], state["consts"], state["key"], batch, y, w)
        return {**state, "params": params, "opt_state": opt_state, "step": step + 1}, loss

    def _predict(self, params, consts, lora: Lora):
        """Outputs of every seed on one rank-major batch: ``[S, B, num_outputs]``."""

        def per_seed(p, c):
            return jax.vmap(
                lambda x: self._apply(p, c, x, False, None), in_axes=(in_axes(lora, "rank_major"),)
            )(lora)

        return jax.vmap(per_seed)(params, consts)

    @staticmethod
    def _update_best(state, val_loss, epoch):
        improved = val_loss < state["best_loss"]
        pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        return {
            **state,
            "best_params": jax.tree_util.tree_map(pick, state["params"], state["best_params"]),
            "best_loss": jnp.where(improved, val_loss, state["best_loss"]),
            "best_epoch": jnp.where(improved, epoch, state["best_epoch"]),
        }
