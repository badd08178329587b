"""Tests of the arithmetic-sources family (data_gen.arith: lm, tasks, sources).

Generation runs end to end on the ``tiny`` base LM (300 pretraining steps) at an
explicit small size, twice with one seed: the second run reads the base model from the
cache and must write the same folder bit for bit, without compiling the chunk functions
again.
"""

from __future__ import annotations

import filecmp
import os

import jax
import numpy as np
import pytest

from data_gen.arith import lm, sources, tasks
from gllora.io import dataset

NUM_LORAS = 20
CHUNK = 16  # two chunks, the last one padded


def test_statements_and_questions_are_right():
    table = tasks.op_table()
    toks, ans = jax.device_get(tasks.sample_statements(jax.random.key(0), 256, 8))
    assert set(ans.tolist()) == {5, 6, 7}  # pretraining uses every answer position
    for t, p in zip(toks, ans):
        a, op, b = t[p - 4] - tasks.DIGIT0, t[p - 3] - tasks.OP0, t[p - 2] - tasks.DIGIT0
        assert t[p - 1] == tasks.EQ and t[p] - tasks.DIGIT0 == table[op, a, b]
    # Every word appears in pretraining (a token never seen there makes the base emit junk).
    assert set(range(tasks.WORD0, tasks.VOCAB_SIZE)) <= set(toks.ravel().tolist())
    q = tasks.make_questions(0, 8)
    assert set(q["train_answer_pos"].tolist()) <= set(ans.tolist())
    assert set(q["challenge_answer_pos"].tolist()) <= set(ans.tolist())
    chosen = q["challenge_choices"][np.arange(len(q["challenge_label"])), q["challenge_label"]]
    for toks, pos, right in zip(q["challenge_tokens"], q["challenge_answer_pos"], chosen):
        assert toks[pos] == tasks.PAD
        digits = [t - tasks.DIGIT0 for t in toks if tasks.DIGIT0 <= t < tasks.OP0]
        op = next(t - tasks.OP0 for t in toks if tasks.OP0 <= t < tasks.EQ)
        assert right - tasks.DIGIT0 == table[op, digits[0], digits[1]]
    assert all(len(set(c)) == 4 for c in q["challenge_choices"].tolist())
    trained = {tasks.SOURCES[s] for s in range(len(tasks.SOURCES))}
    assert not trained & set(tasks.CHALLENGE_TYPES)  # challenge types never trained on


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown base config"):
        lm.base_config("huge")
    with pytest.raises(ValueError, match="operand pairs"):
        tasks.make_questions(0, 8, train_per_source=90)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    cache = str(root / "cache")
    kwargs = {"size": NUM_LORAS, "seed": 3, "cache_dir": cache, "chunk": CHUNK}
    kwargs["base_config"] = "tiny"
    first = sources.run(str(root / "a"), **kwargs)
    traces = sources.finetune_chunk._cache_size(), sources.evaluate_chunk._cache_size()
    second = sources.run(str(root / "b"), **kwargs)
    retraces = (
        sources.finetune_chunk._cache_size() - traces[0],
        sources.evaluate_chunk._cache_size() - traces[1],
    )
    return root, first, second, retraces


def test_schema_and_shapes(generated):
    root, first, _, _ = generated
    ds = dataset.open(root / "a")
    config = lm.base_config("tiny")
    assert ds.num_examples == NUM_LORAS
    assert [(n, *ds.spec.shapes()[n]) for n in ds.spec.order] == [
        ("lm.layers.0.attn.k_proj", 16, 32),
        ("lm.layers.0.attn.v_proj", 16, 32),
        ("lm.layers.1.attn.k_proj", 16, 32),
        ("lm.layers.1.attn.v_proj", 16, 32),
    ]
    assert lm.lora_modules(config) == [(n, *ds.spec.shapes()[n]) for n in ds.spec.order]
    factors = ds.factors(np.arange(NUM_LORAS))
    for u, v in factors.values():
        assert u.shape == (NUM_LORAS, 16, 4) and v.shape == (NUM_LORAS, 32, 4)
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(v))
        assert np.all(np.abs(u).max(axis=(1, 2)) > 0)  # u starts at zero: every LoRA trained
    task_of = {name: t["task"] for name, t in ds.targets.items()}
    assert task_of == {
        "membership": "multilabel",
        "val_loss": "regression",
        "challenge_acc": "regression",
        "learning_rate": "regression",
        "weight_decay": "regression",
        "epochs": "categorical",
        "batch_size": "categorical",
        "lora_dropout": "regression",
    }
    assert ds.targets["membership"]["columns"] == [f"source_{s:02d}" for s in range(1, 20)]
    assert ds.target_values("membership").shape == (NUM_LORAS, 19)
    assert "seed" in ds.labels and len(np.unique(ds.labels["seed"])) == NUM_LORAS
    base = ds.provenance["base_model"]
    assert {"val_loss", "challenge_acc", "metrics", "cache_key"} <= set(base)
    assert sorted(np.concatenate(list(ds.splits.values())).tolist()) == list(range(NUM_LORAS))
    assert first["base_from_cache"] is False


def test_finetuning_moved_every_loss_and_labels_vary(generated):
    root, _, _, _ = generated
    ds = dataset.open(root / "a")
    labels, base = ds.labels, ds.provenance["base_model"]
    assert np.all(np.abs(labels["val_loss"] - base["val_loss"]) > 1e-5)
    assert labels["val_loss"].mean() < base["val_loss"]
    for column, values in labels.items():
        assert len(np.unique(values)) > 1, f"label column {column!r} is constant"
    lr = labels["learning_rate"]
    assert np.all((lr >= 10**-3.5) & (lr <= 10**-1.5))
    assert set(labels["epochs"].tolist()) <= {2, 3, 4}
    assert set(labels["batch_size"].tolist()) <= {8, 16, 32}
    members = np.stack([labels[c] for c in ds.targets["membership"]["columns"]], axis=1)
    assert np.all((~members).sum(axis=1) >= 1)  # at least one source dropped, as in D.2
    assert np.array_equal(
        labels["num_train_questions"], 32 * (1 + members.sum(axis=1))
    )  # source 0 is always kept


def test_same_seed_same_dataset_one_compile(generated):
    root, _, second, retraces = generated
    assert second["base_from_cache"] is True
    assert retraces == (0, 0), "the chunk functions compiled again for the same shapes"
    a, b = root / "a", root / "b"
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert files and files == sorted(
        os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs
    )
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f"{f} differs between two runs"
