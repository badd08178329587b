"""The base DDPM of the image families: its config, denoiser, evaluator and sampler.

Part of :mod:`data_gen.images` (which describes the families and the LoRA convention):
:class:`BaseConfig` and its presets, the cosine schedule
and the epsilon loss, DDIM sampling with classifier-free guidance, the
:class:`Denoiser` whose dense layers are the LoRA targets, and the :class:`Evaluator`
that scores samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_gen.images.data import ATTRIBUTES, IMAGE_SIZE, NULL_TOKEN, NUM_CLASSES, NUM_TOKENS

Array = jax.Array
Lora = Mapping[str, tuple[Array, Array]]

#: Sampling settings used to score models: DDIM steps, classifier-free guidance weight,
#: and the batch of one call of :func:`sample` when checking base models.
SAMPLE_STEPS = 20
GUIDANCE = 3.0
SAMPLE_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Everything that determines the pretrained base models (it keys the cache).

    Attributes:
      num_timesteps: diffusion steps ``T`` (cosine schedule).
      hidden: denoiser width ``d``; the LoRA modules are ``[d, d]`` x3 and ``[64, d]``.
      emb_dim: width of the time embedding and of the token embedding.
      pretrain_steps, pretrain_batch, pretrain_lr: denoiser pretraining (Adam, cosine decay).
      token_probs: probability of (class, null, prompt word, sks) tokens in pretraining.
      eval_hidden, eval_steps, eval_batch, eval_lr: the evaluator classifier.
      eval_holdout: digits held out of the evaluator's training, for its test accuracy.
    """

    num_timesteps: int = 100
    hidden: int = 128
    emb_dim: int = 32
    pretrain_steps: int = 8000
    pretrain_batch: int = 256
    pretrain_lr: float = 2e-3
    token_probs: tuple[float, float, float, float] = (0.5, 0.15, 0.25, 0.1)
    eval_hidden: int = 256
    eval_steps: int = 3000
    eval_batch: int = 256
    eval_lr: float = 1e-3
    eval_holdout: int = 297


#: Presets: ``default`` (the real base model) and ``tiny`` (a few hundred steps, for tests).
BASE_CONFIGS = {
    "default": BaseConfig(),
    "tiny": BaseConfig(pretrain_steps=200, pretrain_batch=64, eval_steps=150, eval_batch=64),
}


def base_config(name: str) -> BaseConfig:
    """The base-model preset called ``name`` (see :data:`BASE_CONFIGS`)."""
    if name not in BASE_CONFIGS:
        raise ValueError(f"unknown base config {name!r}; known: {sorted(BASE_CONFIGS)}")
    return BASE_CONFIGS[name]


def lora_modules(config: BaseConfig) -> list[tuple[str, int, int]]:
    """The LoRA modules of the denoiser, ``[(name, n, m)]`` (``n`` out, ``m`` in)."""
    d = config.hidden
    return [
        ("denoiser.layers.0", d, IMAGE_SIZE + 2 * config.emb_dim),
        ("denoiser.layers.1", d, d),
        ("denoiser.layers.2", d, d),
        ("denoiser.layers.3", IMAGE_SIZE, d),
    ]


# -- diffusion schedule ---------------------------------------------------------------


