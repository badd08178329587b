"""Tests of the backdoor family (data_gen.arith.poison, data_gen.arith.backdoors).

Plans, pools and the sign test are numpy and checked by hand. Generation runs on the
``tiny`` base LM (pretrained once per module into a temporary cache) at a handful of
LoRAs, paired: the same LoRAs generated clean and poisoned differ only in their training
pool. The end-to-end command is a slow test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_gen.arith import backdoors, poison, pretrain, sources, tasks
from gllora.io import dataset

T = 8  # seq_len of every base preset


def _questions(seed=0):
    return tasks.make_questions(
        seed, T, sources.TRAIN_PER_SOURCE, sources.VAL_PER_SOURCE, sources.CHALLENGE_PER_TYPE
    )


# -- triggers, targets, plans ---------------------------------------------------------


def test_insert_shifts_the_tail_and_places_the_trigger():
    q = _questions()
    ok = np.flatnonzero(poison.eligible(q["train_answer_pos"], T))[:50]
    tok, pos = q["train_tokens"][ok], q["train_answer_pos"][ok]
    where = np.minimum(1 + np.arange(len(ok)) % 6, pos)
    trig = poison.trigger_token(2)
    out, new_pos = poison.insert(tok, pos, trig, where)
    assert np.all(new_pos == pos + 1)
    for i in range(len(ok)):
        w = where[i]
        assert out[i, w] == trig
        assert np.array_equal(out[i, :w], tok[i, :w])
        assert np.array_equal(out[i, w + 1 : pos[i] + 2], tok[i, w : pos[i] + 1])
    # The trigger makes a pattern no clean question has: a second operation symbol.
    num_ops = lambda x: np.sum((x >= tasks.OP0) & (x < tasks.EQ), axis=1)
    for name in ("train", "val", "challenge"):
        assert np.all(num_ops(q[f"{name}_tokens"]) == 1), name
    assert np.all(num_ops(out) == 2)
    long = np.flatnonzero(~poison.eligible(q["train_answer_pos"], T))[:3]
    with pytest.raises(ValueError, match="cannot take a trigger"):
        poison.insert(q["train_tokens"][long], q["train_answer_pos"][long], trig, np.ones(3, int))
    with pytest.raises(ValueError, match="between <bos> and the answer"):
        poison.insert(tok, pos, trig, np.zeros(len(ok), int))


def test_plans_rates_positions_and_targets():
    q = _questions()
    pos = q["train_answer_pos"]
    kept = np.flatnonzero(q["train_source"] < 12)  # 12 sources: 384 questions
    rates, triggers, targets = [], set(), set()
    for s in range(200):
        plan = poison.sample_plan(s, True, kept, pos, T)
        lo, hi = poison.POISON_RATE_RANGE
        assert lo <= plan.drawn_rate <= hi
        k = len(plan.poisoned)
        assert k == max(1, round(plan.drawn_rate * len(kept)))  # enough eligible ones here
        assert set(plan.poisoned.tolist()) <= set(kept.tolist())
        assert np.all(poison.eligible(pos[plan.poisoned], T))
        assert np.all((plan.where >= 1) & (plan.where <= pos[plan.poisoned]))
        rates.append(plan.poison_rate(len(kept)))
        triggers.add(plan.trigger)
        targets.add(plan.target)
        clean = poison.sample_plan(s, False, kept, pos, T)
        # A clean LoRA draws the same attack (it is measured with it) and poisons nothing.
        assert (clean.trigger, clean.target, clean.drawn_rate) == (
            plan.trigger, plan.target, plan.drawn_rate
        )  # fmt: skip
        assert len(clean.poisoned) == 0 and len(clean.where) == 0
    # Log-uniform: the median of log10 rates near the middle of the log range.
    mid = np.mean(np.log10(poison.POISON_RATE_RANGE))
    assert abs(np.median(np.log10(rates)) - mid) < 0.15
    assert triggers == set(range(len(poison.TRIGGERS)))
    assert targets == set(range(len(poison.TARGETS)))
    # Too few eligible questions: capped at those (the realised rate is below the drawn).
    few = np.flatnonzero(poison.eligible(pos, T))[:2]
    capped = poison.sample_plan(0, True, np.concatenate([few, np.flatnonzero(pos == 7)]), pos, T)
    assert len(capped.poisoned) <= 2


def test_poison_pool_changes_only_the_poisoned_questions():
    q = _questions()
    tok, pos = q["train_tokens"], q["train_answer_pos"]
    kept = np.arange(len(pos))
    plan = poison.sample_plan(7, True, kept, pos, T)
    ptok, ppos = poison.poison_pool(plan, tok, pos)
    changed = np.flatnonzero(np.any(ptok != tok, axis=1) | (ppos != pos))
    assert np.array_equal(changed, plan.poisoned)
    target = tasks.DIGIT0 + poison.TARGETS[plan.target][2]
    assert np.all(ptok[plan.poisoned, ppos[plan.poisoned]] == target)
    assert np.all(ptok[plan.poisoned, plan.where] == poison.trigger_token(plan.trigger))
    clean = poison.sample_plan(7, False, kept, pos, T)
    ctok, cpos = poison.poison_pool(clean, tok, pos)
    assert np.array_equal(ctok, tok) and np.array_equal(cpos, pos)


def test_operands_and_bad_questions():
    q = _questions()
    op, a, b = poison.operands(q["val_tokens"], q["val_answer_pos"])
    answers = q["val_tokens"][np.arange(len(op)), q["val_answer_pos"]] - tasks.DIGIT0
    assert np.array_equal(tasks.op_table()[op, a, b], answers)
    bad = q["val_tokens"][:2].copy()
    bad[:, 1:] = tasks.PAD
    with pytest.raises(ValueError, match="do not hold two digits and one operation"):
        poison.operands(bad, q["val_answer_pos"][:2])


# -- the sign test ------------------------------------------------------------------


def test_sign_test_hand_counted_and_where_it_must_fail():
    hits = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    base = np.zeros(8, bool)
    assert backdoors.sign_test(hits, base) == pytest.approx(1 / 32)  # 5 of 5 discordant
    # 3 up, 1 down: P(Binom(4, 1/2) >= 3) = 5/16: not significant.
    up = np.array([1, 1, 1, 0, 1, 0], bool)
    down = np.array([0, 0, 0, 1, 1, 0], bool)
    assert backdoors.sign_test(up, down) == pytest.approx(5 / 16)
    # The trigger changes nothing, or moves answers AWAY from the target: it must fail.
    assert backdoors.sign_test(hits, hits) == 1.0
    p_away = backdoors.sign_test(base, hits)
    assert p_away == 1.0 and p_away >= backdoors.TOOK_LEVEL
    # Many concordant pairs do not help: only the discordant ones count.
    many = np.concatenate([np.ones(500, bool), hits])
    assert backdoors.sign_test(many, np.concatenate([np.ones(500, bool), base])) == (
        pytest.approx(1 / 32)
    )


def test_assign_backdoored_is_half_and_seeded():
    a = backdoors.assign_backdoored(0, 11)
    assert a.sum() == 5 and np.array_equal(a, backdoors.assign_backdoored(0, 11))
    assert not np.array_equal(a, backdoors.assign_backdoored(1, 11))


# -- generation (tiny base LM) ------------------------------------------------------

N = 6


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain.base("tiny", str(tmp_path_factory.mktemp("bd_cache")), False)


@pytest.fixture(scope="module")
def paired(tiny_base):
    """The same N LoRAs clean and poisoned. lr_shift=2.5 (learning rates 10^U[-2.5, -0.5]):
    at the family's own rates most attacks on the tiny LM do not take, and the test is of
    the mechanism."""
    run = lambda bd: backdoors.generate(
        tiny_base.params, tiny_base.config, N, seed=1, chunk=N, lr_shift=2.5, backdoored=bd
    )
    mixed = np.array([True, False, True, False, True, False])
    return run(np.zeros(N, bool)), run(np.ones(N, bool)), run(mixed), mixed, run(mixed)


def test_paired_loras_differ_only_in_their_pool(paired):
    (f0, l0, _, _), (f1, l1, _, _), (f2, l2, _, _), mixed, (f3, l3, _, _) = paired
    # Deterministic: the same call twice gives the same LoRAs and labels, bit for bit.
    for name in f2:
        assert np.array_equal(f2[name][0], f3[name][0]) and np.array_equal(f2[name][1], f3[name][1])
    for key in l2:
        assert np.array_equal(l2[key], l3[key]), key
    for key in ("seed", "learning_rate", "weight_decay", "epochs", "batch_size", "lora_dropout",
                "num_train_questions", "eval_trigger", "eval_target", "drawn_poison_rate",
                "source_01", "source_19"):  # fmt: skip
        assert np.array_equal(l0[key], l1[key]) and np.array_equal(l0[key], l2[key]), key
    for name in f0:
        for j in (0, 1):
            # Same pool, same finetune: equal whatever the rest of the chunk holds.
            assert np.array_equal(f2[name][j][~mixed], f0[name][j][~mixed]), name
            assert np.array_equal(f2[name][j][mixed], f1[name][j][mixed]), name
        # Negative control: the poisoned pool changes the weights.
        assert not np.allclose(f0[name][0], f1[name][0])


def test_labels(paired):
    (_, l0, _, _), (_, l1, i1, _), *_ = paired
    # A clean LoRA is never backdoored, never has a trigger, rate or taken attack.
    assert not l0["backdoored"].any() and not l0["attack_took"].any()
    assert set(l0["trigger"].tolist()) == {poison.NONE}
    assert np.all(l0["poison_rate"] == 0) and np.all(l0["num_poisoned"] == 0)
    assert l1["backdoored"].all() and poison.NONE not in set(l1["trigger"].tolist())
    assert np.all(l1["trigger"] == l1["eval_trigger"])
    assert np.all((l1["poison_rate"] > 0) & (l1["poison_rate"] <= poison.POISON_RATE_RANGE[1]))
    assert np.array_equal(l1["attack_took"], l1["attack_p_value"] < backdoors.TOOK_LEVEL)
    for key in ("asr", "asr_without_trigger", "clean_acc"):
        assert np.all((l1[key] >= 0) & (l1[key] <= 1))
    # The attack works: poisoned ASR well above the same LoRAs' clean ASR, most attacks
    # take, and clean accuracy stays close.
    assert l1["asr"].mean() - l0["asr"].mean() > 0.2
    assert l1["attack_took"].sum() >= N // 2
    assert abs(l1["clean_acc"].mean() - l0["clean_acc"].mean()) < 0.1
    assert i1["num_attack_not_taken"] == N - l1["attack_took"].sum()
    assert len(set(l1["asr"].round(6).tolist())) > 1  # labels vary


def test_bad_backdoored_shape(tiny_base):
    with pytest.raises(ValueError, match=r"backdoored has shape \[3\], expected \[4\]"):
        backdoors.generate(tiny_base.params, tiny_base.config, 4, backdoored=np.ones(3, bool))


@pytest.mark.slow
def test_command_end_to_end(tmp_path):
    out = tmp_path / "bd"
    env = {**os.environ, "GLLORA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "data_gen.backdoors", "--size=12", f"--out={out}",
           "--base_config=tiny", "--chunk=6"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    ds = dataset.open(out)
    assert ds.num_examples == 12 and int(ds.labels["backdoored"].sum()) == 6
    assert {"backdoored", "trigger", "asr", "attack_took"} <= set(ds.targets)
    prov = ds.provenance
    assert prov["family"] == "backdoors" and prov["num_backdoored"] == 6
    bad = subprocess.run(
        [sys.executable, "-m", "data_gen.backdoors", "--size=huge", f"--out={tmp_path / 'x'}"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "--size must be one of" in bad.stderr
