"""LoRA finetuning of the base denoiser, many LoRAs at once, and measuring the results.

Part of :mod:`data_gen.images`: :func:`finetune_chunk` finetunes a chunk of
DreamBooth-style LoRAs in one compiled program, and :func:`evaluate_chunk` measures
their losses and scores their samples, the labels of :mod:`data_gen.images.personas`
and :mod:`data_gen.images.digit_subsets`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from data_gen.images.data import IMAGE_SIZE
from data_gen.images.model import (
    GUIDANCE,
    SAMPLE_STEPS,
    BaseConfig,
    ddim_sample,
    diffusion_loss,
    evaluator_probs,
    lora_modules,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Static settings of a family's finetunes (hyperparameters that vary are arguments).

    Attributes:
      rank: LoRA rank ``r``.
      alpha: LoRA alpha; the scale ``alpha / r`` is folded into the stored ``u``.
      max_steps: the largest per-LoRA step count.
      max_batch: the largest per-LoRA batch size (smaller batches are masked).
      noise_draws: ``(t, noise)`` draws per image per step.
      eval_draws: ``(t, noise)`` draws per training image for the measured losses.
      num_samples: samples drawn from each finetuned model to score it.
      block: LoRAs computed together within a chunk, a speed knob that fits the working
        set in the CPU's cache (results agree across block sizes up to float rounding;
        bit-for-bit reproducibility assumes the same block and chunk).
      sample_steps: DDIM steps per sample.
      guidance: classifier-free guidance weight when sampling.
    """

    rank: int
    alpha: float
    max_steps: int
    max_batch: int = 2
    noise_draws: int = 1
    eval_draws: int = 4
    num_samples: int = 16
    block: int = 8
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE


def init_lora(key: Array, config: BaseConfig, rank: int) -> dict[str, tuple[Array, Array]]:
    """A fresh LoRA as PEFT initialises one: ``{name: (b [n, r], v [m, r])}``.

    ``b`` (PEFT's ``lora_B``) is zero and ``v`` (``lora_A^T``) is random, uniform in
    ``+-1/sqrt(m)`` (PEFT's Kaiming-uniform), independently per LoRA: the initial update
    is zero, the initial subspace random. The trained ``u`` is ``alpha / r * b``.
    """
    keys = jax.random.split(key, len(lora_modules(config)))
    out = {}
    for k, (name, n, m) in zip(keys, lora_modules(config)):
        bound = 1.0 / math.sqrt(m)
        out[name] = (
            jnp.zeros((n, rank)),
            jax.random.uniform(k, (m, rank), minval=-bound, maxval=bound),
        )
    return out


def _scaled(lora, ft: FinetuneConfig):
    return {name: (ft.alpha / ft.rank * b, v) for name, (b, v) in lora.items()}


def _lora_keys(seed: Array) -> tuple[Array, Array, Array, Array]:
    """``(init, train, eval, sample)`` keys of one LoRA from its integer seed."""
    k = jax.random.split(jax.random.key(seed), 4)
    return k[0], k[1], k[2], k[3]


def _draws(
    key: Array, rows: int, num_timesteps: int, num_images: Array
) -> tuple[Array, Array, Array]:
    """All the randomness of one step from one call: ``(noise [rows, 64], t [rows],
    image index [rows])`` with ``t`` uniform in ``[0, T)`` and the index in
    ``[0, num_images)``.

    One threefry call instead of one per quantity compiles and runs faster; threefry
    (not ``rbg``) keeps each LoRA's draws independent of the chunk it is computed in.
    """
    u = jax.random.uniform(key, (rows, IMAGE_SIZE + 2))
    low = np.nextafter(np.float32(-1), np.float32(0))
    noise = np.float32(np.sqrt(2)) * jax.lax.erf_inv(jnp.maximum(2 * u[:, :IMAGE_SIZE] - 1, low))
    t = jnp.minimum((u[:, IMAGE_SIZE] * num_timesteps).astype(jnp.int32), num_timesteps - 1)
    index = jnp.minimum((u[:, IMAGE_SIZE + 1] * num_images).astype(jnp.int32), num_images - 1)
    return noise, t, index


