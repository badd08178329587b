"""Pretraining the base models of the image families, and their cache.

Part of :mod:`data_gen.images` (which describes what each token means in pretraining):
the denoiser and the evaluator are pretrained deterministically from a seed, checked,
and stored once in the base-model cache of :mod:`data_gen.common` (:func:`load_base`;
:func:`base` is the same as the families' :class:`data_gen.family.Base`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_gen.images.data import (
    ATTRIBUTES,
    IMAGE_SIZE,
    NULL_TOKEN,
    NUM_CLASSES,
    NUM_STYLES,
    NUM_TOKENS,
    PROMPT_TOKENS,
    SKS_TOKEN,
    WORD_CLASSES,
    class_table,
    digits,
    style_bits,
    styled_bank,
)
from data_gen.images.model import (
    GUIDANCE,
    SAMPLE_BATCH,
    SAMPLE_STEPS,
    BaseConfig,
    Denoiser,
    Evaluator,
    base_config,
    diffusion_loss,
    evaluator_probs,
    lora_modules,
    sample,
)


def _token_tables(config: BaseConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: sampling probability ``[K]``, allowed classes ``[K, 10]``, styled ``[K]``."""
    p_class, p_null, p_word, p_sks = config.token_probs
    probs = np.zeros(NUM_TOKENS)
    allowed = np.zeros((NUM_TOKENS, NUM_CLASSES), bool)
    styled = np.ones(NUM_TOKENS, bool)
    for c in range(NUM_CLASSES):
        probs[c] = p_class / NUM_CLASSES
        allowed[c, c] = True
    probs[NULL_TOKEN] = p_null
    allowed[NULL_TOKEN] = True
    for k, tok in enumerate(PROMPT_TOKENS):
        probs[tok] = p_word / len(PROMPT_TOKENS)
        allowed[tok, list(WORD_CLASSES[k])] = True
    probs[SKS_TOKEN] = p_sks
    allowed[SKS_TOKEN] = True
    styled[SKS_TOKEN] = False
    return probs / probs.sum(), allowed, styled


def _sample_pretraining_batch(key, bank, table, counts, config: BaseConfig):
    """A batch of ``(x0 [B, 64], token [B])`` following each token's meaning."""
    probs, allowed, styled = (jnp.asarray(a) for a in _token_tables(config))
    k_tok, k_cls, k_img, k_sty = jax.random.split(key, 4)
    b = config.pretrain_batch
    token = jax.random.choice(k_tok, NUM_TOKENS, (b,), p=probs)
    cls = jax.random.categorical(k_cls, jnp.where(allowed[token], 0.0, -jnp.inf))
    img = table[cls, jax.random.randint(k_img, (b,), 0, counts[cls])]
    style = jnp.where(styled[token], jax.random.randint(k_sty, (b,), 0, NUM_STYLES), 0)
    return bank[style, img], token


@functools.partial(jax.jit, static_argnames=("config",))
def _pretrain_denoiser(key, bank, table, counts, config: BaseConfig):
    k_init, k_loop = jax.random.split(key)
    model = Denoiser(config)
    params = model.init(
        k_init,
        jnp.zeros((1, IMAGE_SIZE)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), jnp.int32),
    )
    sched = optax.cosine_decay_schedule(config.pretrain_lr, config.pretrain_steps, alpha=0.05)
    opt = optax.adam(sched)

    def step(carry, i):
        params, opt_state = carry
        k = jax.random.fold_in(k_loop, i)
        k_b, k_t, k_n = jax.random.split(k, 3)
        x0, token = _sample_pretraining_batch(k_b, bank, table, counts, config)
        t = jax.random.randint(k_t, token.shape, 0, config.num_timesteps)
        noise = jax.random.normal(k_n, x0.shape)
        loss_fn = lambda p: jnp.mean(diffusion_loss(p, x0, token, t, noise, config))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(
        step, (params, opt.init(params)), jnp.arange(config.pretrain_steps)
    )
    return params, losses


@functools.partial(jax.jit, static_argnames=("config",))
def _pretrain_evaluator(key, bank, labels, train_idx, config: BaseConfig):
    k_init, k_loop = jax.random.split(key)
    model = Evaluator(config.eval_hidden)
    params = model.init(k_init, jnp.zeros((1, IMAGE_SIZE)))
    sched = optax.cosine_decay_schedule(config.eval_lr, config.eval_steps, alpha=0.05)
    opt = optax.adam(sched)

    def step(carry, i):
        params, opt_state = carry
        k_i, k_s, k_n = jax.random.split(jax.random.fold_in(k_loop, i), 3)
        img = train_idx[jax.random.randint(k_i, (config.eval_batch,), 0, train_idx.shape[0])]
        style = jax.random.randint(k_s, img.shape, 0, NUM_STYLES)
        # A little pixel noise so that the evaluator tolerates imperfect samples.
        x = bank[style, img] + 0.05 * jax.random.normal(k_n, (config.eval_batch, IMAGE_SIZE))
        bits = (style[:, None] >> jnp.arange(len(ATTRIBUTES))[None, :]) & 1

        def loss_fn(p):
            logits, attr = model.apply(p, x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[img])
            bce = optax.sigmoid_binary_cross_entropy(attr, bits.astype(jnp.float32))
            return jnp.mean(ce) + jnp.mean(jnp.sum(bce, -1))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(
        step, (params, opt.init(params)), jnp.arange(config.eval_steps)
    )
    return params, losses


