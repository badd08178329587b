"""``glnet_seq``: one model for LoRAs of different structures (the paper's footnote 1).

Per module, a GL-invariant token from an encoder shared by every module of the same
type and shape (not one per position): GL-net's equivariant narrowing ``Phi^T u``,
``Psi^T v`` (``[d, r]`` each, eq. 4), their product ``[d, d]`` (invariant), flattened,
with ``log |u v^T|_F`` beside it (the magnitude, which the LayerNorm after the first
layer would otherwise hide), ``Linear -> LayerNorm -> ReLU``. A module embedding from its
type and relative depth parsed from its name (:mod:`gllora.models.module_names`) is added; a
pre-LN transformer runs across the modules present; a masked mean pools them; an MLP
head predicts from the mean and the log of the number of modules present.

Which modules are present is the input's business: the LoRA's own modules, minus any
whose true rank is 0 (:func:`module_mask`): a padded batch of several structures marks
absent modules that way, and the result equals that of the LoRA without them. The
parameters depend only on the (type, shape) pairs and types seen at init, never on the
number or order of modules, so one set of parameters applies to every structure built
from those modules (another depth, missing modules, another base model of the same
widths). Merge the variables of inits on several structures to cover all their pairs.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gllora.lora import Lora
from gllora.models import module_names as names_lib
from gllora.models.spectral import param_name
from gllora.models.w2t import _Block

Array = jax.Array
ENCODERS_COLLECTION = "glnet_seq_encoders"


def encoder_key(name: str, n: int, m: int) -> str:
    """The encoder a module uses: its type and shape."""
    return f"{param_name(names_lib.module_type(name))}_{n}x{m}"


def module_mask(lora: Lora) -> Array:
    """``[L]`` bool, modules in group order: present (true rank > 0)."""
    return jnp.concatenate([r > 0 for r in lora.rank])


def _fourier(depth: Array, count: int = 8) -> Array:
    freqs = (np.pi * np.arange(1, count + 1)).reshape((1,) * depth.ndim + (count,))
    return jnp.concatenate(
        [jnp.sin(depth[..., None] * freqs), jnp.cos(depth[..., None] * freqs)], -1
    )


class GLNetSeq(nn.Module):
    """GL-invariant module tokens and a transformer across modules, for any structure.

    Invariant to an independent ``g_i`` in GL(r) per module, to zero-padding of the rank,
    and to the order of the modules (no positional encoding: a module is identified only
    by the type and relative depth its name gives). Not invariant to renaming a module
    (its name is its identity), nor to dropping one (that is a different LoRA).

    Attributes:
      width: rows of the equivariant narrowing (``d``; token features ``d^2 + 1``).
      hidden: token and transformer width.
      depth: transformer layers across modules.
    """

    batch_layout: ClassVar[str] = "leading"
    any_structure: ClassVar[bool] = True

    num_outputs: int
    width: int = 16
    hidden: int = 128
    depth: int = 2
    heads: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        if lora.u[0].ndim != 3:
            raise ValueError(
                f"models take ONE LoRA (u [k, n, r]); got u {list(lora.u[0].shape)}. "
                "Batch with jax.vmap(model.apply, in_axes=(None, 0))."
            )
        if lora.spec.extras:
            raise ValueError("GLNetSeq takes no extra inputs (DoRA magnitudes); drop them first")
        H, d = self.hidden, self.width
        depths = names_lib.relative_depths(lora.spec.order)
        keys = [encoder_key(name, g.n, g.m) for g in lora.spec.groups for name in g.names]
        self._check_encoders(sorted(set(keys)))
        type_params: dict[str, Array] = {}
        for t in names_lib.types_in_order(lora.spec.order):
            t = param_name(t)
            if t not in type_params:
                type_params[t] = self.param(f"type_{t}", nn.initializers.normal(0.02), (H,))
        tokens, type_emb, depth_in = [], [], []
        for g, u, v in zip(lora.spec.groups, lora.u, lora.v):
            by_key: dict[str, list[int]] = {}
            for i, name in enumerate(g.names):
                by_key.setdefault(encoder_key(name, g.n, g.m), []).append(i)
            parts = {}
            for key, idx in by_key.items():
                sel = slice(None) if len(idx) == len(g.names) else np.asarray(idx)
                phi = self.param(f"phi_{key}", nn.initializers.normal(g.n**-0.5), (g.n, d))
                psi = self.param(f"psi_{key}", nn.initializers.normal(g.m**-0.5), (g.m, d))
                pu = jnp.einsum("nd,knr->kdr", phi, u[sel])
                pv = jnp.einsum("me,kmr->ker", psi, v[sel])
                prod = jnp.einsum("kdr,ker->kde", pu, pv).reshape(len(idx), d * d)
                # |u v^T|_F^2 = tr((u^T u)(v^T v)): exact, O((n + m) r^2).
                gu = jnp.einsum("knr,kns->krs", u[sel], u[sel])
                gv = jnp.einsum("kmr,kms->krs", v[sel], v[sel])
                log_norm = 0.5 * jnp.log(jnp.maximum(jnp.einsum("krs,ksr->k", gu, gv), 0.0) + 1e-12)
                x = jnp.concatenate([prod, log_norm[:, None]], -1)
                h = nn.Dense(H, name=f"encoder_{key}")(x)
                h = nn.relu(nn.LayerNorm(name=f"encoder_norm_{key}")(h))
                for j, i in enumerate(idx):
                    parts[i] = h[j]
            tokens.append(jnp.stack([parts[i] for i in range(len(g.names))]))
            for name in g.names:
                t = param_name(names_lib.module_type(name))
                type_emb.append(type_params[t])
                depth_in.append(depths[name])
        mask = module_mask(lora)  # [L]
        x = jnp.concatenate(tokens) + jnp.stack(type_emb)
        x = x + nn.Dense(H, name="depth_embed")(_fourier(jnp.asarray(depth_in, x.dtype)))
        attn_mask = mask[None, None, :]  # [heads=1, query, key]: only present modules attend
        for i in range(self.depth):
            x = _Block(H, self.heads, name=f"block_{i}")(x, attn_mask)
        x = nn.LayerNorm()(x)
        count = jnp.maximum(jnp.sum(mask), 1).astype(x.dtype)
        pooled = jnp.sum(x * mask[:, None], 0) / count
        # A mean forgets how many modules there are; totals (a norm summed over modules)
        # need it, so log(count) goes to the head beside the mean.
        h = nn.gelu(nn.Dense(H)(jnp.concatenate([pooled, jnp.log(count)[None]])))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_outputs)(h)

    def _check_encoders(self, keys: list[str]) -> None:
        if not self.is_initializing():
            known = set(self.variables.get(ENCODERS_COLLECTION, {}))
            unknown = [k for k in keys if k not in known]
            if unknown:
                raise ValueError(
                    f"GLNetSeq: no encoder for module type and shape {unknown} (the model was "
                    f"initialised with {sorted(known)}); init it on a LoRA with such modules"
                )
        for key in keys:
            self.variable(ENCODERS_COLLECTION, key, lambda: jnp.zeros((1,), jnp.int8))
