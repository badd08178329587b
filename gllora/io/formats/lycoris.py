"""LyCORIS LoHa and LoKr modules, converted exactly to the ``(u, v)`` form.

**LoHa** (``CONVENTIONS.md`` 17): ``delta = (a1 @ b1) * (a2 @ b2) * scale`` with
``a1 [n, r1]``, ``b1 [r1, m]``, ``a2 [n, r2]``, ``b2 [r2, m]``, ``scale = alpha / r1``.
A Hadamard product of two low-rank products is a rank-``r1*r2`` product of row-wise
Kronecker (Khatri-Rao) factors::

    u[i] = scale * kron(a1[i], a2[i])          u [n, r1*r2]
    v[j] = kron(b1[:, j], b2[:, j])            v [m, r1*r2]
    (u @ v.T)[i, j] = sum_pq a1[i,p] a2[i,q] b1[p,j] b2[q,j] = (a1 b1)[i,j] (a2 b2)[i,j]

Every entry of ``u`` and ``v`` is one product, so this is exact to float32 rounding.
When ``r1*r2 > min(n, m)`` (say rank 8 on a 32-wide layer) the Khatri-Rao form would
be wider than the matrix; the module is then stored densely at rank ``min(n, m)``
(``u = delta, v = I`` or ``u = scale * I, v = hadamard.T``), still exact.

**LoKr** (``CONVENTIONS.md`` 18): ``delta = kron(w1, w2) * scale`` with ``w1 [a, c]``
and ``w2 [b, d]`` (a conv ``w2 [b, d_in, *k]`` is flattened to ``d = d_in * prod(k)``;
``kron`` of the kernels then equals ``kron`` of the flattened matrices). Write each
factor as an exact product ``w = P @ Q.T``: a decomposed ``w = w_a @ w_b`` gives
``P = w_a``, ``Q = w_b.T`` (``k = dim`` columns); a full ``w [p, q]`` gives
``P = I_p, Q = w.T`` or ``P = w, Q = I_q``, whichever is narrower (``k = min(p, q)``).
By the mixed-product rule ``kron(P1 Q1^T, P2 Q2^T) = kron(P1, P2) @ kron(Q1, Q2)^T``::

    u = scale * kron(P1, P2)    [a*b, k1*k2]
    v = kron(Q1, Q2)            [c*d, k1*k2]

of rank ``k1*k2 <= min(a*b, c*d)``, again one product per entry. ``scale = alpha /
dim`` (``dim`` of the decomposed ``w2``, else of ``w1``); 1 when neither is decomposed.

**Tucker** (``CONVENTIONS.md`` 16-17, ``use_tucker``): a conv LoCon ``down [r, in, 1,
1]``, ``mid [r, r, kh, kw]``, ``up [out, r, 1, 1]`` has ``delta[o, c, h, w] = sum_ab
up[o, a] mid[a, b, h, w] down[b, c]``, still rank ``r`` in the ``[out, in*kh*kw]``
unfolding: ``u = scale * up``, ``v[(c, h, w), a] = sum_b mid[a, b, h, w] down[b, c]``.
A Tucker LoHa (``hada_w1_a [r1, out]``, ``hada_w1_b [r1, in]``, ``hada_t1 [r1, r1, kh,
kw]``, the same for ``w2``; PEFT's ``use_effective_conv2d`` writes the same) is a
Hadamard product of two such rank-``r`` unfoldings: the Khatri-Rao rule above applies.

**Dense differences** (LyCORIS ``full``, Wan/ComfyUI ``.diff``): a weight difference
``D [out, in, *k]`` stored whole is loaded exactly as a module of kind ``dense`` at rank
``min(n, m)`` in the identity form (``u = I, v = D.T`` when ``n <= m``, else ``u = D,
v = I``): no SVD, which would round every entry and whose rank cut would be a
tolerance choice, and a trained dense difference is full rank anyway. Its rank is
reported as ``min(n, m)``, so a reader sees that it is not low rank. A difference of a
vector (a norm weight) has no matrix form: it is listed as not a low-rank delta and
not loaded. ``diff_b`` is the module's ``bias`` extra.

**Symmetry.** A plain LoRA's ``(u, v)`` is defined up to ``(u g, v g^-T)`` for any
``g`` in GL(r). The factors produced here are structured: the LoHa parameters are
defined up to ``g1 (x) g2`` (``g1`` in GL(r1), ``g2`` in GL(r2)), and LoKr up to
``g1 (x) g2`` with ``g_i`` in GL(k_i): a subgroup of GL(r1*r2) resp. GL(k1*k2). Models
invariant to all of GL(r) (``mlp_svd``, ``mlp_dense``, ``glnet``) depend only on
``u v^T``, the true delta, and so stay exact and valid for these files; models that
are not (``mlp``, ``mlp_oalign``) see this one canonical factorization, which for
Kronecker-structured modules differs in kind from a trained LoRA's factors, and GL(r)
augmentation moves them off the LoHa/LoKr parameter set (harmless for the delta).
"""

