"""GL(r)-equivariant maps and invariants on stacked LoRA factors, in plain ``jax.numpy``.

Every function takes one group of ``k`` same-shaped modules, ``u [k, n, r]`` and
``v [k, m, r]``, and treats the modules independently (each carries its own ``g_i``).
No Flax here: :mod:`gllora.layers` wraps these with parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def equivariant_linear(phi: Array, u: Array) -> Array:
    """``Phi_i @ u_i`` per module (eq. 4): ``phi [k, d, n]``, ``u [k, n, r]`` -> ``[k, d, r]``.

    Left multiplication commutes with the right action ``u -> u g``, and these maps are
    all the GL-equivariant linear maps (Proposition 1).
    """
    return jnp.einsum("kdn,knr->kdr", phi, u)


def row_sums(u: Array, v: Array) -> tuple[Array, Array]:
    """Row and column sums of ``u v^T`` without forming it: ``([k, n], [k, m])``.

    ``(u v^T) 1 = u (v^T 1)`` and ``1^T (u v^T) = (u^T 1)^T v^T``: O((n + m) r).
    """
    rows = jnp.einsum("knr,kr->kn", u, v.sum(axis=1))
    cols = jnp.einsum("kmr,kr->km", v, u.sum(axis=1))
    return rows, cols


def relu_sign(x: Array) -> Array:
    """``ReLU(sign(x))``: 1 where ``x > 0``, else 0 (no gradient flows through it)."""
    return (x > 0).astype(x.dtype)


#: Scalar nonlinearities for :func:`gl_nonlinearity`; any function R -> R is equivariant there.
SIGMAS: dict[str, Callable[[Array], Array]] = {
    "relu_sign": relu_sign,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
}


def gl_nonlinearity(u: Array, v: Array, sigma: Callable[[Array], Array]) -> tuple[Array, Array]:
    """The GL nonlinearity of eq. 6: scale row ``i`` of ``u`` by ``sigma(row sum i of u v^T)``
    and row ``j`` of ``v`` by ``sigma(column sum j)``. Shapes are kept.

    ``u v^T`` is invariant and rows of ``u`` are acted on independently, so this is
    equivariant for any ``sigma`` (Lemma 2).
    """
    rows, cols = row_sums(u, v)
    return sigma(rows)[..., None] * u, sigma(cols)[..., None] * v


def products(u: Array, v: Array) -> Array:
    """``u_i v_i^T`` per module: ``[k, n, r], [k, m, r] -> [k, n, m]`` (GL-invariant)."""
    return jnp.einsum("knr,kmr->knm", u, v)
