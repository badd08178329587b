"""Finetuning and evaluating arithmetic-sources LoRAs, a chunk at once.

Part of :mod:`data_gen.arith`, used by :mod:`data_gen.arith.sources` (which describes
the family): the hyperparameter distribution of one LoRA (the paper's Table 8,
shifted and scaled), :func:`finetune_chunk` (vmapped AdamW with gradient accumulation
and LoRA dropout) and :func:`evaluate_chunk` (validation loss and challenge accuracy).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_gen.arith import lm, tasks
from data_gen.arith.lm import BaseConfig

Array = jax.Array

#: LoRA alpha is ``2 * rank`` (alpha 8 at rank 4): the scale ``alpha / r`` is 2.
ALPHA_PER_RANK = 2.0
MICRO_BATCH = 8
EVAL_BATCH = 80
#: Table 8, with batch sizes scaled by 1/4 (our pool is ~1/5 of ARC's training set).
EPOCHS = (2, 3, 4)
BATCH_SIZES = (8, 16, 32)
LOG10_LR_RANGE = (-5.0, -3.0)
LOG10_WD_RANGE = (-6.0, -2.0)
DROPOUT_RANGE = (0.0, 0.1)
#: Decades added to Table 8's learning-rate exponent: with the 4-300 updates a CPU
#: affords, learning rates under ~1e-3 barely move a LoRA (val loss within 1% of the
#: base's) and ~1e-1 overshoots (challenge accuracy at chance), so 10^U[-5, -3] becomes
#: 10^U[-3.5, -1.5].
LR_SHIFT = 1.5


# -- hyperparameters -----------------------------------------------------------------


def sample_lora(
    lora_seed: int,
    train_source: np.ndarray,
    a_shape: tuple[int, int, int],
    lr_shift: float = LR_SHIFT,
) -> dict[str, Any]:
    """Hyperparameters, kept sources and data order of one LoRA, from its seed (numpy).

    The number of dropped sources is uniform in 1..19, then the dropped set uniform of
    that size (the paper's Appendix D.2).

    Args:
      lora_seed: the LoRA's seed.
      train_source: ``[P]`` the source of every question of the training pool.
      a_shape: ``(L, m, r)``, the shape of the stacked initial ``v`` factors.
      lr_shift: decades added to the paper's learning-rate exponent.

    Returns:
      a dict of scalars, ``membership [19]`` bool, ``order [steps, MICRO_BATCH]``
      indices into the training pool (epoch by epoch, each a permutation of the kept
      questions) and ``a_init [L, m, r]``, the initial ``v`` of every module (PEFT's
      ``lora_A``, uniform in ``+-1/sqrt(m)``; ``u`` starts at zero).
    """
    rng = np.random.default_rng([lora_seed, 1])
    num_drop = int(rng.integers(1, tasks.NUM_DROPPABLE + 1))
    dropped = rng.choice(tasks.NUM_DROPPABLE, num_drop, replace=False) + 1
    membership = np.ones(tasks.NUM_DROPPABLE, bool)
    membership[dropped - 1] = False
    log10_lr = rng.uniform(*LOG10_LR_RANGE) + lr_shift
    log10_wd = rng.uniform(*LOG10_WD_RANGE)
    epochs = int(rng.choice(EPOCHS))
    batch_size = int(rng.choice(BATCH_SIZES))
    dropout = float(rng.uniform(*DROPOUT_RANGE))
    kept = np.flatnonzero(np.concatenate([[True], membership])[train_source])
    if len(kept) % batch_size:
        raise ValueError(
            f"{len(kept)} training questions do not split into batches of {batch_size}"
        )
    order = np.concatenate([rng.permutation(kept) for _ in range(epochs)]).astype(np.int32)
    bound = 1.0 / np.sqrt(a_shape[1])
    a_init = rng.uniform(-bound, bound, a_shape).astype(np.float32)
    return {
        "membership": membership,
        "log10_learning_rate": log10_lr,
        "learning_rate": 10.0**log10_lr,
        "log10_weight_decay": log10_wd,
        "weight_decay": 10.0**log10_wd,
        "epochs": epochs,
        "batch_size": batch_size,
        "lora_dropout": dropout,
        "num_train_questions": len(kept),
        "num_updates": len(order) // batch_size,
        "order": order.reshape(-1, MICRO_BATCH),
        "a_init": a_init,
    }


# -- the vmapped finetune -------------------------------------------------------------


def _lora_map(config: BaseConfig, b: Array, a: Array, scale: Array | float) -> dict:
    names = [name for name, _, _ in lm.lora_modules(config)]
    return {name: (scale * b[i], a[i]) for i, name in enumerate(names)}


def _finetune_one(config: BaseConfig, params, data, hp):
    """Finetunes ONE LoRA: AdamW (torch semantics) with gradient accumulation.

    Args:
      hp: ``a_init [L, m, r]``, ``lr``, ``weight_decay``, ``dropout`` (float32),
        ``accum`` (micro-batches per update), ``num_micro_steps``, ``num_updates``,
        ``epochs`` (int32), ``seed`` (uint32, seeds the dropout masks) and
        ``order [S, MICRO_BATCH]`` (int32, indices into the training pool; rows past
        ``num_micro_steps`` are never read).

    Returns:
      ``(u [L, n, r], v [L, m, r], mean training loss of the last epoch's micro-batches)``.
    """
    model = lm.ArithLM(config)
    scale = ALPHA_PER_RANK
    tokens, read_pos, target = data["train_tokens"], data["train_read_pos"], data["train_target"]
    a0 = hp["a_init"]
    b0 = jnp.zeros((a0.shape[0], config.kv_width, a0.shape[2]), a0.dtype)

    def loss_fn(lora, idx, seed):
        logits = model.apply(
            {"params": params},
            tokens[idx],
            lora=_lora_map(config, *lora, scale),
            dropout=(seed, hp["dropout"]),
            read_pos=read_pos[idx],
        )
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, target[idx]))

    b1, b2, eps = 0.9, 0.999, 1e-8

    def body(i, state):
        lora, mu, nu, acc, t, loss_sum = state
        loss, g = jax.value_and_grad(loss_fn)(lora, hp["order"][i], lm.mix_seed(hp["seed"], i))
        acc = jax.tree.map(jnp.add, acc, g)
        update = (i + 1) % hp["accum"] == 0
        # Linear decay to zero over the LoRA's updates (the Hugging Face Trainer default).
        lr = hp["lr"] * (1.0 - t.astype(jnp.float32) / hp["num_updates"])
        t1 = (t + 1).astype(jnp.float32)
        g = jax.tree.map(lambda x: x / hp["accum"], acc)
        mu1 = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, mu, g)
        nu1 = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, nu, g)
        new = jax.tree.map(
            lambda p, m, v: (
                p * (1.0 - lr * hp["weight_decay"])
                - lr * (m / (1 - b1**t1)) / (jnp.sqrt(v / (1 - b2**t1)) + eps)
            ),
            lora,
            mu1,
            nu1,
        )
        pick = lambda x, y: jax.tree.map(lambda p, q: jnp.where(update, p, q), x, y)
        zeros = jax.tree.map(jnp.zeros_like, acc)
        last_epoch = i >= hp["num_micro_steps"] - hp["num_micro_steps"] // hp["epochs"]
        return (
            pick(new, lora),
            pick(mu1, mu),
            pick(nu1, nu),
            pick(zeros, acc),
            jnp.where(update, t + 1, t),
            loss_sum + jnp.where(last_epoch, loss, 0.0),
        )

    zeros = (jnp.zeros_like(b0), jnp.zeros_like(a0))
    state = ((b0, a0), zeros, zeros, zeros, jnp.int32(0), jnp.float32(0))
    (b, a), *_, loss_sum = jax.lax.fori_loop(0, hp["num_micro_steps"], body, state)
    per_epoch = hp["num_micro_steps"] // hp["epochs"]
    return scale * b, a, loss_sum / per_epoch


@functools.partial(jax.jit, static_argnames=("config",))
def finetune_chunk(config: BaseConfig, params, data, hp):
    """Finetunes a chunk of LoRAs at once: ``vmap`` of :func:`_finetune_one` over ``hp``.

    Args:
      config: the base LM (static).
      params: base parameters (shared).
      data: ``train_tokens [P, T]``, ``train_read_pos [P]``, ``train_target [P]``
        (shared: the training pool of :func:`device_data`).
      hp: per-LoRA inputs of :func:`_finetune_one`, each with a leading chunk axis ``C``.

    Returns:
      ``(u [C, L, n, r], v [C, L, m, r], train_loss [C])``.
    """
    return jax.vmap(_finetune_one, in_axes=(None, None, None, 0))(config, params, data, hp)


def _evaluate_one(config: BaseConfig, params, data, u, v, eval_batch: int):
    """Validation loss (overall and per source) and challenge accuracy of ONE LoRA.

    Questions are read in blocks of ``eval_batch`` (``lax.map``) to bound memory.
    """
    model = lm.ArithLM(config)
    names = [name for name, _, _ in lm.lora_modules(config)]
    lora = {name: (u[i], v[i]) for i, name in enumerate(names)}
    tokens, read_pos = data["eval_tokens"], data["eval_read_pos"]
    E, T = tokens.shape
    logits = jax.lax.map(
        lambda x: model.apply({"params": params}, x[0], lora=lora, read_pos=x[1]),
        (tokens.reshape(E // eval_batch, eval_batch, T), read_pos.reshape(-1, eval_batch)),
    ).reshape(E, -1)
    logp = jax.nn.log_softmax(logits)
    V = data["val_source"].shape[0]
    val_nll = -jnp.take_along_axis(logp[:V], data["val_target"][:, None], axis=1)[:, 0]
    num_sources = len(tasks.SOURCES)
    per_source = jax.ops.segment_sum(val_nll, data["val_source"], num_sources) / (
        jax.ops.segment_sum(jnp.ones_like(val_nll), data["val_source"], num_sources)
    )
    C = data["challenge_label"].shape[0]
    choice_logp = jnp.take_along_axis(logp[V : V + C], data["challenge_choices"], axis=1)
    correct = jnp.argmax(choice_logp, axis=1) == data["challenge_label"]
    return {
        "val_loss": jnp.mean(val_nll),
        "val_loss_per_source": per_source,
        "challenge_acc": jnp.mean(correct.astype(jnp.float32)),
    }


@functools.partial(jax.jit, static_argnames=("config", "eval_batch"))
def evaluate_chunk(config: BaseConfig, params, data, u, v, eval_batch: int = EVAL_BATCH):
    """Evaluates a chunk of LoRAs, ``u [C, L, n, r]``, ``v [C, L, m, r]`` -> metrics ``[C, ...]``.

    ``data``: the evaluation entries of :func:`device_data` (shared). Metrics:
    ``val_loss [C]`` (mean answer cross-entropy over every source's validation
    questions), ``val_loss_per_source [C, 20]`` and ``challenge_acc [C]`` (the share of
    challenge questions whose right choice has the highest likelihood, as lm-eval
    scores ARC).
    """
    fn = functools.partial(_evaluate_one, config, eval_batch=eval_batch)
    return jax.vmap(fn, in_axes=(None, None, 0, 0))(params, data, u, v)


def device_data(questions: Mapping[str, np.ndarray], eval_batch: int) -> dict[str, np.ndarray]:
    """The shared inputs of :func:`finetune_chunk` and :func:`evaluate_chunk`.

    Sequences are cut after the last position any question is read at (the answer is a
    separate target), and validation and challenge questions are evaluated as one set,
    padded to a multiple of ``eval_batch`` with copies of the first question (ignored).
    """

    def split(name):
        toks, pos = questions[f"{name}_tokens"], questions[f"{name}_answer_pos"]
        return toks, pos - 1, toks[np.arange(len(toks)), pos]

    train_tokens, train_read, train_target = split("train")
    val_tokens, val_read, val_target = split("val")
    chal_tokens, chal_read, _ = split("challenge")
    tokens = np.concatenate([val_tokens, chal_tokens])
    read = np.concatenate([val_read, chal_read])
    pad = -len(tokens) % eval_batch
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    read = np.concatenate([read, np.repeat(read[:1], pad)])
    width = int(max(train_read.max(), read.max())) + 1
    return {
        "train_tokens": train_tokens[:, :width],
        "train_read_pos": train_read,
        "train_target": train_target,
        "eval_tokens": tokens[:, :width],
        "eval_read_pos": read,
        "val_target": val_target,
        "val_source": questions["val_source"],
        "challenge_choices": questions["challenge_choices"],
        "challenge_label": questions["challenge_label"],
    }


@functools.partial(jax.jit, static_argnames=("config", "eval_batch"))
def evaluate_one(config: BaseConfig, params, data, u, v, eval_batch: int = EVAL_BATCH):
    """:func:`_evaluate_one` for one LoRA (the base model: ``u = 0``)."""
    return _evaluate_one(config, params, data, u, v, eval_batch)


@functools.partial(jax.jit, static_argnames=("config",))
def finetune_chunk_own_data(config: BaseConfig, params, data, hp):
    """:func:`finetune_chunk` with a training pool per LoRA: ``data`` entries carry the
    chunk axis too (``train_tokens [C, P, T]``, ``train_read_pos [C, P]``,
    ``train_target [C, P]``), so LoRAs finetuned on different data (clean and poisoned
    pools, :mod:`data_gen.arith.backdoors`) share one compiled program.

    Returns:
      ``(u [C, L, n, r], v [C, L, m, r], train_loss [C])``.
    """
    return jax.vmap(_finetune_one, in_axes=(None, None, 0, 0))(config, params, data, hp)
