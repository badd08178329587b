"""The base model of the arithmetic-sources family: a small transformer LM over digit statements.

The analogue of Qwen2-1.5B for :mod:`data_gen.arith.sources` (Qwen2-ARC-LoRA):

- a vocabulary of 39 tokens (``tasks.TOKENS``): padding, ``<bos>``, the digits, 20
  operation symbols, ``=`` and six *words* (``Q ? what is ans :``);
- 20 operations on two digits with a digit as result (``tasks.OP_NAMES``): arithmetic
  mod 10, comparisons, and three random lookup tables standing in for "knowledge";
- pretraining on *statements* ``<bos> (0-2 words) a OP b = r``: the filler words vary
  the answer's position (5 to 7), because key/value-only LoRAs cannot later move an
  answer to a position pretraining never used, and they give every word a pretrained
  meaning (a token never seen in pretraining makes the base model emit junk);
- *questions* in four templates (``tasks.TEMPLATES``) that use the words instead of ``=``:
  the base model cannot answer them, a LoRA learns to;
- :class:`ArithLM`: a pre-norm transformer (RMSNorm, learned positions, grouped-query
  attention with biases on q/k/v as in Qwen2, GELU MLP, tied embeddings), with
  LoRA hooks on the key and value projection of every layer, named
  ``lm.layers.{i}.attn.k_proj`` / ``v_proj`` (:func:`lora_modules`).

LoRA convention (:mod:`gllora.lora`): ``lora = {name: (u [n, r], v [m, r])}`` with
``n`` the output and ``m`` the input features; a projection computes
``x @ kernel + bias + (dropout(x) @ v) @ u.T``, i.e. the adapted kernel is
``kernel + (u v^T)^T``; the LoRA scale is folded into ``u``.

The vocabulary, operations, statements and questions are in :mod:`data_gen.arith.tasks`;
pretraining and the cached base model in :mod:`data_gen.arith.pretrain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_gen.arith.tasks import VOCAB_SIZE

Array = jax.Array
Lora = Mapping[str, tuple[Array, Array]]

# -- the model ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Everything that determines the pretrained base LM (it keys the cache).

    Attributes:
      seq_len: tokens per sequence ``T`` (statements and questions are at most 8).
      width: residual width ``d``; the query has ``num_heads`` heads of ``d / num_heads``.
      num_layers, num_heads, num_kv_heads, mlp: transformer shape (grouped-query
        attention: the key/value projections are ``[d, num_kv_heads * d / num_heads]``).
      pretrain_steps, pretrain_batch, pretrain_lr, pretrain_warmup: AdamW with
        warmup and cosine decay, on freshly sampled statements every step.
    """

    seq_len: int = 8
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp: int = 128
    pretrain_steps: int = 1000
    pretrain_batch: int = 256
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 100

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


#: Presets: ``default`` (the real base LM) and ``tiny`` (a few hundred steps, for tests);
#: other depths and widths for datasets of several structures (``--base_configs``):
#: ``deep`` (4 layers), ``mid`` (3), ``wide`` (width 96, key/value ``[48, 96]``), and
#: ``tiny_deep`` (4 layers), ``tiny_mid`` (3) of the tiny width.
BASE_CONFIGS = {
    "default": BaseConfig(),
    "tiny": BaseConfig(width=32, mlp=64, pretrain_steps=300, pretrain_batch=128),
    "deep": BaseConfig(num_layers=4),
    "mid": BaseConfig(num_layers=3),
    "wide": BaseConfig(width=96, mlp=192),
    "tiny_deep": BaseConfig(width=32, mlp=64, num_layers=4, pretrain_steps=300, pretrain_batch=128),
    "tiny_mid": BaseConfig(width=32, mlp=64, num_layers=3, pretrain_steps=300, pretrain_batch=128),
}


def base_config(name: str) -> BaseConfig:
    """The base-model preset called ``name`` (see :data:`BASE_CONFIGS`)."""
    if name not in BASE_CONFIGS:
        raise ValueError(f"unknown base config {name!r}; known: {sorted(BASE_CONFIGS)}")
    return BASE_CONFIGS[name]


def lora_modules(config: BaseConfig) -> list[tuple[str, int, int]]:
    """The LoRA modules, ``[(name, n, m)]`` (``n`` output, ``m`` input features)."""
    return [
        (f"lm.layers.{i}.attn.{proj}", config.kv_width, config.width)
        for i in range(config.num_layers)
        for proj in ("k_proj", "v_proj")
    ]