def _in_blocks(fn, block: int, *args):
    """``fn`` over consecutive blocks of ``block`` items of the leading axis, one block
    after another (``lax.map``), results concatenated.

    A block's working set (LoRA parameters, Adam moments, activations) then stays in
    the CPU's cache: on 2 cores, rank-32 finetunes ran 1.5-2x as fast in blocks of 8 as
    all of a chunk at once, rank-4 ones 1.4x. ``block`` is trimmed to divide the chunk;
    ``block >= chunk`` computes the chunk at once, which is what a chunk sharded over
    accelerators wants (a sequential map over a sharded axis would serialise devices).
    """
    size = jax.tree_util.tree_leaves(args)[0].shape[0]
    block = size if block >= size else math.gcd(size, block)
    split = lambda x: x.reshape(size // block, block, *x.shape[1:])
    out = jax.lax.map(lambda a: fn(*a), jax.tree_util.tree_map(split, args))
    return jax.tree_util.tree_map(lambda x: x.reshape(size, *x.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("config", "ft"))
def finetune_chunk(
    denoiser,
    images: Array,
    num_images: Array,
    token: Array,
    learning_rate: Array,
    steps: Array,
    batch_size: Array,
    seed: Array,
    *,
    config: BaseConfig,
    ft: FinetuneConfig,
) -> dict[str, tuple[Array, Array]]:
    """DreamBooth-style LoRA finetunes of the base denoiser, ``C`` at once.

    One compiled program for a whole dataset: the base parameters, the data and every
    per-LoRA hyperparameter are arguments; learning rate, steps and batch size act as
    per-LoRA values and masks inside one loop (a LoRA whose ``steps`` are done stops
    changing), which runs as many times as the longest finetune of a block needs. Each
    step draws ``batch_size`` of the LoRA's images (with replacement) and
    ``ft.noise_draws`` noise levels per image, and takes one Adam step (PyTorch
    defaults, no weight decay) on ``(b, v)``. The LoRA axis ``C`` is a plain leading
    axis (vmapped); it is processed in blocks of ``ft.block`` LoRAs for cache locality.

    For speed on CPU, each factor's parameter and Adam moments are stacked so that one
    fused pass updates them, and all of a LoRA's random draws are made before its loop
    (one threefry call instead of several per step).

    Args:
      denoiser: base denoiser params (shared).
      images: ``[C, K, 64]``; the first ``num_images [C]`` of each row are the LoRA's data.
      token: ``[C]`` the prompt token; learning_rate ``[C]`` float; steps ``[C]`` (at most
        ``ft.max_steps``) and batch_size ``[C]`` (at most ``ft.max_batch``) int;
        seed ``[C]`` int.

    Returns:
      ``{name: (u [C, n, r], v [C, m, r])}`` with the scale folded into ``u``.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    rows = ft.max_batch * ft.noise_draws
    # Row j of a step belongs to image slot j // noise_draws; slots >= batch_size are masked.
    slot = np.arange(rows) // ft.noise_draws

    def init_one(seed, num_images):
        k_init, k_train, _, _ = _lora_keys(seed)
        lora = init_lora(k_init, config, ft.rank)
        # Parameter, first and second Adam moment stacked: [3, n, r] per factor.
        state = jax.tree_util.tree_map(lambda p: jnp.stack([p, 0 * p, 0 * p]), lora)
        noise, t, index = _draws(k_train, ft.max_steps * rows, config.num_timesteps, num_images)
        draws = (
            noise.reshape(ft.max_steps, rows, IMAGE_SIZE),
            t.reshape(ft.max_steps, rows),
            index.reshape(ft.max_steps, rows)[:, slot * ft.noise_draws],
        )
        return state, draws

    def loss_one(lora, images, token, weight, noise, t, index):
        per = diffusion_loss(
            denoiser, images[index], jnp.full((rows,), token), t, noise, config, _scaled(lora, ft)
        )
        return jnp.sum(weight * per) / jnp.sum(weight)

    grad_all = jax.vmap(jax.grad(loss_one))

    def run_block(images, num_images, token, learning_rate, steps, batch_size, seed):
        state, draws = jax.vmap(init_one)(seed, num_images)
        weight = (slot[None, :] < batch_size[:, None]).astype(jnp.float32)  # [B, rows]

        def body(i, state):
            noise, t, index = (x[:, i] for x in draws)
            lora = jax.tree_util.tree_map(lambda s: s[:, 0], state)
            grads = grad_all(lora, images, token, weight, noise, t, index)
            # Adam in the form of Kingma & Ba's section 2 (bias corrections folded into
            # one per-LoRA step size, so no power is computed per parameter), written
            # as one expression per factor so that XLA fuses the whole update of
            # parameter and moments into one pass over memory.
            count = jnp.minimum(i + 1, steps).astype(jnp.float32)
            size = learning_rate * jnp.sqrt(1 - b2**count) / (1 - b1**count)

            def update(s, g):
                expand = lambda x: x.reshape(x.shape + (1,) * (g.ndim - 1))
                active = expand(i < steps)
                p, mu, nu = s[:, 0], s[:, 1], s[:, 2]
                mu = b1 * mu + (1 - b1) * g
                nu = b2 * nu + (1 - b2) * g * g
                p = p - expand(size) * mu / (jnp.sqrt(nu) + eps)
                return jnp.where(active[:, None], jnp.stack([p, mu, nu], axis=1), s)

            return jax.tree_util.tree_map(update, state, grads)

        state = jax.lax.fori_loop(0, jnp.max(steps), body, state)
        return jax.tree_util.tree_map(lambda s: s[:, 0], state)

    lora = _in_blocks(
        run_block, ft.block, images, num_images, token, learning_rate, steps, batch_size, seed
    )
    return jax.vmap(lambda lora: _scaled(lora, ft))(lora)


@functools.partial(jax.jit, static_argnames=("config", "ft"))
def evaluate_chunk(
    params,
    lora: dict[str, tuple[Array, Array]],
    images: Array,
    num_images: Array,
    token: Array,
    seed: Array,
    *,
    config: BaseConfig,
    ft: FinetuneConfig,
) -> dict[str, Array]:
    """Measures ``C`` finetuned models: losses on their data, and evaluated samples.

    Args:
      params: ``{"denoiser": ..., "evaluator": ...}`` (shared).
      lora: ``{name: (u [C, n, r], v [C, m, r])}`` (scale folded into ``u``).
      images ``[C, K, 64]``, num_images ``[C]``, token ``[C]``, seed ``[C]``: as for
        :func:`finetune_chunk`.

    Returns:
      ``final_loss [C]`` and ``base_loss [C]``: the diffusion loss on the LoRA's images
      with and without the LoRA, on the same ``ft.eval_draws`` noise draws per image;
      ``class_probs [C, S, 10]`` and ``attr_probs [C, S, 5]``: the evaluator on
      ``S = ft.num_samples`` samples from the finetuned model prompted with ``token``.
    """

    def one(lora, images, num_images, token, seed):
        _, _, k_eval, k_sample = _lora_keys(seed)
        k_img = images.shape[0]
        rows = k_img * ft.eval_draws
        noise, t, _ = _draws(k_eval, rows, config.num_timesteps, num_images)
        x0 = jnp.repeat(images, ft.eval_draws, axis=0)
        weight = jnp.repeat(jnp.arange(k_img) < num_images, ft.eval_draws).astype(jnp.float32)
        tok = jnp.full((rows,), token)
        mean = lambda per: jnp.sum(weight * per) / jnp.sum(weight)
        final = mean(diffusion_loss(params["denoiser"], x0, tok, t, noise, config, lora))
        base = mean(diffusion_loss(params["denoiser"], x0, tok, t, noise, config))
        start, _, _ = _draws(k_sample, ft.num_samples, config.num_timesteps, num_images)
        samples = ddim_sample(
            params["denoiser"],
            jnp.full((ft.num_samples,), token),
            start,
            config,
            ft.sample_steps,
            lora,
            ft.guidance,
        )
        class_probs, attr_probs = evaluator_probs(params["evaluator"], samples, config)
        return {
            "final_loss": final,
            "base_loss": base,
            "class_probs": class_probs,
            "attr_probs": attr_probs,
        }

    return _in_blocks(jax.vmap(one), ft.block, lora, images, num_images, token, seed)
