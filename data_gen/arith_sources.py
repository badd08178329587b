"""Arithmetic-sources LoRAs (the Qwen2-ARC-LoRA analogue): rank-4 K/V LoRAs of a small LM.

Each LoRA finetunes the base LM of :mod:`data_gen.arith_lm` on a random subset of the 19
droppable question sources (plus source 0, always kept), with random learning rate,
weight decay, epochs, batch size and LoRA dropout shaped like the paper's Table 8
(learning rate shifted by :data:`LR_SHIFT` decades, batch sizes scaled by 1/4). Labels:
source membership (19 bits), validation loss over all 20 sources' held-out questions,
accuracy on a 4-way multiple-choice challenge set of question types never trained on
(:data:`data_gen.arith_lm.CHALLENGE_TYPES`), every hyperparameter and the per-LoRA seed;
the base model's validation loss and challenge accuracy go into the provenance.

Run::

    python -m data_gen.arith_sources --size=quick --out=/tmp/arith_quick
    python -m data_gen.arith_sources --size=paper --out=DIR [--seed=0 --chunk=64
        --cache_dir=DIR --regenerate --base_config=tiny --overwrite]

All finetunes of a chunk run as ONE jitted program (:func:`finetune_chunk`), vmapped
over LoRA parameters, data order and per-LoRA hyperparameters: a LoRA's number of steps
is the trip count of its (batched) loop, its batch size a gradient-accumulation count
over micro-batches of 8, its learning rate a linear-decay schedule. Base parameters and
data are arguments, never closed over, and the last chunk is padded, so one compile
serves the whole dataset; the LoRA axis is a plain leading axis of every per-LoRA input.
LoRAs are sorted by their number of steps before chunking, so a chunk's loop runs about
as long as each of its LoRAs needs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from data_gen import arith_lm, common
from data_gen.arith_lm import BaseConfig

Array = jax.Array

FAMILY = "arith_sources"
#: Named sizes: number of LoRAs.
SIZES = {"quick": 256, "paper": 2000}
DEFAULT_RANK = 4
#: LoRAs per vmapped chunk: on 2 CPU cores the CPU time per LoRA step is lowest at
#: 32-64 (0.30 ms, against 0.41 ms one at a time and 0.38 ms at 256: larger chunks fall
#: out of cache), and smaller chunks waste fewer steps on their shorter LoRAs.
DEFAULT_CHUNK = 64
#: LoRA alpha is ``2 * rank`` (alpha 8 at rank 4): the scale ``alpha / r`` is 2.
ALPHA_PER_RANK = 2.0
MICRO_BATCH = 8
EVAL_BATCH = 80
TRAIN_PER_SOURCE = 32
VAL_PER_SOURCE = 16
CHALLENGE_PER_TYPE = 20
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
    num_drop = int(rng.integers(1, arith_lm.NUM_DROPPABLE + 1))
    dropped = rng.choice(arith_lm.NUM_DROPPABLE, num_drop, replace=False) + 1
    membership = np.ones(arith_lm.NUM_DROPPABLE, bool)
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
    names = [name for name, _, _ in arith_lm.lora_modules(config)]
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
    model = arith_lm.ArithLM(config)
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
        loss, g = jax.value_and_grad(loss_fn)(
            lora, hp["order"][i], arith_lm.mix_seed(hp["seed"], i)
        )
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
    model = arith_lm.ArithLM(config)
    names = [name for name, _, _ in arith_lm.lora_modules(config)]
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
    num_sources = len(arith_lm.SOURCES)
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


# -- generation -----------------------------------------------------------------------

#: The dataset's targets (what an LoL model can be trained to predict).
TARGETS = {
    "membership": {
        "task": "multilabel",
        "columns": [f"source_{s:02d}" for s in range(1, arith_lm.NUM_DROPPABLE + 1)],
    },
    "val_loss": {"task": "regression", "columns": ["val_loss"]},
    "challenge_acc": {"task": "regression", "columns": ["challenge_acc"]},
    "learning_rate": {"task": "regression", "columns": ["log10_learning_rate"]},
    "weight_decay": {"task": "regression", "columns": ["log10_weight_decay"]},
    "epochs": {"task": "categorical", "columns": ["epochs"]},
    "batch_size": {"task": "categorical", "columns": ["batch_size"]},
    "lora_dropout": {"task": "regression", "columns": ["lora_dropout"]},
}


def load_base(
    base_config: str = "default", cache_dir: str | None = None, regenerate: bool = False
) -> tuple[Any, BaseConfig, dict]:
    """The pretrained base LM (cached): ``(params, config, info)``."""
    config = arith_lm.base_config(base_config)
    seed = 0  # the base model's seed is part of the family, not of the dataset
    abstract = jax.eval_shape(lambda: arith_lm.init_params(config, seed))
    params, info, _ = common.cached(
        "arith-lm",
        config,
        seed,
        lambda: arith_lm.pretrain(config, seed),
        abstract,
        cache_dir,
        regenerate,
    )
    return params, config, info


def default_chunk(num_loras: int) -> int:
    """:data:`DEFAULT_CHUNK`, or less for small datasets, so that there are ~8 chunks:
    a chunk's loop runs as long as its longest LoRA, and fewer LoRAs per chunk waste
    fewer steps (quick size: 32 per chunk, 14% wasted, against 146% in one chunk)."""
    return int(min(DEFAULT_CHUNK, max(8, -(-num_loras // 8))))


def max_micro_steps(num_train: int) -> int:
    """Micro-batches of the longest possible finetune (all but one source, most epochs)."""
    per_source = num_train // len(arith_lm.SOURCES)
    return max(EPOCHS) * (num_train - per_source) // MICRO_BATCH


def generate(
    params,
    config: BaseConfig,
    num_loras: int,
    seed: int = 0,
    rank: int = DEFAULT_RANK,
    chunk: int = DEFAULT_CHUNK,
    lr_shift: float = LR_SHIFT,
) -> tuple[dict, dict, dict, dict]:
    """Finetunes and evaluates ``num_loras`` LoRAs, in memory.

    Returns:
      ``(factors, labels, info, stats)``: ``factors {name: (u [N, n, r], v [N, m, r])}``,
      ``labels {column: [N]}``, ``info`` (the question counts and the base model's
      metrics, for the provenance) and ``stats`` (timings).
    """
    questions = arith_lm.make_questions(
        seed, config.seq_len, TRAIN_PER_SOURCE, VAL_PER_SOURCE, CHALLENGE_PER_TYPE
    )
    data = device_data(questions, EVAL_BATCH)
    modules = arith_lm.lora_modules(config)
    a_shape = (len(modules), config.width, rank)
    seeds = common.lora_seeds(np.random.default_rng([seed, 3]), num_loras)
    plans = [sample_lora(int(s), questions["train_source"], a_shape, lr_shift) for s in seeds]
    steps = max_micro_steps(len(questions["train_source"]))
    order = np.zeros((num_loras, steps, MICRO_BATCH), np.int32)
    for i, p in enumerate(plans):
        order[i, : len(p["order"])] = p["order"]
    num_micro = np.asarray([len(p["order"]) for p in plans], np.int32)
    hp = {
        "a_init": np.stack([p["a_init"] for p in plans]),
        "lr": np.asarray([p["learning_rate"] for p in plans], np.float32),
        "weight_decay": np.asarray([p["weight_decay"] for p in plans], np.float32),
        "dropout": np.asarray([p["lora_dropout"] for p in plans], np.float32),
        "accum": np.asarray([p["batch_size"] // MICRO_BATCH for p in plans], np.int32),
        "num_micro_steps": num_micro,
        "num_updates": np.asarray([p["num_updates"] for p in plans], np.int32),
        "epochs": np.asarray([p["epochs"] for p in plans], np.int32),
        "seed": seeds.astype(np.uint32),
        "order": order,
    }
    train = {k: data[k] for k in ("train_tokens", "train_read_pos", "train_target")}
    evaluation = {k: v for k, v in data.items() if not k.startswith("train_")}
    # Longest first: a chunk's loop runs as long as its longest LoRA, and the padded
    # last chunk then holds the shortest ones.
    by_steps = np.argsort(-num_micro, kind="stable")
    (u, v, train_loss), train_stats = common.run_chunked(
        finetune_chunk, {"hp": hp}, chunk, by_steps, (config, params, train), "finetune"
    )
    metrics, eval_stats = common.run_chunked(
        evaluate_chunk, {"u": u, "v": v}, chunk, None, (config, params, evaluation), "evaluate"
    )
    zeros = jnp.zeros_like(u[0])
    base = jax.device_get(evaluate_one(config, params, evaluation, zeros, jnp.zeros_like(v[0])))

    labels: dict[str, np.ndarray] = {"seed": seeds}
    membership = np.stack([p["membership"] for p in plans])
    for s in range(arith_lm.NUM_DROPPABLE):
        labels[f"source_{s + 1:02d}"] = membership[:, s]
    labels["val_loss"] = metrics["val_loss"].astype(np.float64)
    labels["challenge_acc"] = metrics["challenge_acc"].astype(np.float64)
    for key in ("learning_rate", "log10_learning_rate", "weight_decay", "log10_weight_decay"):
        labels[key] = np.asarray([p[key] for p in plans], np.float64)
    for key in ("epochs", "batch_size", "num_train_questions", "num_updates"):
        labels[key] = np.asarray([p[key] for p in plans], np.int64)
    labels["lora_dropout"] = np.asarray([p["lora_dropout"] for p in plans], np.float64)
    labels["train_loss"] = train_loss.astype(np.float64)
    for s in range(len(arith_lm.SOURCES)):
        labels[f"val_loss_source_{s:02d}"] = metrics["val_loss_per_source"][:, s].astype(np.float64)
    factors = {name: (u[:, i], v[:, i]) for i, (name, _, _) in enumerate(modules)}
    info = {
        "base_val_loss": float(base["val_loss"]),
        "base_challenge_acc": float(base["challenge_acc"]),
        "base_val_loss_per_source": [float(x) for x in base["val_loss_per_source"]],
        "num_train_questions": len(questions["train_source"]),
        "num_val_questions": len(questions["val_source"]),
        "num_challenge_questions": len(questions["challenge_label"]),
    }
    stats = {
        "chunk": chunk,
        "finetune_seconds": train_stats.total_seconds,
        "finetune_first_chunk_seconds": train_stats.first_seconds,
        "evaluate_seconds": eval_stats.total_seconds,
        "evaluate_first_chunk_seconds": eval_stats.first_seconds,
        "micro_steps": int(num_micro.sum()),
    }
    return factors, labels, info, stats


def run(
    out: str,
    size: str | int = "quick",
    seed: int = 0,
    rank: int | None = None,
    cache_dir: str | None = None,
    regenerate: bool = False,
    chunk: int | None = None,
    base_config: str = "default",
    overwrite: bool = False,
) -> dict:
    """Generates the arithmetic-sources dataset folder ``out``; returns timings and counts."""
    n = common.parse_size(size, SIZES)
    rank = DEFAULT_RANK if rank is None else rank
    start = time.perf_counter()
    params, config, base_info = load_base(base_config, cache_dir, regenerate)
    base_seconds = time.perf_counter() - start
    factors, labels, info, stats = generate(
        params, config, n, seed, rank=rank, chunk=chunk or default_chunk(n)
    )
    provenance = {
        "generator": "data_gen.arith_sources",
        "family": FAMILY,
        "analogue_of": "Qwen2-ARC-LoRA (Learning on LoRAs, section 5.1, appendix D.2)",
        "seed": seed,
        "size": str(size),
        "num_loras": n,
        "rank": rank,
        "alpha": ALPHA_PER_RANK * rank,
        "target_modules": "key and value projections of every layer",
        "init": "v (lora_A^T) uniform +-1/sqrt(m) per LoRA, u = alpha/r * lora_B = 0",
        "sources": [arith_lm.source_name(s) for s in range(len(arith_lm.SOURCES))],
        "always_kept_source": arith_lm.source_name(0),
        "membership_columns": TARGETS["membership"]["columns"],
        "challenge_types": [f"{arith_lm.OP_NAMES[op]}/T{t}" for op, t in arith_lm.CHALLENGE_TYPES],
        "questions_per_source": {"train": TRAIN_PER_SOURCE, "validation": VAL_PER_SOURCE},
        "challenge_questions_per_type": CHALLENGE_PER_TYPE,
        "challenge_choices": 4,
        "hyperparameters": {
            "log10_learning_rate": [LOG10_LR_RANGE[0] + LR_SHIFT, LOG10_LR_RANGE[1] + LR_SHIFT],
            "paper_log10_learning_rate": list(LOG10_LR_RANGE),
            "learning_rate_shift_decades": LR_SHIFT,
            "log10_weight_decay": list(LOG10_WD_RANGE),
            "epochs": list(EPOCHS),
            "batch_size": list(BATCH_SIZES),
            "paper_batch_size": [4 * b for b in BATCH_SIZES],
            "lora_dropout": list(DROPOUT_RANGE),
            "dropped_sources": "count uniform in 1..19, then a uniform subset of that size",
        },
        "optimizer": "AdamW (torch semantics), linear decay to 0, micro-batches of 8 "
        "accumulated to the batch size",
        "chunk": stats["chunk"],
        "base_model": {
            "cache_key": common.cache_key("arith-lm", config, 0),
            "preset": base_config,
            "config": base_info["config"],
            "metrics": base_info["metrics"],
            "val_loss": info["base_val_loss"],
            "challenge_acc": info["base_challenge_acc"],
            "val_loss_per_source": info["base_val_loss_per_source"],
        },
        **{k: info[k] for k in info if k.startswith("num_")},
    }
    common.write_dataset(
        out,
        arith_lm.lora_modules(config),
        factors,
        labels,
        TARGETS,
        provenance,
        split_seed=seed,
        overwrite=overwrite,
    )
    stats.update(
        num_loras=n,
        base_seconds=base_seconds,
        base_from_cache=base_info["from_cache"],
        total_seconds=time.perf_counter() - start,
        peak_memory_mb=common.peak_memory_mb(),
    )
    logging.info("arith_sources: wrote %d LoRAs to %s: %s", n, out, stats)
    return stats


common.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    run(
        FLAGS.out,
        FLAGS.size,
        FLAGS.seed,
        FLAGS.rank,
        FLAGS.cache_dir,
        FLAGS.regenerate,
        FLAGS.chunk,
        FLAGS.base_config,
        FLAGS.overwrite,
    )


if __name__ == "__main__":
    app.run(main)