def _hash32(x: Array) -> Array:
    """The lowbias32 integer hash (uint32 -> uint32), elementwise."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def mix_seed(seed: Array, salt: int | Array) -> Array:
    """A new uint32 seed from ``seed`` and ``salt`` (a step, a layer, a module)."""
    salt = jnp.asarray(salt).astype(jnp.uint32)
    return _hash32(jnp.asarray(seed).astype(jnp.uint32) ^ (salt * jnp.uint32(0x9E3779B9) + 1))


def _dropout(x: Array, seed: Array, rate: Array) -> Array:
    """Inverted dropout with a traced rate (per-LoRA inside ``vmap``).

    The mask comes from a counter-based integer hash of ``(seed, element index)``, not
    from ``jax.random``: threefry bits for every LoRA input cost about half of a
    finetuning step on CPU; the hash fuses into the surrounding elementwise code.
    """
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    bits = _hash32(index * jnp.uint32(0x9E3779B9) + mix_seed(seed, 0x5EED))
    threshold = (rate * 4294967296.0).astype(jnp.uint32)
    return jnp.where(bits >= threshold, x / (1.0 - rate), 0.0)


def _select(x: Array, pos: Array) -> Array:
    """``x[s, pos[s]]`` as ``[S, 1, d]``, by a one-hot sum rather than a gather: its
    gradient is a select, not a scatter-add, and at ``T <= 8`` the sum costs nothing."""
    onehot = jnp.arange(x.shape[1])[None, :] == pos[:, None]
    return jnp.sum(jnp.where(onehot[:, :, None], x, 0.0), axis=1, keepdims=True)


class Attention(nn.Module):
    """Causal grouped-query self-attention with LoRA hooks on the key and value projections.

    ``__call__(x [S, T, d], lora, dropout, read_pos)``: with ``read_pos [S]`` only the
    query at that position of each sequence is computed (``-> [S, 1, d]``).
    """

    config: BaseConfig
    prefix: str

    @nn.compact
    def __call__(self, x, lora, dropout, read_pos):
        c = self.config
        S, T, _ = x.shape
        xq = x if read_pos is None else _select(x, read_pos)
        q = nn.Dense(c.width, name="q_proj")(xq)

        def project(proj, index):
            y = nn.Dense(c.kv_width, name=proj)(x)
            name = f"{self.prefix}.{proj}"
            if lora is not None and name in lora:
                u, v = lora[name]
                xd = x
                if dropout is not None:
                    seed, rate = dropout
                    xd = _dropout(x, mix_seed(seed, index), rate)
                y = y + (xd @ v) @ u.T
            return y

        k = project("k_proj", 0)
        v = project("v_proj", 1)
        Tq, hd, g = xq.shape[1], c.head_dim, c.num_heads // c.num_kv_heads
        q = q.reshape(S, Tq, c.num_kv_heads, g, hd)
        k = k.reshape(S, T, c.num_kv_heads, hd)
        v = v.reshape(S, T, c.num_kv_heads, hd)
        # Dots, not broadcast-and-sum: XLA:CPU materialises the broadcast product.
        scores = jnp.einsum("sqhgd,skhd->shgqk", q, k) / np.sqrt(hd).astype(np.float32)
        if read_pos is None:
            mask = jnp.tril(jnp.ones((T, T), bool))[None, None, None]
        else:
            mask = (jnp.arange(T)[None, :] <= read_pos[:, None])[:, None, None, None, :]
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        out = jnp.einsum("shgqk,skhd->sqhgd", probs, v)
        return nn.Dense(c.width, use_bias=False, name="o_proj")(out.reshape(S, Tq, c.width))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``."""

    config: BaseConfig
    prefix: str

    @nn.compact
    def __call__(self, x, lora, dropout, read_pos):
        h = Attention(self.config, f"{self.prefix}.attn", name="attn")(
            nn.RMSNorm(name="norm1")(x), lora, dropout, read_pos
        )
        if read_pos is not None:
            x = _select(x, read_pos)
        x = x + h
        h = nn.Dense(self.config.mlp, use_bias=False, name="up")(nn.RMSNorm(name="norm2")(x))
        return x + nn.Dense(self.config.width, use_bias=False, name="down")(nn.gelu(h))


class ArithLM(nn.Module):
    """The base language model, on a batch of sequences of ONE model (vmap LoRAs outside).

    ``__call__(tokens [S, T], lora=None, dropout=None, read_pos=None)`` returns next-token
    logits ``[S, T, V]``, or ``[S, V]`` at ``read_pos [S]`` only (the last layer then runs
    at that position alone, which is all a loss on the answer token needs). ``lora`` is
    ``{name: (u [n, r], v [m, r])}`` for any of :func:`lora_modules`; ``dropout`` is
    ``(seed, rate)`` (a uint32 seed): LoRA dropout on the input of each adapted
    projection, an independent mask per projection (PEFT's).
    """

    config: BaseConfig

    @nn.compact
    def __call__(self, tokens, lora=None, dropout=None, read_pos=None):
        c = self.config
        embed = nn.Embed(VOCAB_SIZE, c.width, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.width))
        x = embed(tokens) + pos[None, : tokens.shape[1]]
        for i in range(c.num_layers):
            last = i == c.num_layers - 1
            drop = None
            if dropout is not None:
                drop = (mix_seed(dropout[0], i), dropout[1])
            x = Block(c, f"lm.layers.{i}", name=f"layers_{i}")(
                x, lora, drop, read_pos if last else None
            )
        x = nn.RMSNorm(name="norm")(x)
        logits = embed.attend(x)
        return logits if read_pos is None else logits[:, 0]
