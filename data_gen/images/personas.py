r"""Personas: the CelebA-LoRA analogue (paper section 5.1, appendix D.1.1).

A *persona* is a digit class plus 5 binary style attributes (bold, mirrored, shifted,
blurred, faint): 320 personas. Each LoRA (rank 4 by default, on the four dense layers of
the base DDPM's denoiser, PEFT-style init with a random ``v`` per LoRA) is personalised
DreamBooth-style to 21 different handwritten samples of its class rendered in its
persona's style, prompted by one of 4 prompt words, with hyperparameters sampled like
the paper's Table 6 (see :data:`LR_SHIFT` on the learning rates). Labels: a quality
score computed like a CLIP score (:func:`data_gen.images.model.persona_score` of samples of
the finetuned model, averaged), the persona (digit and attributes), every
hyperparameter, the per-LoRA seed, and the measured losses.

Run (the command is :mod:`data_gen.personas`)::

    python -m data_gen.personas --size=quick --out=/tmp/personas
    python -m data_gen.personas --size=paper --out=DIR [--seed=0 --rank=4 --chunk=256]

``--rank`` makes the rank-``r`` variants for the paper's Figure 4: with the same seed
they share personas, images, hyperparameters and seeds with the rank-4 dataset, so
their splits hold the same finetunes at another rank.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_gen import common, family
from data_gen.images.data import (
    ATTRIBUTES,
    NUM_CLASSES,
    NUM_STYLES,
    PROMPT_TOKENS,
    PROMPT_WORDS,
    digits,
    style_bits,
    styled_bank,
)
from data_gen.images.finetune import FinetuneConfig, evaluate_chunk, finetune_chunk
from data_gen.images.model import SAMPLE_BATCH, BaseConfig, evaluator_probs, persona_score, sample
from data_gen.images.pretrain import base

SIZES = {"quick": 1000, "paper": 3900}
DEFAULT_RANK = 4
#: The paper's Table 6 grid.
PAPER_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
#: The grid is multiplied by this; 1 means no shift. With ``alpha = r`` (scale 1) and
#: Adam, the paper's grid already spans under- to well-trained finetunes of this
#: denoiser (mean quality 0.05 at 1e-4, 0.11-0.12 above it; base model 0.003), and its
#: top, 3e-3, is the edge of stability: 8% of those finetunes end with a higher loss on
#: their own images than the base model; shifts of x2, x3 and x10 raise that to 37%,
#: 60% and 97% of the top-rate finetunes (512 LoRAs per shift). The prototype's
#: language family needed a decade more; this family needs none.
LR_SHIFT = 1.0
LEARNING_RATES = tuple(LR_SHIFT * lr for lr in PAPER_LEARNING_RATES)
STEPS = (100, 133, 167, 200)
BATCH_SIZES = (1, 2)
NUM_IMAGES = 21
DEFAULT_CHUNK = 256
_FAMILY_ID = 1  # seeds the family's random draws apart from the other families'


def finetune_config(rank: int = DEFAULT_RANK) -> FinetuneConfig:
    """The static finetuning settings of a persona LoRA of rank ``rank``.

    LoRA alpha is the rank (scale 1, the default of diffusers' DreamBooth LoRA script),
    so that the updates of LoRAs of different ranks (Figure 4) have the same size. The
    paper authors' code used alpha 27 at rank 4: a scale of 6.75, with which 57% of the
    finetunes at the top learning rate (3e-3) ended with a higher loss on their own
    images than the base model (measured on 63); at rank 1 the scale would be 27.
    """
    if not 1 <= rank <= 128:
        raise ValueError(f"personas: rank must be in [1, 128], got {rank}")
    return FinetuneConfig(
        rank=rank, alpha=float(rank), max_steps=max(STEPS), max_batch=max(BATCH_SIZES)
    )


def sample_plan(n: int, seed: int) -> dict[str, np.ndarray]:
    """Draws the personas, images, hyperparameters and seeds of ``n`` LoRAs.

    Independent of the rank, so datasets of different ranks pair up.

    Returns:
      ``{column: [n] or [n, 21]}``: ``digit``, ``style``, ``images`` (digit indices,
      ``[n, 21]``), ``lr_index``, ``steps``, ``batch_size``, ``prompt_index``, ``seed``.
    """
    rng = np.random.default_rng([seed, _FAMILY_ID])
    _, labels = digits()
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    digit = rng.integers(0, NUM_CLASSES, n)
    return {
        "digit": digit,
        "style": rng.integers(0, NUM_STYLES, n),
        "lr_index": rng.integers(0, len(LEARNING_RATES), n),
        "steps": rng.choice(np.asarray(STEPS), n),
        "batch_size": rng.choice(np.asarray(BATCH_SIZES), n),
        "prompt_index": rng.integers(0, len(PROMPT_WORDS), n),
        "images": np.stack([rng.choice(by_class[c], NUM_IMAGES, replace=False) for c in digit]),
        "seed": common.lora_seeds(rng, n),
    }


def finetune_inputs(n: int, seed: int) -> tuple[dict, dict, dict]:
    """``(plan, data, hparams)``: the plan (:func:`sample_plan`) and the per-LoRA
    arguments of :func:`data_gen.images.finetune.finetune_chunk`: ``data`` (images
    ``[n, 21, 64]``, num_images, token, seed; also used to measure) and ``hparams``
    (learning_rate, steps, batch_size), all ``[n, ...]`` numpy."""
    plan = sample_plan(n, seed)
    data = {
        "images": styled_bank()[plan["style"][:, None], plan["images"]],
        "num_images": np.full(n, NUM_IMAGES, np.int32),
        "token": np.asarray(PROMPT_TOKENS, np.int32)[plan["prompt_index"]],
        "seed": plan["seed"].astype(np.int32),
    }
    hparams = {
        "learning_rate": np.asarray(LEARNING_RATES, np.float32)[plan["lr_index"]],
        "steps": plan["steps"].astype(np.int32),
        "batch_size": plan["batch_size"].astype(np.int32),
    }
    return plan, data, hparams


def generate(
    params: Mapping[str, Any],
    config: BaseConfig,
    n: int,
    seed: int,
    rank: int = DEFAULT_RANK,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[dict, dict, dict]:
    """Finetunes and measures ``n`` persona LoRAs (in memory).

    Args:
      params: the base models, ``{"denoiser": ..., "evaluator": ...}``.
      config: their config.
      n, seed, rank, chunk: dataset size, seed, LoRA rank, LoRAs per compiled call.

    Returns:
      ``(factors, labels, stats)``: ``{name: (u [n, d_out, r], v [n, d_in, r])}``,
      ``{column: [n]}``, and timings.
    """
    plan, data, hparams = finetune_inputs(n, seed)
    ft = finetune_config(rank)
    chunk = min(chunk, n)
    finetune = lambda denoiser, **kw: finetune_chunk(denoiser, **kw, config=config, ft=ft)
    start = time.perf_counter()
    factors, train_stats = common.run_chunked(
        finetune,
        {**data, **hparams},
        chunk,
        order=np.argsort(plan["steps"], kind="stable"),  # chunks of similar length
        shared=(params["denoiser"],),
        name="personas finetune",
    )
    train_seconds = time.perf_counter() - start
    evaluate = lambda p, **kw: evaluate_chunk(p, **kw, config=config, ft=ft)
    measured, eval_stats = common.run_chunked(
        evaluate, {**data, "lora": factors}, chunk, shared=(params,), name="personas measure"
    )
    eval_seconds = time.perf_counter() - start - train_seconds

    bits = style_bits(plan["style"])
    quality = np.asarray(
        persona_score(
            measured["class_probs"],
            measured["attr_probs"],
            np.broadcast_to(plan["digit"][:, None], measured["class_probs"].shape[:2]),
            np.broadcast_to(bits[:, None], measured["attr_probs"].shape),
        )
    ).mean(axis=1)
    base_quality = _base_quality(params, config, ft, plan, seed)
    labels = {
        "seed": plan["seed"],
        "persona": plan["digit"] * NUM_STYLES + plan["style"],
        "digit": plan["digit"],
        **{a: bits[:, j] for j, a in enumerate(ATTRIBUTES)},
        "learning_rate": np.asarray(LEARNING_RATES, np.float64)[plan["lr_index"]],
        "steps": plan["steps"],
        "batch_size": plan["batch_size"],
        "prompt": np.asarray(PROMPT_WORDS)[plan["prompt_index"]],
        "rank": np.full(n, rank),
        "quality": quality.astype(np.float64),
        "base_quality": base_quality,
        "final_loss": measured["final_loss"].astype(np.float64),
        "base_loss": measured["base_loss"].astype(np.float64),
        "images": np.asarray([" ".join(map(str, row)) for row in plan["images"]]),
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


def _base_quality(params, config, ft, plan, seed) -> np.ndarray:
    """Quality of the base model for each LoRA's prompt and persona, ``[n]``.

    The base model is sampled once per prompt word (``SAMPLE_BATCH / 4`` samples, in
    one call of the same shape as the base model's check) and scored against
    every persona.
    """
    num = SAMPLE_BATCH // len(PROMPT_TOKENS)
    tokens = jnp.repeat(jnp.asarray(PROMPT_TOKENS), num)
    key = jax.random.key(np.random.default_rng([seed, _FAMILY_ID, 2]).integers(2**31))
    samples = sample(params["denoiser"], tokens, key, config, ft.sample_steps, ft.guidance)
    cp, ap = evaluator_probs(params["evaluator"], samples, config)
    cp = np.asarray(cp).reshape(len(PROMPT_WORDS), num, NUM_CLASSES)
    ap = np.asarray(ap).reshape(len(PROMPT_WORDS), num, len(ATTRIBUTES))
    bits = style_bits(plan["style"])
    out = np.empty(len(plan["seed"]))
    for i, (w, d, b) in enumerate(zip(plan["prompt_index"], plan["digit"], bits)):
        p_attr = np.where(b, ap[w], 1 - ap[w]).prod(-1)
        out[i] = float(np.mean(cp[w, :, d] * p_attr))
    return out


TARGETS = {
    "quality": {"task": "regression", "columns": ["quality"]},
    "attributes": {"task": "multilabel", "columns": list(ATTRIBUTES)},
    "digit": {"task": "categorical", "columns": ["digit"]},
    "learning_rate": {"task": "categorical", "columns": ["learning_rate"]},
    "steps": {"task": "categorical", "columns": ["steps"]},
    "batch_size": {"task": "categorical", "columns": ["batch_size"]},
    "prompt": {"task": "categorical", "columns": ["prompt"]},
}


def _generated(
    base_model: family.Base, n: int, seed: int, rank: int, chunk: int | None
) -> family.Generated:
    factors, labels, stats = generate(
        base_model.params, base_model.config, n, seed, rank, chunk or DEFAULT_CHUNK
    )
    provenance = {
        "alpha": float(rank),
        "learning_rates": list(LEARNING_RATES),
        "paper_learning_rates": list(PAPER_LEARNING_RATES),
        "learning_rate_shift": LR_SHIFT,
        "steps": list(STEPS),
        "batch_sizes": list(BATCH_SIZES),
        "prompt_words": list(PROMPT_WORDS),
        "attributes": list(ATTRIBUTES),
        "images_per_lora": NUM_IMAGES,
        "init": "v (lora_A^T) uniform +-1/sqrt(m) per LoRA, u = alpha/r * lora_B = 0",
        "chunk": stats["chunk"],
        "finetune": dataclasses.asdict(finetune_config(rank)),
    }
    return family.Generated(factors, labels, stats, provenance)


FAMILY = family.Family(
    name="personas",
    command="data_gen.personas",
    analogue_of="CelebA-LoRA (Learning on LoRAs, section 5.1, appendix D.1.1)",
    sizes=SIZES,
    default_rank=DEFAULT_RANK,
    targets=TARGETS,
    load_base=base,
    generate=_generated,
)
#: Generates the personas dataset folder; see :meth:`data_gen.family.Family.run`.
run = FAMILY.run
