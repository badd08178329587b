"""Pretraining the base LM of the arithmetic families, and its cache.

Part of :mod:`data_gen.arith`: the base LM is pretrained deterministically from a seed on
random statements (:func:`data_gen.arith.tasks.sample_statements`) and stored once in
the base-model cache of :mod:`data_gen.common` (:func:`load_base`; :func:`base` is the
same as the families' :class:`data_gen.family.Base`). Every arithmetic family finetunes
this one base model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_gen.arith.lm import ArithLM, BaseConfig, base_config, lora_modules
from data_gen.arith.tasks import sample_statements

Array = jax.Array

#: Cache entry name and pretraining seed of the base LM: the seed is part of the
#: families, not of a dataset.
CACHE_NAME = "arith-lm"
BASE_SEED = 0


def init_params(config: BaseConfig, seed: int):
    """Randomly initialised base parameters."""
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    return ArithLM(config).init(jax.random.key(seed), tokens)["params"]


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(1, 2))
def _pretrain_steps(config: BaseConfig, params, opt_state, key, start, num_steps):
    """``num_steps`` AdamW steps of the answer's loss on fresh statements (one ``scan``)."""
    model = ArithLM(config)
    tx = _pretrain_optimizer(config)

    def loss_fn(p, toks, ans):
        logits = model.apply({"params": p}, toks, read_pos=ans - 1)
        targets = toks[jnp.arange(toks.shape[0]), ans]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    def step(carry, i):
        p, s = carry
        toks, ans = sample_statements(
            jax.random.fold_in(key, i), config.pretrain_batch, config.seq_len
        )
        loss, grads = jax.value_and_grad(loss_fn)(p, toks, ans)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), start + jnp.arange(num_steps)
    )
    return params, opt_state, losses


def _pretrain_optimizer(config: BaseConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.pretrain_lr,
        config.pretrain_warmup,
        config.pretrain_steps,
        end_value=0.02 * config.pretrain_lr,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


@functools.partial(jax.jit, static_argnames=("config",))
def statement_accuracy(config: BaseConfig, params, key: Array) -> Array:
    """Fraction of 4,096 fresh statements whose answer the model gets right (argmax)."""
    toks, ans = sample_statements(key, 4096, config.seq_len)
    logits = ArithLM(config).apply({"params": params}, toks, read_pos=ans - 1)
    return jnp.mean(jnp.argmax(logits, -1) == toks[jnp.arange(toks.shape[0]), ans])


def pretrain(config: BaseConfig, seed: int, log_every: int = 500):
    """Pretrains the base LM, deterministically from ``seed``.

    The loss is the cross-entropy of each statement's answer (the rest of a statement
    is random), so the last layer runs at the answer's position only.

    Returns:
      ``(params, metrics)`` with metrics ``{"loss", "statement_accuracy"}``.
    """
    if config.seq_len < 8:
        raise ValueError(f"seq_len must be at least 8 (statements), got {config.seq_len}")
    params = init_params(config, seed)
    opt_state = _pretrain_optimizer(config).init(params)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    losses = []
    for start in range(0, config.pretrain_steps, log_every):
        num = min(log_every, config.pretrain_steps - start)
        params, opt_state, loss = _pretrain_steps(config, params, opt_state, key, start, num)
        losses.append(np.asarray(loss))
    acc = statement_accuracy(config, params, jax.random.fold_in(jax.random.key(seed), 2))
    metrics = {"loss": float(np.mean(losses[-1][-50:])), "statement_accuracy": float(acc)}
    return params, metrics


def load_base(
    preset: str = "default", cache_dir: str | None = None, regenerate: bool = False
) -> tuple[dict, BaseConfig, dict]:
    """The pretrained base LM, from the cache or pretrained now.

    Args:
      preset: a name in :data:`data_gen.arith.lm.BASE_CONFIGS`.
      cache_dir, regenerate: see :func:`data_gen.common.cached`.

    Returns:
      ``(params, config, info)``; ``info`` holds the pretraining metrics and ``from_cache``.
    """
    from data_gen import common

    config = base_config(preset)
    abstract = jax.eval_shape(lambda: init_params(config, BASE_SEED))
    params, info, _ = common.cached(
        CACHE_NAME,
        config,
        BASE_SEED,
        lambda: pretrain(config, BASE_SEED),
        abstract,
        cache_dir,
        regenerate,
    )
    return params, config, info


def base(preset: str = "default", cache_dir: str | None = None, regenerate: bool = False):
    """:func:`load_base` as the arithmetic families use it: a :class:`data_gen.family.Base`
    whose LoRA targets are the key and value projections of every layer."""
    from data_gen import common, family

    params, config, info = load_base(preset, cache_dir, regenerate)
    key = common.cache_key(CACHE_NAME, config, BASE_SEED)
    return family.Base(params, config, info, key, lora_modules(config))
