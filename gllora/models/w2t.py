"""Weight2Token (Han et al. 2026, arXiv 2603.15990) as ``w2t``: canonical rank tokens and
transformers, written from the description of the authors' design in issue 14.

Canonical form per module (:func:`canonical_form`): thin QRs ``u = Q_u R_u``, ``v = Q_v
R_v``, the SVD of the ``r x r`` core ``R_u R_v^T = Y S W^T``; ``U = Q_u Y``, ``V = Q_v W``
(the singular vectors of ``u v^T``); each pair ``(U_j, V_j)`` flipped so that the
largest-magnitude entry of ``U_j`` is positive. The tokens are the ``r`` triples
``(U_j, V_j, s_j)``: a function of ``u v^T`` alone, hence GL(r)-invariant, wherever it is
continuous (distinct singular values, a unique largest entry).

No LAPACK call: ``R`` comes from :func:`gllora.linalg.gram_sqrt` (``R^T R = u^T u``, any
such ``R`` makes ``u R^-1`` orthonormal), the core's SVD from one-sided Jacobi
(:func:`gllora.linalg.svd_columns`: ``C W = Y S``), and the inverses never appear:
``U S = u R_v^T W`` and ``V S^2 = v R_u^T (C W)`` (from ``C W = Y S`` and ``C^T Y = W S``),
each column normalised to unit length.

The model (hidden ``H = 128``): per module position a projector (``U_j`` and ``V_j`` each
``Linear -> LayerNorm -> ReLU``, concatenated, ``Linear 2H -> H``) with ``s_j`` entering by
FiLM (``log1p(s)`` standardised within the module, an MLP ``1 -> H -> 2H`` giving scale and
shift, gated by a learnable scalar initialised to 0; by default the module's mean
``log1p(s)`` is a second input of that MLP, see ``absolute_scale``); one pre-LN transformer layer over
the ``r`` tokens without positions; pooling by 4 learned queries with logits
``q . x / sqrt(H) + 0.5 log1p(s_j)``, ``4H -> Linear -> LayerNorm -> GELU`` to one token
per module; layer and module-type embeddings added (parsed from the names,
:mod:`gllora.models.module_names`); a 2-layer pre-LN transformer across modules; attention
pooling; an MLP head. Padded rank columns are masked everywhere.

Augmentation (:func:`random_perm_sign`): a random permutation of the rank components and
random joint sign flips, each with a probability; as an engine option
(``config.augment="perm_sign"``, on the input factors: an O(r) element, so it changes
nothing for invariant models) and inside this model (``token_augment``, on the canonical
tokens, where the authors apply it: it breaks the sign convention and teaches the model
not to rely on it).

The canonical form has no parameters (``fixed_features``): ``model.apply(variables, lora,
features_only=True)`` returns it as a :class:`~gllora.models.featurized.Featurized` (per group
``U, V, s, live``, ``live`` as 0/1), which the engine computes once per run; the token
augmentation acts after it, so it still draws afresh at every step.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gllora import layers, linalg
from gllora.lora import Lora
from gllora.models import module_names as names_lib
from gllora.models.featurized import Featurized

Array = jax.Array


def canonical_form(u: Array, v: Array, rank: Array) -> tuple[Array, Array, Array, Array]:
    """The W2T canonical tokens of modules ``u [..., n, r]``, ``v [..., m, r]``.

    Args:
      rank: ``[...]`` true ranks; columns past them are padding.

    Returns:
      ``(U [..., n, r], V [..., m, r], s [..., r], live [..., r])``: unit singular vectors
      of ``u v^T`` (columns), singular values descending, and which tokens are live
      (within the true rank and ``s > 0``). Dead tokens are zero.
    """
    ru, rv = linalg.gram_sqrt(u), linalg.gram_sqrt(v)  # R^T R = x^T x
    core = jnp.einsum("...ij,...kj->...ik", ru, rv)  # R_u R_v^T
    b, w = linalg.svd_columns(core)  # core @ w = b, columns of b orthogonal
    s = jnp.sqrt(jnp.sum(b * b, axis=-2))
    order = jnp.argsort(-s, axis=-1)
    s = jnp.take_along_axis(s, order, -1)
    b = jnp.take_along_axis(b, order[..., None, :], -1)
    w = jnp.take_along_axis(w, order[..., None, :], -1)
    big_u = _unit_columns(jnp.einsum("...nr,...sr,...st->...nt", u, rv, w))  # u R_v^T W
    big_v = _unit_columns(jnp.einsum("...mr,...sr,...st->...mt", v, ru, b))  # v R_u^T C W
    r = u.shape[-1]
    tiny = jnp.finfo(u.dtype).tiny ** 0.5
    live = (_positions(r, rank.ndim) < rank[..., None]) & (s > tiny * jnp.maximum(s[..., :1], 1.0))
    # Sign convention: the largest-magnitude entry of each U_j is positive.
    idx = jnp.argmax(jnp.abs(big_u), axis=-2)[..., None, :]
    sign = jnp.where(jnp.take_along_axis(big_u, idx, -2) < 0, -1.0, 1.0).astype(u.dtype)
    keep = live[..., None, :].astype(u.dtype)
    return big_u * sign * keep, big_v * sign * keep, s * live, live


def _positions(r: int, ndim: int) -> Array:
    """``arange(r)`` shaped ``[1, ..., 1, r]`` with ``ndim`` leading axes (explicit ranks)."""
    return jnp.arange(r).reshape((1,) * ndim + (r,))


def _unit_columns(x: Array) -> Array:
    norm = jnp.sqrt(jnp.sum(x * x, axis=-2, keepdims=True))
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.where(norm > tiny, x / jnp.where(norm > tiny, norm, 1.0), 0.0)


def random_perm_sign(
    key: Array, u: Array, v: Array, rank: Array, p: float = 0.5
) -> tuple[Array, Array]:
    """W2T's augmentation of ``u [..., n, r]``, ``v [..., m, r]`` (factors or tokens):
    with probability ``p`` a random permutation of the live columns, and with probability
    ``p`` independent random signs on them, applied jointly to ``u`` and ``v``.

    ``(u P D, v P D) = (u g, v g^-T)`` with ``g = P D`` orthogonal: a group action, so
    ``u v^T`` is unchanged. Padded columns (past ``rank [...]``) stay in place.
    """
    r = u.shape[-1]
    k_do_perm, k_perm, k_do_sign, k_sign = jax.random.split(key, 4)
    batch = rank.shape
    pos = jnp.broadcast_to(_positions(r, len(batch)), (*batch, r))
    live = pos < rank[..., None]
    noise = jnp.where(live, jax.random.uniform(k_perm, (*batch, r)), 2.0 + pos)
    perm = jnp.argsort(noise, axis=-1)
    perm = jnp.where(jax.random.uniform(k_do_perm, (*batch, 1)) < p, perm, pos)
    signs = jnp.where(live & (jax.random.uniform(k_sign, (*batch, r)) < 0.5), -1.0, 1.0)
    signs = jnp.where(jax.random.uniform(k_do_sign, (*batch, 1)) < p, signs, 1.0)
    take = lambda x: jnp.take_along_axis(x, perm[..., None, :], -1) * signs[..., None, :]
    return take(u).astype(u.dtype), take(v).astype(v.dtype)


def augment_lora(key: Array, lora: Lora, p: float = 0.5) -> Lora:
    """:func:`random_perm_sign` on every module group of ``lora`` (ONE example)."""
    keys = jax.random.split(key, len(lora.u))
    pairs = [random_perm_sign(k, u, v, r, p) for k, u, v, r in zip(keys, lora.u, lora.v, lora.rank)]
    return lora.replace(u=tuple(a for a, _ in pairs), v=tuple(b for _, b in pairs))


class _Block(nn.Module):
    """Pre-LN transformer layer: ``x + MHA(LN x)``, then ``x + MLP(LN x)``."""

    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.hidden)(
            h, h, mask=mask
        )
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(h)))
        return x + h


def _masked_softmax(logits: Array, mask: Array) -> Array:
    logits = jnp.where(mask, logits, -1e30)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, w, 0.0)


class W2T(nn.Module):
    """Weight2Token: canonical rank tokens, a transformer over ranks, one across modules.

    Invariant to an independent ``g_i`` in GL(r) per module for generic inputs: the
    tokens are a function of ``u_i v_i^T``, except where two singular values of a module
    meet (its singular vectors are not unique there) or two entries of a ``U_j`` tie in
    magnitude (the sign convention flips); near such points the output changes quickly
    (``tests/test_models.py`` states the tolerance). Invariant to zero-padding of the rank
    (padded tokens are masked). Fixed to the module structure it was initialised with
    (one projector per module position, one embedding per layer and type).
    """

    batch_layout: ClassVar[str] = "leading"
    #: The canonical tokens are a fixed function of the LoRA: computed once per run.
    fixed_features: ClassVar[bool] = True

    num_outputs: int
    hidden: int = 128
    heads: int = 4
    queries: int = 4
    module_depth: int = 2
    dropout: float = 0.1
    token_augment: float = 0.0  # probability of each of W2T's two augmentations, in training
    # The module's mean log1p(s) as a second FiLM input (gllora's default; False: the
    # authors' form, whose within-module standardisation discards each module's scale, so
    # that W2T cannot tell a LoRA from a multiple of it).
    absolute_scale: bool = True

    @nn.compact
    def __call__(
        self, lora: Lora | Featurized, train: bool = False, features_only: bool = False
    ) -> Array | Featurized:
        if isinstance(lora, Featurized):  # computed ahead by features_only=True
            if self.is_initializing():
                raise ValueError("W2T: initialise with a Lora, not Featurized")
            spec, x = lora.spec, lora.values
            if spec is None or len(x) != 4 * len(spec.groups):
                raise ValueError(
                    f"W2T: Featurized input with keys {list(lora.keys)} is not W2T's canonical "
                    "form (U, V, s, live per group, with the spec); make it with "
                    "features_only=True"
                )
            canon = [(*x[i : i + 3], x[i + 3] > 0) for i in range(0, len(x), 4)]
        else:
            if lora.spec.extras:
                raise ValueError("W2T takes no extra inputs (DoRA magnitudes); drop them first")
            layers.check_input(self, lora)
            spec = lora.spec
            canon = [canonical_form(*m) for m in zip(lora.u, lora.v, lora.rank)]
            if features_only:
                keys = tuple(f"{g.key}:{part}" for g in spec.groups for part in "UVsl")
                values = tuple(x for big_u, big_v, s, live in canon
                               for x in (big_u, big_v, s, live.astype(s.dtype)))  # fmt: skip
                return Featurized(keys, values, spec)
        H = self.hidden
        rank_block = _Block(H, self.heads, name="rank_block")
        queries = self.param("pool_queries", nn.initializers.normal(1.0), (self.queries, H))
        film = nn.Sequential([nn.Dense(H), nn.gelu, nn.Dense(2 * H)], name="film")
        gate = self.param("film_gate", nn.initializers.zeros, ())
        pool_out = nn.Dense(H, name="pool_out")
        pool_norm = nn.LayerNorm(name="pool_norm")
        tokens = []
        for g, (big_u, big_v, s, live) in zip(spec.groups, canon):
            # big_u [k, n, r], big_v [k, m, r], s and live [k, r]
            if train and self.token_augment > 0:
                big_u, big_v = random_perm_sign(
                    self.make_rng("dropout"), big_u, big_v, jnp.sum(live, -1), self.token_augment
                )
            k = len(g.names)
            x = jnp.concatenate(
                [
                    self._project(f"u_{g.key}", big_u, k, g.n),
                    self._project(f"v_{g.key}", big_v, k, g.m),
                ],
                axis=-1,
            )  # [k, r, 2H]
            mix = self.param(f"mix_{g.key}", nn.initializers.lecun_normal(), (k, 2 * H, H))
            x = jnp.einsum("krc,kch->krh", x, mix)
            ls = jnp.log1p(s)
            count = jnp.maximum(jnp.sum(live, -1, keepdims=True), 1)
            mean = jnp.sum(ls * live, -1, keepdims=True) / count
            std = jnp.sqrt(jnp.sum(((ls - mean) * live) ** 2, -1, keepdims=True) / count)
            z = jnp.where(live, (ls - mean) / (std + 1e-6), 0.0)[..., None]
            if self.absolute_scale:
                z = jnp.concatenate([z, jnp.broadcast_to(mean[..., None], z.shape)], -1)
            scale, shift = jnp.split(film(z), 2, axis=-1)
            x = x + gate * (x * scale + shift)
            x = rank_block(x, live[:, None, None, :])  # [k, r, H]
            logits = jnp.einsum("qh,krh->kqr", queries, x) / jnp.sqrt(H) + 0.5 * ls[:, None, :]
            pooled = jnp.einsum("kqr,krh->kqh", _masked_softmax(logits, live[:, None, :]), x)
            tokens.append(nn.gelu(pool_norm(pool_out(pooled.reshape(k, -1)))))
        x = jnp.concatenate(tokens)  # [L, H], modules in group order
        order = [name for g in spec.groups for name in g.names]
        layer_of = names_lib.layer_indices(spec.order)
        types = names_lib.types_in_order(spec.order)
        x = x + nn.Embed(max(layer_of.values()) + 1, H, name="layer_embed")(
            jnp.asarray([layer_of[n] for n in order])
        )
        x = x + nn.Embed(len(types), H, name="type_embed")(
            jnp.asarray([types.index(names_lib.module_type(n)) for n in order])
        )
        for i in range(self.module_depth):
            x = _Block(H, self.heads, name=f"module_block_{i}")(x, None)
        query = self.param("head_query", nn.initializers.normal(1.0), (H,))
        weights = jax.nn.softmax(x @ query / jnp.sqrt(H))
        h = nn.LayerNorm()(weights @ x)
        h = nn.gelu(nn.Dense(H)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_outputs)(h)

    def _project(self, name: str, x: Array, k: int, n: int) -> Array:
        """Per module position: ``Linear -> LayerNorm -> ReLU`` on each token, ``[k, r, H]``."""
        kernel = self.param(f"proj_{name}", nn.initializers.normal(n**-0.5), (k, n, self.hidden))
        bias = self.param(f"proj_bias_{name}", nn.initializers.zeros, (k, self.hidden))
        h = jnp.einsum("knr,knh->krh", x, kernel) + bias[:, None, :]
        return nn.relu(nn.LayerNorm(name=f"proj_norm_{name}")(h))
