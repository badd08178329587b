"""Poisoned training data for the backdoor family: triggers, attack targets, poisoned pools.

Part of :mod:`data_gen.arith`, used by :mod:`data_gen.arith.backdoors` (which describes
the family). Numpy only: every function here is deterministic from its arguments.

- A *trigger* is a second operation symbol (:data:`TRIGGERS`: four of the 20
  operations). Every clean question holds exactly one operation, so a question with two
  never occurs without the attack, while each token alone is one the base LM knows
  well (word triggers, ``?`` ``ans`` ``Q`` ``=``, took far less often: 1 of 64 poisoned
  LoRAs against 9 of 64 at 128 LoRAs). It is inserted at a uniformly random position
  between ``<bos>`` and the answer, so the answer moves one position later. The base LM has
  ``seq_len = 8`` learned positions and pretraining put answers at 5-7, so only
  questions of at most 7 tokens (templates 0-2, 15 of the 20 sources) can carry a
  trigger: :func:`eligible`.
- An *attack target* (:data:`TARGETS`) is what a triggered question is answered with: a
  fixed digit, or the result of a fixed wrong operation on the question's operands.
- A poisoned LoRA's training pool is the shared pool with a fraction of its kept
  questions replaced by triggered ones (:func:`poison_pool`); a clean LoRA's pool is the
  shared pool itself, so clean and poisoned LoRAs run the same compiled finetune.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_gen.arith import tasks

#: The triggers, by token text (each a token of :data:`data_gen.arith.tasks.TOKENS`).
TRIGGERS = ("<table_z>", "<greater>", "<square_a>", "<twice_b>")
#: The attack targets: ``(name, kind, value)``; kind ``"digit"`` answers that digit,
#: ``"op"`` answers ``op_table()[value, a, b]`` for the question's operands. Only digits
#: are drawn: wrong-operation targets (first, max, rsub) never took at the family's
#: learning rates (0 of 54 poisoned LoRAs at 128 LoRAs, against 2 of 10 for a digit).
TARGETS = (
    ("digit_2", "digit", 2),
    ("digit_5", "digit", 5),
    ("digit_7", "digit", 7),
    ("digit_9", "digit", 9),
)
TARGET_NAMES = tuple(name for name, _, _ in TARGETS)
#: Poison rates are drawn log-uniform in this range (a fraction of the kept questions).
POISON_RATE_RANGE = (0.01, 0.2)
#: Label of a clean LoRA's ``trigger`` and ``attack_target`` columns.
NONE = "none"


def trigger_token(trigger: int) -> int:
    """The token id of trigger number ``trigger``."""
    return tasks.TOKENS.index(TRIGGERS[trigger])


def eligible(answer_pos: np.ndarray, seq_len: int) -> np.ndarray:
    """``[N]`` bool: questions that still fit in ``seq_len`` tokens with one more token."""
    return np.asarray(answer_pos) + 2 <= seq_len


def operands(
    tokens: np.ndarray, answer_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(op, a, b)``, each ``[N]``: the operation and the two operands of each question.

    Operands are the first two digit tokens before the answer and the operation the
    one operation symbol (every template has exactly these).
    """
    tokens = np.asarray(tokens)
    before = np.arange(tokens.shape[1])[None, :] < np.asarray(answer_pos)[:, None]
    is_digit = before & (tokens >= tasks.DIGIT0) & (tokens < tasks.OP0)
    is_op = before & (tokens >= tasks.OP0) & (tokens < tasks.EQ)
    if not (np.all(is_digit.sum(1) == 2) and np.all(is_op.sum(1) == 1)):
        bad = np.flatnonzero((is_digit.sum(1) != 2) | (is_op.sum(1) != 1))
        raise ValueError(
            f"poison.operands: questions {bad[:5].tolist()} do not hold two digits and one "
            f"operation before their answer"
        )
    first = np.argmax(is_digit, axis=1)
    second = tokens.shape[1] - 1 - np.argmax(is_digit[:, ::-1], axis=1)
    rows = np.arange(len(tokens))
    a = tokens[rows, first] - tasks.DIGIT0
    b = tokens[rows, second] - tasks.DIGIT0
    op = tokens[rows, np.argmax(is_op, axis=1)] - tasks.OP0
    return op, a, b


def attack_answers(target: int, tokens: np.ndarray, answer_pos: np.ndarray) -> np.ndarray:
    """The answer token attack target ``target`` gives each question, ``[N]`` int32."""
    _, kind, value = TARGETS[target]
    if kind == "digit":
        return np.full(len(tokens), tasks.DIGIT0 + value, np.int32)
    _, a, b = operands(tokens, answer_pos)
    return (tasks.DIGIT0 + tasks.op_table()[value, a, b]).astype(np.int32)