from __future__ import annotations

import math

import numpy as np

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("hada_t1", "hada_t2")


def _matrix(header: Header, key: str, name: str) -> tuple[int, int]:
    shape = _common.require_float(header, key, name)
    if len(shape) != 2:
        raise _common.fail(header.path, f"{key!r} {list(shape)} must be a matrix", name)
    return shape


def plan_loha(
    header: Header,
    name: str,
    roles: dict[str, str],
    alpha: float | None,
    scale: float | None = None,
) -> _common.ModulePlan:
    """Checks the ``hada_*`` factors of one LoHa module (plain or Tucker) and plans ``(u, v)``.

    ``scale`` overrides the LyCORIS rule ``alpha / r1`` (PEFT computes its own).
    """
    missing = [k for k in LOHA_KEYS if k not in roles]
    if missing:
        raise _common.fail(header.path, f"LoHa module lacks {', '.join(missing)}", name)
    tucker = [k for k in ("hada_t1", "hada_t2") if k in roles]
    if tucker:
        if len(tucker) != 2:
            raise _common.fail(header.path, "a Tucker LoHa needs both hada_t1 and hada_t2", name)
        sides = [_tucker_side(header, name, roles, w) for w in ("1", "2")]
        (n1, m1, r1, kernel), (n2, m2, r2, kernel2) = sides
        if (n1, m1, kernel) != (n2, m2, kernel2):
            shapes = ", ".join(f"{k} {list(header.entries[roles[k]].shape)}" for k in sorted(roles))
            raise _common.fail(header.path, f"LoHa factors do not fit together: {shapes}", name)
        layout, base = "conv", (n1, m1 // math.prod(kernel), *kernel)
    else:
        (n1, r1), (r1b, m1) = (_matrix(header, roles[k], name) for k in LOHA_KEYS[:2])
        (n2, r2), (r2b, m2) = (_matrix(header, roles[k], name) for k in LOHA_KEYS[2:])
        if r1 != r1b or r2 != r2b or n1 != n2 or m1 != m2:
            shapes = ", ".join(f"{k} {list(header.entries[roles[k]].shape)}" for k in LOHA_KEYS)
            raise _common.fail(header.path, f"LoHa factors do not fit together: {shapes}", name)
        layout, base = "flat", None
    rank = min(r1 * r2, n1, m1)
    return _common.ModulePlan(
        name=name,
        kind="loha",
        layout=layout,
        n=n1,
        m=m1,
        rank=rank,
        scale=_common.kohya_scale(alpha, r1) if scale is None else scale,
        tensors={k: roles[k] for k in (*LOHA_KEYS, *tucker)},
        build=_build_loha,
        base_shape=base,
        alpha=alpha,
    )


def _tucker_side(header: Header, name: str, roles: dict[str, str], w: str):
    """``(out, in*kh*kw, r, kernel)`` of one Tucker LoHa side (``hada_w{w}_a [r, out]``,
    ``hada_w{w}_b [r, in]``, ``hada_t{w} [r, r, *kernel]``)."""
    (ra, out), (rb, fan_in) = (_matrix(header, roles[f"hada_w{w}_{x}"], name) for x in "ab")
    t = _common.require_float(header, roles[f"hada_t{w}"], name)
    if len(t) < 3 or t[0] != ra or t[1] != rb:
        raise _common.fail(
            header.path,
            f"Tucker LoHa hada_t{w} {list(t)} does not fit hada_w{w}_a [{ra}, {out}] and "
            f"hada_w{w}_b [{rb}, {fan_in}] (expected [{ra}, {rb}, kh, kw])",
            name,
        )
    return out, fan_in * math.prod(t[2:]), ra, tuple(t[2:])


def _loha_side(plan: _common.ModulePlan, fetch: _common.Fetch, w: str):
    """``(U [n, r], V [m, r])`` with ``U @ V.T`` the ``w``-th LoHa product (flattened)."""
    if f"hada_t{w}" in plan.tensors:
        t, wa, wb = fetch(f"hada_t{w}"), fetch(f"hada_w{w}_a"), fetch(f"hada_w{w}_b")
        v = np.einsum("ij...,jc->c...i", t, wb).reshape(plan.m, t.shape[0])
        return wa.T, v
    return fetch(f"hada_w{w}_a"), fetch(f"hada_w{w}_b").T


def _build_loha(plan: _common.ModulePlan, fetch: _common.Fetch) -> tuple[np.ndarray, np.ndarray]:
    (u1, v1), (u2, v2) = _loha_side(plan, fetch, "1"), _loha_side(plan, fetch, "2")
    n, m, r1, r2 = plan.n, plan.m, u1.shape[1], u2.shape[1]
    if plan.rank == r1 * r2:
        u = (u1[:, :, None] * u2[:, None, :]).reshape(n, r1 * r2)
        v = (v1[:, :, None] * v2[:, None, :]).reshape(m, r1 * r2)
        return plan.scale * u, v
    hadamard = (u1 @ v1.T) * (u2 @ v2.T)
    if n <= m:
        return plan.scale * np.eye(n), hadamard.T
    return plan.scale * hadamard, np.eye(m)


def plan_locon_tucker(
    header: Header, name: str, down: str, mid: str, up: str, alpha: float | None
) -> _common.ModulePlan:
    """A Tucker LoCon conv: ``down [r, in, 1, 1]``, ``mid [r, r, *k]``, ``up [out, r, 1, 1]``."""
    d, t, u = (_common.require_float(header, key, name) for key in (down, mid, up))
    r = d[0]
    if (
        len(d) < 3
        or len(t) != len(d)
        or len(u) != len(d)
        or any(x != 1 for x in (*d[2:], *u[2:]))
        or t[:2] != (r, r)
        or u[1] != r
    ):
        raise _common.fail(
            header.path,
            f"Tucker LoCon factors do not fit together: lora_down {list(d)}, lora_mid "
            f"{list(t)}, lora_up {list(u)} (expected [r, in, 1, 1], [r, r, kh, kw], "
            "[out, r, 1, 1])",
            name,
        )
    kernel = tuple(t[2:])
    return _common.ModulePlan(
        name=name,
        kind="lora",
        layout="conv",
        n=u[0],
        m=d[1] * math.prod(kernel),
        rank=r,
        scale=_common.kohya_scale(alpha, r),
        tensors={"down": down, "mid": mid, "up": up},
        build=_build_locon_tucker,
        base_shape=(u[0], d[1], *kernel),
        alpha=alpha,
    )


def _build_locon_tucker(plan, fetch) -> tuple[np.ndarray, np.ndarray]:
    up = fetch("up").reshape(plan.n, plan.rank)
    down = fetch("down").reshape(plan.rank, -1)
    v = np.einsum("ab...,bc->c...a", fetch("mid"), down).reshape(plan.m, plan.rank)
    return plan.scale * up, v


def plan_dense(header: Header, name: str, key: str) -> _common.ModulePlan:
    """A dense weight difference ``[out, in, *k]`` as an exact module of rank ``min(n, m)``."""
    shape = _common.require_float(header, key, name)
    if len(shape) < 2:
        raise _common.fail(
            header.path, f"dense difference {key!r} {list(shape)} is no matrix", name
        )
    n, m = shape[0], math.prod(shape[1:])
    layout = "conv" if len(shape) > 2 else "linear"
    return _common.ModulePlan(
        name=name,
        kind="dense",
        layout=layout,
        n=n,
        m=m,
        rank=min(n, m),
        scale=1.0,
        tensors={"diff": key},
        build=_build_dense,
        base_shape=tuple(shape),
        notes=(f"a dense weight difference, stored exactly at full rank min({n}, {m})",),
    )


def _build_dense(plan, fetch) -> tuple[np.ndarray, np.ndarray]:
    diff = fetch("diff").reshape(plan.n, plan.m)
    if plan.n <= plan.m:
        return np.eye(plan.n), diff.T
    return diff, np.eye(plan.m)


#: Adapters whose delta is not a product of factors in the file: key -> what it is.
NOT_LOW_RANK = {
    "oft_blocks": (
        "a LyCORIS (Diag-)OFT / BOFT module: it multiplies the base weight by a learned "
        "orthogonal matrix R (delta = (R - I) W), so its delta needs the base weights "
        "and is not a low-rank product"
    ),
    "a1.weight": (
        "a LyCORIS GLoRA module: its delta W (a1 a2) + b1 b2 scales the base weight W, so "
        "it needs the base weights and is not a low-rank product of the file's factors"
    ),
    "on_input": (
        "a LyCORIS IA3 module: it rescales the base weight's rows or columns by a learned "
        "vector (delta = W * (s - 1)), which needs the base weights and is not low rank"
    ),
}


def _side(header: Header, name: str, roles: dict[str, str], w: str):
    """``(rows, cols, k, decomposed, full_ndim)`` of ``lokr_w1`` or ``lokr_w2``."""
    full, wa, wb = roles.get(f"lokr_{w}"), roles.get(f"lokr_{w}_a"), roles.get(f"lokr_{w}_b")
    if full is not None and wa is None and wb is None:
        shape = _common.require_float(header, full, name)
        if len(shape) < 2 or (w == "w1" and any(d != 1 for d in shape[2:])):
            raise _common.fail(header.path, f"lokr_{w} {list(shape)} has the wrong shape", name)
        rows, cols = shape[0], math.prod(shape[1:])
        return rows, cols, min(rows, cols), False, len(shape)
    if full is None and wa is not None and wb is not None:
        (rows, k), (kb, cols) = _matrix(header, wa, name), _matrix(header, wb, name)
        if k != kb:
            raise _common.fail(
                header.path,
                f"lokr_{w}_a [{rows}, {k}] and lokr_{w}_b [{kb}, {cols}] differ in rank",
                name,
            )
        return rows, cols, k, True, 2
    have = sorted(k for k in roles if k.startswith(f"lokr_{w}"))
    raise _common.fail(
        header.path, f"LoKr needs lokr_{w} or both lokr_{w}_a and lokr_{w}_b; has {have}", name
    )


def plan_lokr(
    header: Header,
    name: str,
    roles: dict[str, str],
    alpha: float | None,
    scale: float | None = None,
) -> _common.ModulePlan:
    """Checks the ``lokr_*`` factors of one LoKr module and plans ``(u, v)``.

    ``scale`` overrides the LyCORIS rule (PEFT scales by ``alpha / r`` even when both
    factors are whole, where LyCORIS uses 1: the two rules must not be mixed up).
    """
    a, c, k1, dec1, _ = _side(header, name, roles, "w1")
    b, d, k2, dec2, ndim2 = _side(header, name, roles, "w2")
    if scale is None and dec2:
        scale = _common.kohya_scale(alpha, header.entries[roles["lokr_w2_b"]].shape[0])
    elif scale is None and dec1:
        scale = _common.kohya_scale(alpha, header.entries[roles["lokr_w1_b"]].shape[0])
    elif scale is None:
        scale = 1.0  # LyCORIS stores alpha = dim then, and ignores it
    base = None
    layout = "flat" if dec2 else "linear"
    if ndim2 > 2:
        kernel = header.entries[roles["lokr_w2"]].shape
        layout, base = "conv", (a * b, c * kernel[1], *kernel[2:])
    return _common.ModulePlan(
        name=name,
        kind="lokr",
        layout=layout,
        n=a * b,
        m=c * d,
        rank=k1 * k2,
        scale=scale,
        tensors={k: roles[k] for k in LOKR_KEYS if k in roles},
        build=_build_lokr,
        base_shape=base if layout == "conv" else (a * b, c * d) if layout == "linear" else None,
        alpha=alpha,
    )


def _exact_factors(plan: _common.ModulePlan, fetch: _common.Fetch, w: str):
    """``(P, Q)`` with ``P @ Q.T`` equal to ``lokr_w1``/``lokr_w2`` (flattened) exactly."""
    if f"lokr_{w}" in plan.tensors:
        full = fetch(f"lokr_{w}")
        full = full.reshape(full.shape[0], -1)
        rows, cols = full.shape
        return (np.eye(rows), full.T) if rows <= cols else (full, np.eye(cols))
    return fetch(f"lokr_{w}_a"), fetch(f"lokr_{w}_b").T


def _build_lokr(plan: _common.ModulePlan, fetch: _common.Fetch) -> tuple[np.ndarray, np.ndarray]:
    p1, q1 = _exact_factors(plan, fetch, "w1")
    p2, q2 = _exact_factors(plan, fetch, "w2")
    return plan.scale * np.kron(p1, p2), np.kron(q1, q2)