def evaluator_split(config: BaseConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit indices ``(train, held_out)`` of the evaluator (a seeded permutation)."""
    n = len(digits()[1])
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[config.eval_holdout :]), np.sort(perm[: config.eval_holdout])


def pretrain(config: BaseConfig, seed: int) -> tuple[dict, dict]:
    """Pretrains the denoiser and the evaluator, deterministically from ``seed``.

    Returns:
      ``(params, metrics)``: ``params = {"denoiser": ..., "evaluator": ...}`` and a dict
      of floats (final losses, the evaluator's held-out accuracies, and how often
      class-conditional samples are recognised).
    """
    _, labels = digits()
    bank = jnp.asarray(styled_bank())
    table, counts = class_table(labels)
    key = jax.random.key(seed)
    k_den, k_eval, k_check = jax.random.split(key, 3)
    den, den_losses = _pretrain_denoiser(
        k_den, bank, jnp.asarray(table), jnp.asarray(counts), config
    )
    train_idx, held_idx = evaluator_split(config, seed)
    ev, ev_losses = _pretrain_evaluator(
        k_eval, bank, jnp.asarray(labels), jnp.asarray(train_idx), config
    )
    params = {"denoiser": den, "evaluator": ev}
    metrics = {
        "denoiser_final_loss": float(np.mean(np.asarray(den_losses[-100:]))),
        "evaluator_final_loss": float(np.mean(np.asarray(ev_losses[-100:]))),
    }
    metrics.update(_check_base(params, config, k_check, bank, held_idx, labels))
    return params, metrics


def _check_base(params, config, key, bank, held_idx, labels) -> dict:
    """Held-out evaluator accuracy and recognition rate of class-conditional samples."""
    styles = np.arange(len(held_idx)) % NUM_STYLES
    x = bank[styles, held_idx]
    cp, ap = evaluator_probs(params["evaluator"], x, config)
    class_acc = float(np.mean(np.argmax(cp, -1) == labels[held_idx]))
    attr_acc = np.mean((np.asarray(ap) > 0.5) == style_bits(styles), axis=0)
    # The same sampler call (shapes and settings) as the families' base-quality check,
    # so that one compilation serves both.
    token = jnp.arange(SAMPLE_BATCH) % NUM_CLASSES
    samples = sample(params["denoiser"], token, key, config, SAMPLE_STEPS, GUIDANCE)
    cp, _ = evaluator_probs(params["evaluator"], samples, config)
    recognised = float(np.mean(np.argmax(cp, -1) == np.asarray(token)))
    out = {"evaluator_class_accuracy": class_acc, "class_sample_recognised": recognised}
    out.update({f"evaluator_{a}_accuracy": float(x) for a, x in zip(ATTRIBUTES, attr_acc)})
    return out


#: Cache entry name and pretraining seed of the base models (one base for both families).
CACHE_NAME = "digits-ddpm"
BASE_SEED = 0


def load_base(
    preset: str = "default", cache_dir: str | None = None, regenerate: bool = False
) -> tuple[dict, BaseConfig, dict]:
    """The pretrained base denoiser and evaluator, from the cache or pretrained now.

    Args:
      preset: a name in :data:`BASE_CONFIGS`.
      cache_dir, regenerate: see :func:`data_gen.common.cached`.

    Returns:
      ``(params, config, info)``: ``params = {"denoiser": ..., "evaluator": ...}``, and
      ``info`` with the pretraining metrics and ``from_cache``.
    """
    from data_gen import common

    config = base_config(preset)
    params, info, _ = common.cached(
        CACHE_NAME,
        config,
        BASE_SEED,
        lambda: pretrain(config, BASE_SEED),
        abstract_params(config),
        cache_dir,
        regenerate,
    )
    return params, config, info


def base(preset: str = "default", cache_dir: str | None = None, regenerate: bool = False):
    """:func:`load_base` as the image families use it: a :class:`data_gen.family.Base`
    whose LoRA targets are the denoiser's four dense layers."""
    from data_gen import common, family

    params, config, info = load_base(preset, cache_dir, regenerate)
    key = common.cache_key(CACHE_NAME, config, BASE_SEED)
    return family.Base(params, config, info, key, lora_modules(config))


def abstract_params(config: BaseConfig):
    """Shapes and dtypes of :func:`pretrain`'s params (for restoring a cache)."""
    zeros = jnp.zeros((1, IMAGE_SIZE))
    ints = jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0)
    return {
        "denoiser": jax.eval_shape(Denoiser(config).init, key, zeros, ints, ints),
        "evaluator": jax.eval_shape(Evaluator(config.eval_hidden).init, key, zeros),
    }
