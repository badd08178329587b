"""Arithmetic-sources LoRAs (the Qwen2-ARC-LoRA analogue): rank-4 K/V LoRAs of a small LM.

Each LoRA finetunes the base LM of :mod:`data_gen.arith` on a random subset of the 19
droppable question sources (plus source 0, always kept), with random learning rate,
weight decay, epochs, batch size and LoRA dropout shaped like the paper's Table 8
(learning rate shifted by :data:`LR_SHIFT` decades, batch sizes scaled by 1/4). Labels:
source membership (19 bits), validation loss over all 20 sources' held-out questions,
accuracy on a 4-way multiple-choice challenge set of question types never trained on
(:data:`data_gen.tasks.CHALLENGE_TYPES`), every hyperparameter and the per-LoRA seed;
the base model's validation loss and challenge accuracy go into the provenance.

Run (the command is :mod:`data_gen.arith_sources`)::

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

The finetuning and evaluation are in :mod:`data_gen.arith.finetune`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_gen import common, family
from data_gen.arith import lm, tasks
from data_gen.arith.finetune import (
    ALPHA_PER_RANK,
    BATCH_SIZES,
    DROPOUT_RANGE,
    EPOCHS,
    EVAL_BATCH,
    LOG10_LR_RANGE,
    LOG10_WD_RANGE,
    LR_SHIFT,
    MICRO_BATCH,
    device_data,
    evaluate_chunk,
    evaluate_one,
    finetune_chunk,
    sample_lora,
)
from data_gen.arith.lm import BaseConfig
from data_gen.arith.pretrain import base

#: Named sizes: number of LoRAs.
SIZES = {"quick": 256, "paper": 2000}
DEFAULT_RANK = 4
#: LoRAs per vmapped chunk: on 2 CPU cores the CPU time per LoRA step is lowest at
#: 32-64 (0.30 ms, against 0.41 ms one at a time and 0.38 ms at 256: larger chunks fall
#: out of cache), and smaller chunks waste fewer steps on their shorter LoRAs.
DEFAULT_CHUNK = 64
TRAIN_PER_SOURCE = 32
VAL_PER_SOURCE = 16
CHALLENGE_PER_TYPE = 20


# -- generation -----------------------------------------------------------------------

#: The dataset's targets (what an LoL model can be trained to predict).
TARGETS = {
    "membership": {
        "task": "multilabel",
        "columns": [f"source_{s:02d}" for s in range(1, tasks.NUM_DROPPABLE + 1)],
    },
    "val_loss": {"task": "regression", "columns": ["val_loss"]},
    "challenge_acc": {"task": "regression", "columns": ["challenge_acc"]},
    "learning_rate": {"task": "regression", "columns": ["log10_learning_rate"]},
    "weight_decay": {"task": "regression", "columns": ["log10_weight_decay"]},
    "epochs": {"task": "categorical", "columns": ["epochs"]},
    "batch_size": {"task": "categorical", "columns": ["batch_size"]},
    "lora_dropout": {"task": "regression", "columns": ["lora_dropout"]},
}


def default_chunk(num_loras: int) -> int:
    """:data:`DEFAULT_CHUNK`, or less for small datasets, so that there are ~8 chunks:
    a chunk's loop runs as long as its longest LoRA, and fewer LoRAs per chunk waste
    fewer steps (quick size: 32 per chunk, 14% wasted, against 146% in one chunk)."""
    return int(min(DEFAULT_CHUNK, max(8, -(-num_loras // 8))))


def max_micro_steps(num_train: int) -> int:
    """Micro-batches of the longest possible finetune (all but one source, most epochs)."""
    per_source = num_train // len(tasks.SOURCES)
    return max(EPOCHS) * (num_train - per_source) // MICRO_BATCH


def finetune_hparams(plans: list[dict], seeds: np.ndarray, num_train: int) -> dict:
    """The per-LoRA inputs of :func:`data_gen.arith.finetune.finetune_chunk` (``hp``), each
    with a leading ``[N]`` axis, from the plans of :func:`sample_lora`; the data orders
    are zero-padded to the longest possible finetune."""
    order = np.zeros((len(plans), max_micro_steps(num_train), MICRO_BATCH), np.int32)
    for i, p in enumerate(plans):
        order[i, : len(p["order"])] = p["order"]
    return {
        "a_init": np.stack([p["a_init"] for p in plans]),
        "lr": np.asarray([p["learning_rate"] for p in plans], np.float32),
        "weight_decay": np.asarray([p["weight_decay"] for p in plans], np.float32),
        "dropout": np.asarray([p["lora_dropout"] for p in plans], np.float32),
        "accum": np.asarray([p["batch_size"] // MICRO_BATCH for p in plans], np.int32),
        "num_micro_steps": np.asarray([len(p["order"]) for p in plans], np.int32),
        "num_updates": np.asarray([p["num_updates"] for p in plans], np.int32),
        "epochs": np.asarray([p["epochs"] for p in plans], np.int32),
        "seed": seeds.astype(np.uint32),
        "order": order,
    }


def hparam_labels(plans: list[dict]) -> dict[str, np.ndarray]:
    """The hyperparameter label columns of the plans of :func:`sample_lora`, ``[N]`` each."""
    labels = {}
    for key in ("learning_rate", "log10_learning_rate", "weight_decay", "log10_weight_decay"):
        labels[key] = np.asarray([p[key] for p in plans], np.float64)
    for key in ("epochs", "batch_size", "num_train_questions", "num_updates"):
        labels[key] = np.asarray([p[key] for p in plans], np.int64)
    labels["lora_dropout"] = np.asarray([p["lora_dropout"] for p in plans], np.float64)
    return labels


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
    questions = tasks.make_questions(
        seed, config.seq_len, TRAIN_PER_SOURCE, VAL_PER_SOURCE, CHALLENGE_PER_TYPE
    )
    data = device_data(questions, EVAL_BATCH)
    modules = lm.lora_modules(config)
    a_shape = (len(modules), config.width, rank)
    seeds = common.lora_seeds(np.random.default_rng([seed, 3]), num_loras)
    plans = [sample_lora(int(s), questions["train_source"], a_shape, lr_shift) for s in seeds]
    hp = finetune_hparams(plans, seeds, len(questions["train_source"]))
    num_micro = hp["num_micro_steps"]
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
    for s in range(tasks.NUM_DROPPABLE):
        labels[f"source_{s + 1:02d}"] = membership[:, s]
    labels["val_loss"] = metrics["val_loss"].astype(np.float64)
    labels["challenge_acc"] = metrics["challenge_acc"].astype(np.float64)
    labels.update(hparam_labels(plans))
    labels["train_loss"] = train_loss.astype(np.float64)
    for s in range(len(tasks.SOURCES)):
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


def _generated(
    base_model: family.Base, n: int, seed: int, rank: int, chunk: int | None
) -> family.Generated:
    factors, labels, info, stats = generate(
        base_model.params, base_model.config, n, seed, rank=rank, chunk=chunk or default_chunk(n)
    )
    provenance = {
        "alpha": ALPHA_PER_RANK * rank,
        "target_modules": "key and value projections of every layer",
        "init": "v (lora_A^T) uniform +-1/sqrt(m) per LoRA, u = alpha/r * lora_B = 0",
        "sources": [tasks.source_name(s) for s in range(len(tasks.SOURCES))],
        "always_kept_source": tasks.source_name(0),
        "membership_columns": TARGETS["membership"]["columns"],
        "challenge_types": [f"{tasks.OP_NAMES[op]}/T{t}" for op, t in tasks.CHALLENGE_TYPES],
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
    }
    base_extra = {
        "val_loss": info["base_val_loss"],
        "challenge_acc": info["base_challenge_acc"],
        "val_loss_per_source": info["base_val_loss_per_source"],
    }
    counts = {k: info[k] for k in info if k.startswith("num_")}
    return family.Generated(factors, labels, stats, provenance, base_extra, counts)


FAMILY = family.Family(
    name="arith_sources",
    command="data_gen.arith_sources",
    analogue_of="Qwen2-ARC-LoRA (Learning on LoRAs, section 5.1, appendix D.2)",
    sizes=SIZES,
    default_rank=DEFAULT_RANK,
    targets=TARGETS,
    load_base=base,
    generate=_generated,
)
#: Generates the arithmetic-sources dataset folder; see :meth:`data_gen.family.Family.run`.
run = FAMILY.run
