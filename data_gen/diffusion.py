"""The base model of the image families: a small DDPM over 8x8 digits, and its evaluator.

The analogue of Stable Diffusion for :mod:`data_gen.personas` (CelebA-LoRA) and
:mod:`data_gen.digit_subsets` (Imagenette-LoRA):

- data: the 1,797 scikit-learn 8x8 digits in ``[-1, 1]``, each renderable in 32
  *styles*, the combinations of 5 binary attributes (:data:`ATTRIBUTES`);
- :class:`Denoiser`: an MLP noise predictor ``eps(x_t, t, token)`` conditioned on one
  learned token (the "prompt"); its four dense layers are the LoRA targets, named
  ``denoiser.layers.{i}`` (:func:`lora_modules`);
- :class:`Evaluator`: an MLP classifier of class and attributes, the CLIP analogue
  that scores samples of a finetuned model;
- DDIM sampling, and pretraining of both, deterministic from a seed.

Every token has a pretrained meaning (a token never seen in pretraining makes the base
model emit junk, and a prompt word is only a learnable label if it means something of
its own): the ten class tokens generate their class in any style, the null token any
digit in any style, each persona prompt word (:data:`PROMPT_WORDS`) its own subset of
classes in any style, and ``sks`` (the digit-subset prompt) any digit unstyled.

LoRA convention (:mod:`gllora.lora`): ``lora = {name: (u [n, r], v [m, r])}`` with
``n`` the output and ``m`` the input features; a layer computes
``x @ kernel + bias + (x @ v) @ u.T``, i.e. the adapted kernel is ``kernel + (u v^T)^T``.
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
import optax

Array = jax.Array
Lora = Mapping[str, tuple[Array, Array]]

#: The binary style attributes of a persona, in bit order (bit ``j`` of a style index).
ATTRIBUTES = ("bold", "mirrored", "shifted", "blurred", "faint")
NUM_STYLES = 2 ** len(ATTRIBUTES)
NUM_CLASSES = 10
#: The persona prompt words (the paper's "Celebrity", "Person", "thing", "skd").
PROMPT_WORDS = ("celebrity", "person", "thing", "skd")
#: Token ids: 0-9 the classes, then the null token, the prompt words, and ``sks``.
NULL_TOKEN = NUM_CLASSES
PROMPT_TOKENS = tuple(range(NUM_CLASSES + 1, NUM_CLASSES + 1 + len(PROMPT_WORDS)))
SKS_TOKEN = PROMPT_TOKENS[-1] + 1
NUM_TOKENS = SKS_TOKEN + 1
TOKEN_NAMES = tuple(f"digit{c}" for c in range(NUM_CLASSES)) + ("<null>",) + PROMPT_WORDS + ("sks",)
#: Classes each prompt word means in pretraining: word ``k`` -> classes ``c`` with
#: ``c % 4 == k`` (so "celebrity" is a 0, 4 or 8).
WORD_CLASSES = tuple(tuple(c for c in range(NUM_CLASSES) if c % 4 == k) for k in range(4))
IMAGE_SIZE = 64
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


# -- data -----------------------------------------------------------------------------


def _dilate(x: np.ndarray) -> np.ndarray:
    """Grey-level dilation with a 3x3 cross, ``[..., 8, 8]`` in ``[0, 1]``."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    shifts = [p[..., 1:-1, 1:-1], p[..., :-2, 1:-1], p[..., 2:, 1:-1]]
    shifts += [p[..., 1:-1, :-2], p[..., 1:-1, 2:]]
    return np.max(shifts, axis=0)


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable ``[1, 2, 1] / 4`` blur (zero padding), renormalised to keep the peak."""
    k = np.array([0.25, 0.5, 0.25])
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    y = sum(k[i] * p[..., i : i + 8, :] for i in range(3))
    y = sum(k[i] * y[..., :, i : i + 8] for i in range(3))
    peak = x.max(axis=(-1, -2), keepdims=True)
    return np.clip(y * peak / np.maximum(y.max(axis=(-1, -2), keepdims=True), 1e-6), 0, 1)


def render(images: np.ndarray, style: int) -> np.ndarray:
    """Renders digits in a style.

    Args:
      images: ``[N, 8, 8]`` in ``[0, 1]``.
      style: bit ``j`` set means attribute ``ATTRIBUTES[j]``.

    Returns:
      ``[N, 64]`` float32 in ``[-1, 1]``.
    """
    x = np.asarray(images, np.float64)
    if style & 1:  # bold
        x = _dilate(x)
    if style & 2:  # mirrored
        x = x[..., ::-1]
    if style & 4:  # shifted one pixel right and down (zero fill)
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])[..., :8, :8]
    if style & 8:  # blurred
        x = _blur(x)
    if style & 16:  # faint
        x = 0.35 * x
    return (2.0 * x - 1.0).reshape(*x.shape[:-2], IMAGE_SIZE).astype(np.float32)


def style_bits(style: np.ndarray | int) -> np.ndarray:
    """Attribute bits of style indices, ``[...] -> [..., 5]`` bool."""
    return (np.asarray(style)[..., None] >> np.arange(len(ATTRIBUTES))) & 1 == 1


def style_index(bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`style_bits`: ``[..., 5]`` bool -> ``[...]`` int."""
    return (np.asarray(bits, np.int64) << np.arange(len(ATTRIBUTES))).sum(-1)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: ``(images [1797, 8, 8] in [0, 1], labels [1797])``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def styled_bank() -> np.ndarray:
    """Every digit in every style, ``[32, 1797, 64]`` float32 in ``[-1, 1]`` (15 MB)."""
    images, _ = digits()
    return np.stack([render(images, s) for s in range(NUM_STYLES)])


def class_table(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of each class, ``([10, max_count] padded with -1, counts [10])``."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    table = np.full((NUM_CLASSES, counts.max()), -1, np.int32)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        table[c, : len(idx)] = idx
    return table, counts.astype(np.int32)


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


# -- pretraining -----------------------------------------------------------------------


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


def abstract_params(config: BaseConfig):
    """Shapes and dtypes of :func:`pretrain`'s params (for restoring a cache)."""
    zeros = jnp.zeros((1, IMAGE_SIZE))
    ints = jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0)
    return {
        "denoiser": jax.eval_shape(Denoiser(config).init, key, zeros, ints, ints),
        "evaluator": jax.eval_shape(Evaluator(config.eval_hidden).init, key, zeros),
    }


# -- LoRA finetuning, many at once ----------------------------------------------------


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