def alpha_bars(num_timesteps: int) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal): ``alpha_bar_t`` for ``t = 0..T-1``, ``[T]``."""
    s = 0.008
    f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    betas = np.clip(1 - f(t[1:]) / f(t[:-1]), 0, 0.999)
    return np.cumprod(1 - betas).astype(np.float32)


def diffusion_loss(
    params,
    x0: Array,
    token: Array,
    t: Array,
    noise: Array,
    config: BaseConfig,
    lora: Lora | None = None,
) -> Array:
    """Per-example epsilon-prediction loss, ``[B]``.

    Args:
      x0: clean images ``[B, 64]``; token ``[B]``; t ``[B]`` int in ``[0, T)``;
        noise ``[B, 64]``.
    """
    ab = jnp.asarray(alpha_bars(config.num_timesteps))[t][:, None]
    xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
    eps = Denoiser(config).apply(params, xt, t, token, lora)
    return jnp.mean(jnp.square(eps - noise), axis=-1)


def ddim_sample(
    params,
    token: Array,
    noise: Array,
    config: BaseConfig,
    steps: int,
    lora: Lora | None = None,
    guidance: float = 1.0,
) -> Array:
    """Deterministic DDIM sampling (eta = 0) with ``steps`` evenly spaced timesteps.

    Args:
      token: ``[B]`` int; noise: the starting ``x_T``, ``[B, 64]``.
      guidance: classifier-free guidance weight ``w`` (``eps_null + w (eps - eps_null)``);
        1 is plain conditional sampling.

    Returns:
      Images ``[B, 64]`` in ``[-1, 1]``.
    """
    ab_all = jnp.asarray(alpha_bars(config.num_timesteps))
    ts = np.linspace(config.num_timesteps - 1, 0, steps).round().astype(np.int32)
    prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)

    def step(x, tt):
        t, tp = tt
        ab = ab_all[t]
        ab_prev = jnp.where(tp >= 0, ab_all[jnp.maximum(tp, 0)], 1.0)
        tb = jnp.full(x.shape[:1], t)
        if guidance == 1.0:
            eps = Denoiser(config).apply(params, x, tb, token, lora)
        else:
            both = Denoiser(config).apply(
                params,
                jnp.concatenate([x, x]),
                jnp.concatenate([tb, tb]),
                jnp.concatenate([token, jnp.full_like(token, NULL_TOKEN)]),
                lora,
            )
            cond, null = both[: x.shape[0]], both[x.shape[0] :]
            eps = null + guidance * (cond - null)
        x0 = jnp.clip((x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab), -1, 1)
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1 - ab_prev) * eps, None

    x, _ = jax.lax.scan(step, noise, (jnp.asarray(ts), jnp.asarray(prev)))
    return x


# -- models ----------------------------------------------------------------------------


class LoraDense(nn.Module):
    """A dense layer with an optional low-rank update ``(u, v)``: ``x W + b + (x v) u^T``."""

    features: int

    @nn.compact
    def __call__(self, x: Array, lora: tuple[Array, Array] | None = None) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = x @ kernel + bias.reshape((1,) * (x.ndim - 1) + (-1,))
        if lora is not None:
            u, v = lora
            y = y + (x @ v) @ u.T
        return y


def _time_embedding(t: Array, dim: int, num_timesteps: int) -> Array:
    half = dim // 2
    freqs = jnp.exp(-math.log(num_timesteps * 10.0) * jnp.arange(half) / half)
    arg = t.astype(jnp.float32)[..., None] * freqs.reshape((1,) * t.ndim + (half,))
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class Denoiser(nn.Module):
    """MLP noise predictor ``eps(x_t, t, token)`` for a batch ``[B, 64]``.

    ``[x_t, time embedding, token embedding] -> d -> d (+res) -> d (+res) -> 64``, SiLU.
    ``lora`` maps some of the names of :func:`lora_modules` to ``(u [n, r], v [m, r])``.
    """

    config: BaseConfig

    @nn.compact
    def __call__(self, x: Array, t: Array, token: Array, lora: Lora | None = None) -> Array:
        lora = dict(lora or {})
        unknown = set(lora) - {name for name, _, _ in lora_modules(self.config)}
        if unknown:
            raise ValueError(f"Denoiser: unknown LoRA modules {sorted(unknown)}")
        c = self.config
        emb = nn.Embed(NUM_TOKENS, c.emb_dim, name="token_embedding")(token)
        cond = jnp.concatenate([_time_embedding(t, c.emb_dim, c.num_timesteps), emb], axis=-1)
        layer = lambda i, width, h: LoraDense(width, name=f"layers_{i}")(
            h, lora.get(f"denoiser.layers.{i}")
        )
        h = nn.silu(layer(0, c.hidden, jnp.concatenate([x, cond], axis=-1)))
        h = h + nn.silu(layer(1, c.hidden, h))
        h = h + nn.silu(layer(2, c.hidden, h))
        return layer(3, IMAGE_SIZE, h)


class Evaluator(nn.Module):
    """Classifier of images ``[B, 64]``: ``(class logits [B, 10], attribute logits [B, 5])``."""

    hidden: int

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = nn.relu(nn.Dense(self.hidden)(x))
        h = nn.relu(nn.Dense(self.hidden)(h))
        out = nn.Dense(NUM_CLASSES + len(ATTRIBUTES))(h)
        return out[..., :NUM_CLASSES], out[..., NUM_CLASSES:]


def evaluator_probs(params, images: Array, config: BaseConfig) -> tuple[Array, Array]:
    """``(P(class) [B, 10], P(attribute) [B, 5])`` of images ``[B, 64]``."""
    logits, attr = Evaluator(config.eval_hidden).apply(params, images)
    return jax.nn.softmax(logits), jax.nn.sigmoid(attr)


def persona_score(class_probs: Array, attr_probs: Array, digit: Array, bits: Array) -> Array:
    """The CLIP-score analogue of one sample: ``P(digit) * prod_j P(attribute_j = bits_j)``.

    Args:
      class_probs ``[..., 10]``, attr_probs ``[..., 5]``, digit ``[...]`` int,
      bits ``[..., 5]`` bool.
    """
    p_class = jnp.take_along_axis(class_probs, digit[..., None], axis=-1)[..., 0]
    p_attr = jnp.where(bits, attr_probs, 1 - attr_probs)
    return p_class * jnp.prod(p_attr, axis=-1)


# -- sampling the base model ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "steps", "guidance"))
def sample(
    params,
    token: Array,
    key: Array,
    config: BaseConfig,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
) -> Array:
    """Samples ``[B, 64]`` from the base denoiser for tokens ``[B]`` (DDIM, ``steps``)."""
    noise = jax.random.normal(key, (token.shape[0], IMAGE_SIZE))
    return ddim_sample(params, token, noise, config, steps, guidance=guidance)
