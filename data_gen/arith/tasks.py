"""The token sequences of the arithmetic-sources family: vocabulary, operations,
pretraining statements and the questions LoRAs are finetuned and evaluated on.

Part of the base model of :mod:`data_gen.arith` (:mod:`data_gen.arith.lm` describes
the family): the 39-token vocabulary (:data:`TOKENS`), the 20 operations
(:data:`OP_NAMES`, results in :func:`op_table`), random statements for pretraining
(:func:`sample_statements`), the question templates and sources, and the fixed
question sets of a dataset (:func:`make_questions`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# -- vocabulary -----------------------------------------------------------------------

NUM_DIGITS = 10
#: The operations, in token order; results are digits (comparisons give 0 or 1).
OP_NAMES = (
    "add", "sub", "mul", "max", "min", "absdiff", "mean", "first", "second", "less",
    "equal", "greater", "addinc", "twice_a", "twice_b", "square_a", "rsub",
    "table_x", "table_y", "table_z",
)  # fmt: skip
#: The words: question format tokens, and filler words in pretraining statements.
WORDS = ("Q", "?", "what", "is", "ans", ":")
PAD, BOS = 0, 1
DIGIT0 = 2
OP0 = DIGIT0 + NUM_DIGITS
EQ = OP0 + len(OP_NAMES)
WORD0 = EQ + 1
VOCAB_SIZE = WORD0 + len(WORDS)
TOKENS = (
    ("<pad>", "<bos>")
    + tuple(str(d) for d in range(NUM_DIGITS))
    + tuple(f"<{op}>" for op in OP_NAMES)
    + ("=",)
    + WORDS
)
#: Seed of the lookup-table operations: part of the family's definition, not of a run.
_TABLE_SEED = 20240611


def _word(w: str) -> int:
    return WORD0 + WORDS.index(w)


#: Question templates: token sequences where ``"a"``, ``"op"``, ``"b"`` and ``"r"`` are
#: the operands, the operation and the answer. Answers sit at positions 5-7, positions
#: pretraining used.
TEMPLATES = (
    ("<bos>", "Q", "a", "op", "b", "?", "r"),
    ("<bos>", "what", "is", "a", "op", "b", "r"),
    ("<bos>", "a", "op", "b", "ans", "r"),
    ("<bos>", "Q", "is", "a", "op", "b", ":", "r"),
)


@functools.lru_cache(maxsize=1)
def op_table() -> np.ndarray:
    """Results of every operation, ``[20, 10, 10]`` int (``table[op, a, b]``)."""
    a, b = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    tables = np.random.default_rng(_TABLE_SEED).integers(0, 10, (3, 10, 10))
    ops = [
        (a + b) % 10, (a - b) % 10, (a * b) % 10, np.maximum(a, b), np.minimum(a, b),
        np.abs(a - b), (a + b) // 2, a, b, (a < b), (a == b), (a > b), (a + b + 1) % 10,
        (2 * a + b) % 10, (a + 2 * b) % 10, (a * a + b) % 10, (b - a) % 10, *tables,
    ]  # fmt: skip
    table = np.stack([np.broadcast_to(o, (10, 10)) for o in ops]).astype(np.int32)
    assert table.shape == (len(OP_NAMES), 10, 10)
    return table


def render_question(template: int, op: int, a: int, b: int, seq_len: int) -> tuple[list, int]:
    """Tokens of one question with its answer, and the answer's position.

    Returns:
      ``(tokens [seq_len] with the answer in place and PAD after it, answer position)``.
    """
    r = int(op_table()[op, a, b])
    names = {"<bos>": BOS, "a": DIGIT0 + a, "b": DIGIT0 + b, "op": OP0 + op, "r": DIGIT0 + r}
    toks = [names[t] if t in names else _word(t) for t in TEMPLATES[template]]
    if len(toks) > seq_len:
        raise ValueError(f"template {template} needs {len(toks)} tokens, seq_len is {seq_len}")
    return toks + [PAD] * (seq_len - len(toks)), len(toks) - 1


#: The question sources, ``(operation, template)``: source ``s`` asks operation ``s`` in
#: template ``s % 4``. Source 0 (the paper's "Mercury") is always kept.
SOURCES = tuple((s, s % len(TEMPLATES)) for s in range(len(OP_NAMES)))
NUM_DROPPABLE = len(SOURCES) - 1
#: The challenge question types, never trained on: each operation in another template.
CHALLENGE_TYPES = tuple((s, (s + 2) % len(TEMPLATES)) for s in range(len(OP_NAMES)))


def source_name(s: int) -> str:
    """A readable name of source ``s``, e.g. ``"add/T0"``."""
    op, template = SOURCES[s]
    return f"{OP_NAMES[op]}/T{template}"


def make_questions(
    seed: int,
    seq_len: int,
    train_per_source: int = 32,
    val_per_source: int = 16,
    challenge_per_type: int = 20,
    num_choices: int = 4,
) -> dict[str, np.ndarray]:
    """The fixed question sets of a dataset, deterministic from ``seed``.

    Each source's operand pairs are split without overlap into training and validation
    questions. Challenge questions are
    multiple choice: the answer and ``num_choices - 1`` distinct wrong digits.

    Returns:
      ``train_tokens [P, T]``, ``train_answer_pos [P]``, ``train_source [P]`` (the pool
      every LoRA draws its kept sources from, grouped by source), ``val_tokens [V, T]``,
      ``val_answer_pos [V]``, ``val_source [V]``, ``challenge_tokens [C, T]`` (answer
      removed), ``challenge_answer_pos [C]``, ``challenge_choices [C, num_choices]`` (digit
      tokens) and ``challenge_label [C]`` (the index of the right choice); int32.
    """
    if train_per_source + val_per_source > NUM_DIGITS**2:
        raise ValueError(
            f"{train_per_source} training + {val_per_source} validation questions per "
            f"source need more than the {NUM_DIGITS**2} operand pairs"
        )
    rng = np.random.default_rng([seed, 7])
    out: dict[str, list] = {}

    def add(split, template, op, a, b, source):
        toks, pos = render_question(template, op, a, b, seq_len)
        for key, value in (("tokens", toks), ("answer_pos", pos), ("source", source)):
            out.setdefault(f"{split}_{key}", []).append(value)

    for s, (op, template) in enumerate(SOURCES):
        pairs = rng.permutation(NUM_DIGITS**2)
        n_train = train_per_source
        for split, chosen in (
            ("train", pairs[:n_train]),
            ("val", pairs[n_train : n_train + val_per_source]),
        ):
            for p in chosen:
                add(split, template, op, p // NUM_DIGITS, p % NUM_DIGITS, s)
    for t, (op, template) in enumerate(CHALLENGE_TYPES):
        for p in rng.choice(NUM_DIGITS**2, challenge_per_type, replace=False):
            add("challenge", template, op, p // NUM_DIGITS, p % NUM_DIGITS, t)
            toks = out["challenge_tokens"][-1]
            pos = out["challenge_answer_pos"][-1]
            answer = toks[pos]
            toks[pos] = PAD
            others = [DIGIT0 + d for d in range(NUM_DIGITS) if DIGIT0 + d != answer]
            choices = [answer, *rng.choice(others, num_choices - 1, replace=False)]
            order = rng.permutation(num_choices)
            out.setdefault("challenge_choices", []).append([choices[i] for i in order])
            out.setdefault("challenge_label", []).append(int(np.argmin(order)))
    out.pop("challenge_source")
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


# -- pretraining statements -------------------------------------------------------------


def sample_statements(key: Array, batch: int, seq_len: int) -> tuple[Array, Array]:
    """Random statements ``<bos> (0-2 words) a OP b = r`` (jittable).

    Returns:
      ``(tokens [batch, seq_len] int32, answer position [batch] int32)``.
    """
    k_op, k_a, k_b, k_n, k_w = jax.random.split(key, 5)
    op = jax.random.randint(k_op, (batch,), 0, len(OP_NAMES))
    a = jax.random.randint(k_a, (batch,), 0, NUM_DIGITS)
    b = jax.random.randint(k_b, (batch,), 0, NUM_DIGITS)
    num_words = jax.random.randint(k_n, (batch,), 0, 3)
    words = WORD0 + jax.random.randint(k_w, (batch, 2), 0, len(WORDS))
    r = jnp.asarray(op_table())[op, a, b]
    full = jnp.stack(
        [jnp.full_like(a, BOS), words[:, 0], words[:, 1], DIGIT0 + a, OP0 + op, DIGIT0 + b]
        + [jnp.full_like(a, EQ), DIGIT0 + r],
        axis=1,
    )  # [batch, 8]: both filler slots filled; drop the unused ones below
    j = jnp.arange(seq_len)[None, :]
    n = num_words[:, None]
    src = jnp.where(j <= n, j, j + 2 - n)
    toks = jnp.take_along_axis(full, jnp.minimum(src, 7), axis=1)
    toks = jnp.where(src <= 7, toks, PAD).astype(jnp.int32)
    return toks, (5 + num_words).astype(jnp.int32)
