"""Module types and depths parsed from module names (static: names are part of the spec).

Used by the peers that identify a module by what it is rather than by its position:
``spectral`` aggregates per type, ``w2t`` embeds type and layer, ``glnet_seq`` embeds
type and relative depth.

- Type: the last dotted component of the name that is not an integer, with the common
  aliases of the attention and MLP projections mapped to one name (``to_q``, ``query``,
  ``wq``, ``q`` -> ``q_proj``; ``to_out``/``o``/``out_proj``/``dense`` -> ``o_proj``;
  ``fc1``/``w1``/``up`` ... see :data:`ALIASES`). Any other name keeps its last component
  as its own type (``"head"`` -> ``"head"``, ``"lora_unet_x_attn1_to_k"`` -> that whole
  string), so unknown names are never merged with known ones nor dropped.
- Layer: the integers of the name, in order (``model.layers.12.self_attn.k_proj`` ->
  ``(12,)``; ``down_blocks.1.attentions.0...`` -> ``(1, 0, ...)``). Relative depth is the
  position of a module's integer tuple among the distinct tuples of its LoRA, sorted,
  scaled to ``[0, 1]``; a LoRA with one layer gives 0; a name without integers gets 0.5
  (no position known).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Aliases of one projection in common naming schemes -> the Llama/Qwen (PEFT) name.
ALIASES = {
    **dict.fromkeys(("q_proj", "q", "to_q", "query", "wq", "q_lin"), "q_proj"),
    **dict.fromkeys(("k_proj", "k", "to_k", "key", "wk", "k_lin"), "k_proj"),
    **dict.fromkeys(("v_proj", "v", "to_v", "value", "wv", "v_lin"), "v_proj"),
    **dict.fromkeys(("o_proj", "o", "to_out", "out_proj", "wo", "out_lin"), "o_proj"),
    **dict.fromkeys(("gate_proj", "w1", "fc1", "gate"), "gate_proj"),
    **dict.fromkeys(("up_proj", "w3", "up"), "up_proj"),
    **dict.fromkeys(("down_proj", "w2", "fc2", "down"), "down_proj"),
}


def _components(name: str) -> list[str]:
    return [c for c in name.replace("/", ".").split(".") if c]


def module_type(name: str) -> str:
    """The type of a module (see the module docstring): ``"k_proj"``, ``"head"``, ..."""
    words = [c for c in _components(name) if not c.isdigit()]
    if not words:
        return name
    last = words[-1]
    # diffusers' to_out is a ModuleList: "to_out.0" ends in an integer, handled above.
    return ALIASES.get(last.lower(), last)


def layer_key(name: str) -> tuple[int, ...]:
    """The integers of a module name, in order (``()`` if none)."""
    return tuple(int(c) for c in _components(name) if c.isdigit())


def relative_depths(names: Sequence[str]) -> dict[str, float]:
    """``{name: depth in [0, 1]}``: the rank of each name's :func:`layer_key` among the
    distinct keys of ``names`` (sorted), divided by (number of keys - 1)."""
    keys = sorted({layer_key(n) for n in names if layer_key(n)})
    pos = {k: i for i, k in enumerate(keys)}
    span = max(len(keys) - 1, 1)
    return {n: (pos[layer_key(n)] / span if layer_key(n) else 0.5) for n in names}


def layer_indices(names: Sequence[str]) -> dict[str, int]:
    """``{name: index}``: the rank of each name's :func:`layer_key` among the distinct keys
    (0-based; names without integers share one index past the last layer)."""
    keys = sorted({layer_key(n) for n in names if layer_key(n)})
    pos = {k: i for i, k in enumerate(keys)}
    return {n: pos.get(layer_key(n), len(keys)) for n in names}


def types_in_order(names: Sequence[str]) -> tuple[str, ...]:
    """The distinct :func:`module_type` of ``names``, in order of first appearance."""
    out: list[str] = []
    for n in names:
        t = module_type(n)
        if t not in out:
            out.append(t)
    return tuple(out)