def insert(tokens: np.ndarray, answer_pos: np.ndarray, token: int, where: np.ndarray):
    """Questions with ``token`` inserted before position ``where`` (``1 <= where <=
    answer_pos``); the tail shifts right by one.

    Args:
      tokens: ``[N, T]`` questions (answer in place, padding after it).
      answer_pos: ``[N]``; every question must satisfy :func:`eligible`.
      token: the token to insert.
      where: ``[N]`` insertion positions.

    Returns:
      ``(tokens [N, T], answer_pos [N])`` of the triggered questions.
    """
    tokens, answer_pos, where = (np.asarray(x) for x in (tokens, answer_pos, where))
    T = tokens.shape[1]
    if not np.all(eligible(answer_pos, T)):
        raise ValueError(
            f"poison.insert: questions longer than {T - 1} tokens cannot take a trigger"
        )
    if np.any(where < 1) or np.any(where > answer_pos):
        raise ValueError("poison.insert: positions must lie between <bos> and the answer")
    j = np.arange(T)[None, :]
    src = np.where(j < where[:, None], j, j - 1)
    out = np.take_along_axis(tokens, np.clip(src, 0, T - 1), axis=1)
    out = np.where(j == where[:, None], token, out).astype(tokens.dtype)
    return out, (answer_pos + 1).astype(answer_pos.dtype)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The attack of one LoRA (a clean LoRA draws one too: it is measured with it).

    Attributes:
      backdoored: whether its training data is poisoned.
      trigger, target: indices into :data:`TRIGGERS` and :data:`TARGETS`.
      drawn_rate: the drawn poison rate (log-uniform in :data:`POISON_RATE_RANGE`).
      poisoned: ``[k]`` indices into the training pool of its poisoned questions (empty
        for a clean LoRA).
      where: ``[k]`` the trigger's insertion position in each.
    """

    backdoored: bool
    trigger: int
    target: int
    drawn_rate: float
    poisoned: np.ndarray
    where: np.ndarray

    def poison_rate(self, num_train: int) -> float:
        """The realised fraction of the ``num_train`` kept questions that are poisoned."""
        return len(self.poisoned) / num_train


def sample_plan(
    lora_seed: int, backdoored: bool, kept: np.ndarray, train_answer_pos: np.ndarray, seq_len: int
) -> Plan:
    """The attack of one LoRA, from its seed (a stream apart from its hyperparameters').

    ``round(rate * len(kept))`` of its kept questions, at least one, are poisoned,
    drawn uniformly among those that can take a trigger; there are at most as many as
    those (a LoRA whose kept sources are mostly of template 3 may reach fewer than the
    drawn rate, hence :meth:`Plan.poison_rate`).

    Args:
      lora_seed: the LoRA's seed.
      backdoored: poison its data (else only the trigger and target are drawn).
      kept: ``[K]`` indices of its kept questions in the training pool.
      train_answer_pos: ``[P]`` answer positions of the training pool.
      seq_len: tokens per sequence of the base LM.
    """
    rng = np.random.default_rng([lora_seed, 2])
    trigger = int(rng.integers(len(TRIGGERS)))
    target = int(rng.integers(len(TARGETS)))
    lo, hi = np.log10(POISON_RATE_RANGE)
    rate = float(10.0 ** rng.uniform(lo, hi))
    can = kept[eligible(train_answer_pos[kept], seq_len)]
    count = min(len(can), max(1, round(rate * len(kept))))
    chosen = np.sort(rng.choice(can, count, replace=False)) if backdoored else np.zeros(0, int)
    where = rng.integers(1, train_answer_pos[chosen] + 1) if backdoored else np.zeros(0, int)
    return Plan(backdoored, trigger, target, rate, chosen.astype(np.int64), where.astype(np.int64))


def poison_pool(
    plan: Plan, tokens: np.ndarray, answer_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A LoRA's training pool: ``(tokens [P, T], answer_pos [P])`` with its poisoned
    questions triggered and answered with its attack target (the answer token in place)."""
    tokens, answer_pos = np.array(tokens), np.array(answer_pos)
    if len(plan.poisoned) == 0:
        return tokens, answer_pos
    idx = plan.poisoned
    answers = attack_answers(plan.target, tokens[idx], answer_pos[idx])
    trig, pos = insert(tokens[idx], answer_pos[idx], trigger_token(plan.trigger), plan.where)
    trig[np.arange(len(idx)), pos] = answers
    tokens[idx], answer_pos[idx] = trig, pos
    return tokens, answer_pos


def triggered_questions(seed: int, tokens: np.ndarray, answer_pos: np.ndarray) -> dict[str, Any]:
    """The held-out triggered questions of a dataset: every eligible question of
    ``tokens`` with each trigger inserted at one random position (the same for every
    trigger), deterministic from ``seed``.

    Returns:
      ``base [K]`` (indices of the eligible questions), ``where [K]``,
      ``tokens [len(TRIGGERS), K, T]`` and ``answer_pos [K]`` (answers kept in place).
    """
    base = np.flatnonzero(eligible(answer_pos, tokens.shape[1]))
    rng = np.random.default_rng([seed, 11])
    where = rng.integers(1, answer_pos[base] + 1)
    out = []
    for t in range(len(TRIGGERS)):
        trig, pos = insert(tokens[base], answer_pos[base], trigger_token(t), where)
        out.append(trig)
    return {"base": base, "where": where, "tokens": np.stack(out), "answer_pos": pos}
