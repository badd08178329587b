r"""Digit subsets: the Imagenette-LoRA analogue (paper section 5.1, appendix D.1.2).

For each non-empty subset of the 10 digit classes, two LoRAs (rank 32, on the four
dense layers of the base DDPM's denoiser, PEFT-style init with a random ``v`` per LoRA)
are finetuned DreamBooth-style on one handwritten image per present class (plain
style, a different random image per LoRA), prompted ``sks``, with the fixed
hyperparameters of the paper's Table 7 (learning rate 3e-4, 150 steps, batch 1).
Labels: the 10 membership bits and the dataset size, the per-LoRA seed, the subset
(10 characters, the c-th is 1 if class c is present), and what was measured on the
finetuned model: the losses on its images with and without the LoRA, and the fraction
of its samples that the evaluator assigns to a class of the subset.

Run (the command is :mod:`data_gen.digit_subsets`)::

    python -m data_gen.digit_subsets --size=quick --out=/tmp/digit_subsets
    python -m data_gen.digit_subsets --size=paper --out=DIR    # 1,023 subsets x 2

With ``--size=N`` other than the paper's 2,046, the first ``N`` of a seeded sequence
that lists every subset in a random order, then every subset again in another order,
and so on: any ``N <= 1023`` gives distinct subsets.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from data_gen import common, family
from data_gen.images.data import NUM_CLASSES, SKS_TOKEN, digits, styled_bank
from data_gen.images.finetune import FinetuneConfig, evaluate_chunk, finetune_chunk
from data_gen.images.model import BaseConfig
from data_gen.images.pretrain import base

SIZES = {"quick": 512, "paper": 2046}
DEFAULT_RANK = 32
#: The paper's Table 7, unshifted (see ``data_gen.images.personas.LR_SHIFT`` for why).
LEARNING_RATE = 3e-4
STEPS = 150
BATCH_SIZE = 1
DEFAULT_CHUNK = 256
_FAMILY_ID = 2
CLASS_COLUMNS = tuple(f"has_{c}" for c in range(NUM_CLASSES))


def finetune_config(rank: int = DEFAULT_RANK) -> FinetuneConfig:
    """The static finetuning settings of a digit-subset LoRA of rank ``rank``."""
    if not 1 <= rank <= 128:
        raise ValueError(f"digit_subsets: rank must be in [1, 128], got {rank}")
    return FinetuneConfig(rank=rank, alpha=float(rank), max_steps=STEPS, max_batch=BATCH_SIZE)


def sample_plan(n: int, seed: int) -> dict[str, np.ndarray]:
    """Draws the subsets, images and seeds of ``n`` LoRAs.

    Returns:
      ``{column: array}``: ``subset`` (``[n]`` bitmask in ``[1, 1023]``), ``members``
      (``[n, 10]`` bool), ``images`` (``[n, 10]`` digit indices, the first
      ``dataset_size`` valid, one per present class in class order, -1 after), ``seed``.
    """
    rng = np.random.default_rng([seed, _FAMILY_ID])
    _, labels = digits()
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    all_subsets = np.arange(1, 2**NUM_CLASSES)
    reps = -(-n // len(all_subsets))
    subset = np.concatenate([rng.permutation(all_subsets) for _ in range(reps)])[:n]
    members = (subset[:, None] >> np.arange(NUM_CLASSES)) & 1 == 1
    images = np.full((n, NUM_CLASSES), -1, np.int64)
    for i, row in enumerate(members):
        present = np.flatnonzero(row)
        images[i, : len(present)] = [rng.choice(by_class[c]) for c in present]
    return {
        "subset": subset,
        "members": members,
        "images": images,
        "seed": common.lora_seeds(rng, n),
    }


def finetune_inputs(n: int, seed: int) -> tuple[dict, dict, dict]:
    """``(plan, data, hparams)`` as :func:`data_gen.images.personas.finetune_inputs`; images
    ``[n, 10, 64]``, the first ``dataset_size`` of each row used."""
    plan = sample_plan(n, seed)
    data = {
        "images": styled_bank()[0][np.maximum(plan["images"], 0)],
        "num_images": plan["members"].sum(1).astype(np.int32),
        "token": np.full(n, SKS_TOKEN, np.int32),
        "seed": plan["seed"].astype(np.int32),
    }
    hparams = {
        "learning_rate": np.full(n, LEARNING_RATE, np.float32),
        "steps": np.full(n, STEPS, np.int32),
        "batch_size": np.full(n, BATCH_SIZE, np.int32),
    }
    return plan, data, hparams


def generate(
    params: dict,
    config: BaseConfig,
    n: int,
    seed: int,
    rank: int = DEFAULT_RANK,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[dict, dict, dict]:
    """Finetunes and measures ``n`` digit-subset LoRAs (in memory).

    Returns:
      ``(factors, labels, stats)`` as :func:`data_gen.images.personas.generate`.
    """
    plan, data, hparams = finetune_inputs(n, seed)
    ft = finetune_config(rank)
    size = plan["members"].sum(1)
    chunk = min(chunk, n)
    finetune = lambda denoiser, **kw: finetune_chunk(denoiser, **kw, config=config, ft=ft)
    start = time.perf_counter()
    factors, train_stats = common.run_chunked(
        finetune,
        {**data, **hparams},
        chunk,
        shared=(params["denoiser"],),
        name="digit_subsets finetune",
    )
    train_seconds = time.perf_counter() - start
    evaluate = lambda p, **kw: evaluate_chunk(p, **kw, config=config, ft=ft)
    measured, eval_stats = common.run_chunked(
        evaluate, {**data, "lora": factors}, chunk, shared=(params,), name="digit_subsets measure"
    )
    eval_seconds = time.perf_counter() - start - train_seconds
    predicted = measured["class_probs"].argmax(-1)  # [n, S]
    in_subset = np.take_along_axis(plan["members"], predicted, axis=1).mean(1)
    labels = {
        "seed": plan["seed"],
        "subset": np.asarray(["".join("1" if b else "0" for b in row) for row in plan["members"]]),
        **{col: plan["members"][:, c] for c, col in enumerate(CLASS_COLUMNS)},
        "dataset_size": size.astype(np.int64),
        "rank": np.full(n, rank),
        "in_subset": in_subset.astype(np.float64),
        "final_loss": measured["final_loss"].astype(np.float64),
        "base_loss": measured["base_loss"].astype(np.float64),
        "images": np.asarray([" ".join(map(str, row[row >= 0])) for row in plan["images"]]),
    }
    stats = {
        "finetune_seconds": train_seconds,
        "finetune_first_chunk_seconds": train_stats.first_seconds,
        "finetune_steady_rate": train_stats.steady_rate(),
        "measure_seconds": eval_seconds,
        "measure_first_chunk_seconds": eval_stats.first_seconds,
        "chunk": chunk,
    }
    return factors, labels, stats


TARGETS = {
    "membership": {"task": "multilabel", "columns": list(CLASS_COLUMNS)},
    "dataset_size": {"task": "categorical", "columns": ["dataset_size"]},
}


def _generated(
    base_model: family.Base, n: int, seed: int, rank: int, chunk: int | None
) -> family.Generated:
    factors, labels, stats = generate(
        base_model.params, base_model.config, n, seed, rank, chunk or DEFAULT_CHUNK
    )
    provenance = {
        "alpha": float(rank),
        "learning_rate": LEARNING_RATE,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "prompt": "sks",
        "images_per_class": 1,
        "init": "v (lora_A^T) uniform +-1/sqrt(m) per LoRA, u = alpha/r * lora_B = 0",
        "chunk": stats["chunk"],
        "finetune": dataclasses.asdict(finetune_config(rank)),
    }
    return family.Generated(factors, labels, stats, provenance)


FAMILY = family.Family(
    name="digit_subsets",
    command="data_gen.digit_subsets",
    analogue_of="Imagenette-LoRA (Learning on LoRAs, section 5.1, appendix D.1.2)",
    sizes=SIZES,
    default_rank=DEFAULT_RANK,
    targets=TARGETS,
    load_base=base,
    generate=_generated,
)
#: Generates the digit-subsets dataset folder; see :meth:`data_gen.family.Family.run`.
run = FAMILY.run
