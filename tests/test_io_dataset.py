"""Tests of gllora.io.dataset: dataset folders written, read back, and damaged.

Exactness: factors are stored as float32 and read back bit for bit, so every delta
``u v^T`` of a read batch equals the delta of what was written exactly (padding adds
zero columns, and a zero column adds exact zeros to every product). Labels go through
a text table and come back bit for bit too (floats as their shortest round-trip text).

The bounded-memory test streams a dataset several times larger than a memory limit
(``RLIMIT_DATA``) in a child process; mapped file pages are page cache, not counted.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gllora import Lora
from gllora.io import dataset

# Two groups: two [12, 10] modules stacked, one [7, 9] module with an extra input.
MODULES = [("enc.q", 12, 10), ("dec.fc", 7, 9), ("enc.k", 12, 10)]
SHAPES = {name: (n, m) for name, n, m in MODULES}
TARGETS = {
    "quality": {"task": "regression", "columns": ["quality"]},
    "flags": {"task": "multilabel", "columns": ["bold", "faint"]},
    "lr": {"task": "categorical", "columns": ["lr"]},
    "good": {"task": "binary", "columns": ["good"]},
}


def _factors(rng, batch, ranks):
    """``{name: (u [B, n, r], v [B, m, r])}`` with ``ranks[name]`` columns."""
    return {
        name: (
            rng.standard_normal((batch, n, ranks[name]), dtype=np.float32),
            rng.standard_normal((batch, m, ranks[name]), dtype=np.float32),
        )
        for name, (n, m) in SHAPES.items()
    }


def _labels(rng, batch):
    return {
        "quality": rng.standard_normal(batch),
        "bold": rng.random(batch) < 0.5,
        "faint": rng.random(batch) < 0.5,
        "lr": rng.choice([1e-4, 3e-4, 1e-3], batch),
        "good": rng.integers(0, 2, batch),
        "name": np.asarray([f"lora {i}, \"q\"" for i in rng.integers(0, 1000, batch)]),
    }


def _write(path, rng, shard_bytes=6000, **kwargs):
    """Writes a mixed-rank dataset; returns the expected ``(factors, ranks, labels)``.

    ``factors[i][name]`` is ``(u, v)`` at the true rank, ``ranks[i][name]`` the rank.
    """
    writer = dataset.DatasetWriter(
        path,
        modules=MODULES,
        targets=TARGETS,
        extras={"magnitude": ["dec.fc"]},
        provenance={"test": True},
        shard_bytes=shard_bytes,
        **kwargs,
    )
    want_f, want_r, want_l = [], [], []

    def record(factors, labels, ranks, batch):
        for b in range(batch):
            want_r.append({name: int(ranks[name][b]) for name in SHAPES})
            want_f.append(
                {
                    name: (u[b, :, : want_r[-1][name]], v[b, :, : want_r[-1][name]])
                    for name, (u, v) in factors.items()
                }
            )
            want_l.append({c: x[b] for c, x in labels.items()})

    for ranks in (
        {"enc.q": 2, "enc.k": 2, "dec.fc": 1},
        {"enc.q": 4, "enc.k": 1, "dec.fc": 3},
        {"enc.q": 1, "enc.k": 1, "dec.fc": 1},
    ):
        batch = 4
        factors, labels = _factors(rng, batch, ranks), _labels(rng, batch)
        mag = {"magnitude": {"dec.fc": rng.standard_normal((batch, 7), dtype=np.float32)}}
        writer.add(factors, labels, extras=mag)
        record(factors, labels, {k: [r] * batch for k, r in ranks.items()}, batch)
    # A batch of mixed ranks given zero-padded to 3 columns, with its true ranks.
    batch = 5
    factors, labels = _factors(rng, batch, dict.fromkeys(SHAPES, 3)), _labels(rng, batch)
    true = {name: rng.integers(1, 4, batch) for name in SHAPES}
    for name, (u, v) in factors.items():
        cols = np.arange(3)[None, None, :] >= true[name][:, None, None]
        u[np.broadcast_to(cols, u.shape)] = 0
        v[np.broadcast_to(cols, v.shape)] = 0
    writer.add(factors, labels, extras=mag_of(rng, batch), ranks=true)
    record(factors, labels, true, batch)
    # One LoRA whose group [12, 10] mixes ranks 5 and 2.
    one = {"enc.q": 5, "enc.k": 2, "dec.fc": 2}
    f1 = {k: (u[0], v[0]) for k, (u, v) in _factors(rng, 1, one).items()}
    lora = Lora.from_factors(
        {name: f1[name] for name, _, _ in MODULES},
        extras={"magnitude": {"dec.fc": np.ones(7, np.float32)}},
    )
    l1 = {c: x[0] for c, x in _labels(rng, 1).items()}
    writer.add_lora(lora, l1)
    record(
        {k: (u[None], v[None]) for k, (u, v) in f1.items()},
        {c: [x] for c, x in l1.items()},
        {k: [r] for k, r in one.items()},
        1,
    )
    writer.close(split_seed=3)
    return want_f, want_r, want_l


def mag_of(rng, batch):
    return {"magnitude": {"dec.fc": rng.standard_normal((batch, 7), dtype=np.float32)}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "data"
    want = _write(path, np.random.default_rng(0))
    return str(path), want


@pytest.fixture
def copy(written, tmp_path):
    """A fresh copy of the written dataset, to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(written[0], dst)
    return dst


def test_round_trip_every_factor_and_delta(written):
    path, (want_f, want_r, _) = written
    ds = dataset.open(path)
    assert ds.num_examples == len(want_f) == 18
    assert ds.provenance == {"test": True}
    assert ds.spec.order == tuple(SHAPES)
    assert len(ds.schema["shards"]) > 3  # several rank signatures and shards
    for i in range(ds.num_examples):
        one = ds.get(i)
        for name in SHAPES:
            r = want_r[i][name]
            u, v = (np.asarray(x) for x in one.factors(name))
            wu, wv = want_f[i][name]
            assert int(one.rank_of(name)) == r
            np.testing.assert_array_equal(u[:, :r], wu)
            np.testing.assert_array_equal(v[:, :r], wv)
            assert not u[:, r:].any() and not v[:, r:].any()
            delta = u.astype(np.float64) @ v.T.astype(np.float64)
            np.testing.assert_array_equal(delta, wu.astype(np.float64) @ wv.T.astype(np.float64))
    # A whole batch in random order, through factors() too.
    order = np.random.default_rng(1).permutation(ds.num_examples)
    got = ds.factors(order)
    for b, i in enumerate(order):
        for name in SHAPES:
            r = want_r[i][name]
            np.testing.assert_array_equal(got[name][0][b, :, :r], want_f[i][name][0])
            np.testing.assert_array_equal(got[name][1][b, :, :r], want_f[i][name][1])


def test_shards_are_plain_safetensors(written):
    path, _ = written
    ds = dataset.open(path)
    total = 0
    for entry in ds.schema["shards"]:
        tensors = load_file(os.path.join(path, entry["file"]))
        total += len(tensors["ids"])
        assert tensors["g0.u"].dtype == np.float32 and tensors["g0.rank"].dtype == np.int32
    assert total == ds.num_examples


def test_mixed_ranks_padded_per_batch(written):
    path, (_, want_r, _) = written
    ds = dataset.open(path)
    groups = [g.names for g in ds.spec.groups]
    assert groups == [("enc.q", "enc.k"), ("dec.fc",)]
    assert ds.max_ranks() == [5, 3]
    for ids in ([8, 9, 10, 11], [0, 8], [4, 17, 2], list(range(18))):
        batch = ds.batch(ids)
        for gi, names in enumerate(groups):
            want = np.asarray([[want_r[i][n] for n in names] for i in ids])
            np.testing.assert_array_equal(batch.rank[gi], want)  # true ranks kept
            assert batch.u[gi].shape[-1] == want.max()  # padded to the batch's largest
    fixed = ds.batch([8, 9], ranks=ds.max_ranks())
    assert [u.shape[-1] for u in fixed.u] == [5, 3]
    np.testing.assert_array_equal(fixed.u[0][..., :1], ds.batch([8, 9]).u[0])
    assert not fixed.u[0][..., 1:].any()
    with pytest.raises(ValueError, match=r"example 4 has rank 4 .*requested 2"):
        ds.batch([8, 4], ranks=[2, 3])
    with pytest.raises(ValueError, match="2 module groups"):
        ds.batch([8], ranks=[5])


def test_layouts_are_equal(written):
    ds = dataset.open(written[0])
    ids = [17, 3, 3, 12, 0, 9, 16, 5]  # several shards, unordered, a repeat
    lead, major = ds.batch(ids), ds.batch(ids, layout="rank_major")
    for gi in range(2):
        np.testing.assert_array_equal(np.moveaxis(major.u[gi], 2, 0), lead.u[gi])
        np.testing.assert_array_equal(np.moveaxis(major.v[gi], 2, 0), lead.v[gi])
        np.testing.assert_array_equal(major.rank[gi].T, lead.rank[gi])
    np.testing.assert_array_equal(
        major.extras["magnitude"]["dec.fc"].T, lead.extras["magnitude"]["dec.fc"]
    )
    np.testing.assert_array_equal(lead.u[0][1], lead.u[0][2])
    with pytest.raises(ValueError, match="layout"):
        ds.batch(ids, layout="batch_last")


def test_iterate_prefetch_and_remainder(written):
    ds = dataset.open(written[0])
    order = np.random.default_rng(2).permutation(ds.num_examples)
    plain = list(ds.iterate(order, 5, layout="rank_major"))
    ahead = list(ds.iterate(order, 5, layout="rank_major", prefetch=2))
    assert [len(ids) for _, ids in plain] == [5, 5, 5, 3]
    for (a, ia), (b, ib) in zip(plain, ahead):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(a.u + a.v, b.u + b.v):
            np.testing.assert_array_equal(x, y)
    assert [len(ids) for _, ids in ds.iterate(order, 5, drop_remainder=True)] == [5, 5, 5]
    # An error in the prefetching thread reaches the consumer.
    with pytest.raises(ValueError, match="more than the requested"):
        list(ds.iterate(np.r_[4, order], 4, ranks=[1, 1], prefetch=2))
    # Leaving early stops the thread.
    for _ in ds.iterate(order, 2, prefetch=1):
        break


def test_labels_of_every_kind_round_trip_bit_for_bit(tmp_path):
    floats = np.asarray(
        [0.1, -0.0, 5e-324, 1.7976931348623157e308, 1 / 3, np.float32(0.1), -2.5e-17, 7.0]
    )
    f32 = np.asarray([0.1, -0.0, 1e-45, 3.4e38, 1 / 3, 2.0**-126, -2.5e-17, 7.0], np.float32)
    labels = {
        "f64": floats,
        "f32": f32,
        "i": np.asarray([0, -1, 2**62, -(2**63), 5, 6, 7, 8]),
        "b": np.asarray([True, False] * 4),
        "s": np.asarray(["", "a,b", 'say "hi"', "two\nlines", "ünï", " pad ", "0", "1.5"]),
    }
    labels["cat"] = np.asarray(["b", "a", "c", "a", "b", "b", "c", "a"])
    labels["bits"] = np.asarray([0, 1, 1, 0, 1, 0, 0, 1])
    writer = dataset.DatasetWriter(
        tmp_path / "d",
        modules=[("m", 3, 2)],
        targets={
            "cat": {"task": "categorical", "columns": ["cat"]},
            "multi": {"task": "multilabel", "columns": ["b", "bits"]},
            "reg": {"task": "regression", "columns": ["f64", "i"]},
        },
    )
    rng = np.random.default_rng(0)
    writer.add({"m": (rng.standard_normal((8, 3, 1)), rng.standard_normal((8, 2, 1)))}, labels)
    ds = dataset.open(writer.close())
    assert ds.columns == {
        "f64": "float",
        "f32": "float",
        "i": "int",
        "b": "bool",
        "s": "str",
        "cat": "str",
        "bits": "int",
    }
    np.testing.assert_array_equal(ds.labels["f64"].view(np.int64), floats.view(np.int64))
    np.testing.assert_array_equal(
        ds.labels["f32"].view(np.int64), f32.astype(np.float64).view(np.int64)
    )
    assert ds.labels["i"].dtype == np.int64 and ds.labels["i"].tolist() == labels["i"].tolist()
    assert ds.labels["b"].dtype == np.bool_ and ds.labels["b"].tolist() == labels["b"].tolist()
    assert ds.labels["s"].tolist() == labels["s"].tolist()
    assert ds.targets["cat"]["classes"] == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.target_values("cat")[:, 0], [1, 0, 2, 0, 1, 1, 2, 0])
    np.testing.assert_array_equal(
        ds.target_values("multi"), np.stack([labels["b"], labels["bits"]], 1).astype(float)
    )
    assert ds.target_values("reg").shape == (8, 2)
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        ds.target_values("nope")


def test_splits_are_deterministic_and_stored(tmp_path):
    def write(name, **close):
        writer = dataset.DatasetWriter(tmp_path / name, modules=[("m", 3, 2)])
        rng = np.random.default_rng(0)
        writer.add(
            {"m": (rng.standard_normal((50, 3, 1)), rng.standard_normal((50, 2, 1)))},
            {"y": np.arange(50.0)},
        )
        return dataset.open(writer.close(**close)).splits

    a, b, c = write("a", split_seed=7), write("b", split_seed=7), write("c", split_seed=8)
    assert a.keys() == {"train", "validation", "test"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["train"], c["train"])
    assert [len(a[k]) for k in ("train", "validation", "test")] == [40, 5, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(50))
    d = write("d", fractions=(0.5, 0.5, 0.0))
    assert [len(d[k]) for k in ("train", "validation", "test")] == [25, 25, 0]
    e = write("e", splits={"fit": [3, 1], "holdout": [0]})
    assert e.keys() == {"fit", "holdout"} and e["fit"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="overlap"):
        write("f", splits={"x": [1, 2], "y": [2]})
    with pytest.raises(ValueError, match="fractions"):
        write("g", fractions=(0.5, 0.6, 0.1))


# -- validation on write -----------------------------------------------------------------


def _writer(tmp_path, **kwargs):
    kwargs.setdefault("targets", TARGETS)
    return dataset.DatasetWriter(tmp_path / "w", modules=MODULES, **kwargs)


def _good(rng, batch=2, r=2):
    return _factors(rng, batch, dict.fromkeys(SHAPES, r)), _labels(rng, batch)


def _bad_names(f, l):
    f["enc.v"] = f.pop("enc.k")


def _bad_shape(f, l):
    f["dec.fc"] = (f["dec.fc"][0][:, :6], f["dec.fc"][1])


def _bad_rank_pair(f, l):
    f["enc.q"] = (f["enc.q"][0], f["enc.q"][1][:, :, :1])


def _bad_batch(f, l):
    f["enc.q"] = (f["enc.q"][0][:1], f["enc.q"][1][:1])


def _nan(f, l):
    f["enc.k"][1][1, 3, 0] = np.nan


def _inf_in_float32(f, l):
    f["enc.k"] = (f["enc.k"][0].astype(np.float64) * 1e300, f["enc.k"][1])


def _int_factors(f, l):
    f["enc.k"] = (f["enc.k"][0].astype(np.int32), f["enc.k"][1])


def _missing_label(f, l):
    del l["name"]


def _nan_label(f, l):
    l["quality"][0] = np.nan


def _id_label(f, l):
    l["id"] = np.arange(2)


def _object_label(f, l):
    l["name"] = np.asarray(["x", None], object)


def _not_01(f, l):
    l["good"] = np.asarray([0, 2])


@pytest.mark.parametrize(
    "damage, match",
    [
        (_bad_names, r"missing \['enc.k'\], unexpected \['enc.v'\]"),
        (_bad_shape, r"module 'dec.fc': expected u \[B, 7, r\] .* got u \[2, 6, 2\]"),
        (_bad_rank_pair, r"module 'enc.q'.*v \[2, 10, 1\]"),
        (_bad_batch, "module 'dec.fc' has batch 2, others 1"),
        (_nan, r"module 'enc.k': v \[2, 10, 2\] has NaN/Inf"),
        (_inf_in_float32, r"module 'enc.k': u .*NaN/Inf entries \(in float32\)"),
        (_int_factors, "module 'enc.k': u .* dtype int32"),
        (_missing_label, r"label columns changed: missing \['name'\]"),
        (_nan_label, "label 'quality' has NaN/Inf"),
        (_id_label, "'id' is reserved"),
        (_object_label, "label 'name': unsupported label values of dtype object"),
        (_not_01, r"binary target 'good': column 'good' has values other than 0/1: \[2\]"),
    ],
)
def test_write_rejects_and_stays_unchanged(tmp_path, damage, match):
    rng = np.random.default_rng(0)
    writer = _writer(tmp_path)
    writer.add(*_good(rng))  # the first batch fixes the label columns
    factors, labels = _good(rng)
    damage(factors, labels)
    with pytest.raises(ValueError, match=match) as err:
        writer.add(factors, labels)
    assert str(tmp_path / "w") in str(err.value)
    writer.add(*_good(rng))  # a rejected batch left nothing behind
    ds = dataset.open(writer.close())
    assert ds.num_examples == 4 and len(ds.labels["quality"]) == 4


def test_write_rejects_ranks_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    writer = _writer(tmp_path)
    factors, labels = _good(rng, r=3)
    ranks = dict.fromkeys(SHAPES, np.asarray([3, 2]))
    with pytest.raises(ValueError, match=r"module 'enc.q': example 1 .* rank 2 but non-zero"):
        writer.add(factors, labels, ranks=ranks)
    with pytest.raises(ValueError, match=r"ranks must be in \[1, 3\]"):
        writer.add(factors, labels, ranks={"enc.q": np.asarray([4, 1])})
    with pytest.raises(ValueError, match=r"ranks given for unknown modules \['x'\]"):
        writer.add(factors, labels, ranks={"x": np.asarray([1, 1])})


def test_write_rejects_label_kind_changes_and_targets(tmp_path):
    rng = np.random.default_rng(0)
    writer = _writer(tmp_path / "a")
    f, l = _good(rng)
    writer.add(f, l)
    f, l = _good(rng)
    l["name"] = np.asarray([1, 2])
    with pytest.raises(ValueError, match="label 'name' was str, now int"):
        writer.add(f, l)
    f, l = _good(rng)
    l["quality"] = np.asarray([1, 2])  # ints into a float column are fine
    writer.add(f, l)
    f, l = _good(rng)
    l["extra"] = np.ones(2)
    with pytest.raises(ValueError, match=r"new \['extra'\]"):
        writer.add(f, l)

    bare = _writer(tmp_path / "g", targets={})
    bare.add(_good(rng)[0], {})  # no labels at all: then never any
    with pytest.raises(ValueError, match=r"label columns changed: missing \[\], new \['y'\]"):
        bare.add(_good(rng)[0], {"y": np.ones(2)})

    unknown = {"t": {"task": "regression", "columns": ["nope"]}}
    with pytest.raises(ValueError, match="target 't' uses unknown column 'nope'"):
        _writer(tmp_path / "b", targets=unknown).add(*_good(rng))
    on_float = {"t": {"task": "binary", "columns": ["quality"]}}
    with pytest.raises(ValueError, match="binary target 't': column 'quality' is float"):
        _writer(tmp_path / "c", targets=on_float).add(*_good(rng))
    on_str = {"t": {"task": "regression", "columns": ["name"]}}
    with pytest.raises(ValueError, match="regression target 't': column 'name' is str"):
        _writer(tmp_path / "d", targets=on_str).add(*_good(rng))
    with pytest.raises(ValueError, match="task 'ranking'"):
        _writer(tmp_path / "e", targets={"t": {"task": "ranking", "columns": ["q"]}})
    with pytest.raises(ValueError, match="exactly one column"):
        _writer(tmp_path / "f", targets={"t": {"task": "binary", "columns": ["a", "b"]}})


def test_writer_folder_rules(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        dataset.DatasetWriter(tmp_path / "other", modules=MODULES)
    with pytest.raises(ValueError, match="replaces only a dataset folder"):
        dataset.DatasetWriter(tmp_path / "other", modules=MODULES, overwrite=True)
    with pytest.raises(ValueError, match="JSON-serializable"):
        dataset.DatasetWriter(tmp_path / "p", modules=MODULES, provenance={"x": object()})
    with pytest.raises(ValueError, match="unique"):
        dataset.DatasetWriter(tmp_path / "p", modules=[("a", 2, 2), ("a", 3, 3)])
    # A trailing separator: the partial folder must sit beside, not inside.
    path = str(tmp_path / "ds") + os.sep
    with dataset.DatasetWriter(path, modules=MODULES, targets=TARGETS) as writer:
        f, l = _good(rng)
        writer.add(f, l)
    assert sorted(os.listdir(tmp_path / "ds")) == [
        "labels.csv",
        "schema.json",
        "shards",
        "splits.json",
    ]
    # overwrite replaces a dataset folder
    with dataset.DatasetWriter(path, modules=MODULES, overwrite=True) as writer:
        writer.add(*_good(rng, batch=3))
    assert dataset.open(path).num_examples == 3
    # An exception inside `with` leaves no partial folder and the old dataset intact.
    with (
        pytest.raises(RuntimeError),
        dataset.DatasetWriter(path, modules=MODULES, overwrite=True) as writer,
    ):
        writer.add(*_good(rng, batch=5))
        raise RuntimeError("boom")
    assert not os.path.exists(str(tmp_path / "ds") + ".partial")
    assert dataset.open(path).num_examples == 3
    with pytest.raises(ValueError, match="no examples"):
        dataset.DatasetWriter(tmp_path / "empty", modules=MODULES).close()


# -- validation on read ------------------------------------------------------------------


def _shard(path, i=0):
    schema = json.loads((path / "schema.json").read_text())
    return path / schema["shards"][i]["file"], schema


def test_read_truncated_shard(copy):
    file, _ = _shard(copy, 1)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{file}: .*truncated"):
        dataset.open(copy)


def test_read_shard_shapes_disagree_with_schema(copy):
    file, schema = _shard(copy, 0)
    tensors = load_file(str(file))
    tensors["g1.v"] = tensors["g1.v"][:, :, :8]  # [N, 1, 9, r] -> [N, 1, 8, r]
    save_file(tensors, str(file))
    schema["shards"][0]["bytes"] = file.stat().st_size
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(
        ValueError,
        match=rf"{file}: tensor 'g1.v' is F32 \[\d+, 1, 8, \d\], "
        r"the schema says F32 \[\d+, 1, 9, \d\] for modules",
    ):
        dataset.open(copy)


def test_read_shard_changed_size(copy):
    file, _ = _shard(copy, 0)
    with open(file, "ab") as f:
        f.write(b"junk")
    with pytest.raises(ValueError, match=f"{file}: .*the schema says"):
        dataset.open(copy)


def test_read_shard_with_wrong_tensor_names(copy):
    file, schema = _shard(copy, 0)
    tensors = load_file(str(file))
    tensors["g0.w"] = tensors.pop("g0.u")
    save_file(tensors, str(file))
    schema["shards"][0]["bytes"] = file.stat().st_size
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ValueError, match=rf"{file}: tensors differ .*\['g0.w'\].*\['g0.u'\]"):
        dataset.open(copy)


def test_read_shard_with_bad_ranks(copy):
    file, _ = _shard(copy, 0)
    tensors = load_file(str(file))
    tensors["g0.rank"] = tensors["g0.rank"] + 7
    save_file(tensors, str(file))
    ds = dataset.open(copy)  # the rank tensor is read with its rows
    ids = load_file(str(file))["ids"]
    with pytest.raises(ValueError, match=f"{file}: tensor 'g0.rank' holds ranks"):
        ds.batch(ids[:1])


def _edit_labels(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def _set_cell(column, row, text):
    def edit(rows):
        rows[row + 1][rows[0].index(column)] = text
        return rows

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda rows: rows[:5] + rows[6:], r"labels.csv:6: expected id 4 and 7 cells"),
        (lambda rows: rows[:-1], r"labels.csv: 17 rows, the schema says 18"),
        (lambda rows: rows[:3] + [rows[3][:-1]] + rows[4:], r"labels.csv:4: expected id 2"),
        (_set_cell("quality", 2, "abc"), r"labels.csv:4: column 'quality' \(float\): could not"),
        (_set_cell("quality", 2, "nan"), r"labels.csv:4: column 'quality' \(float\): 'nan' is not"),
        (_set_cell("bold", 1, "yes"), r"labels.csv:3: column 'bold' \(bool\): expected 0 or 1"),
        (_set_cell("good", 1, "2"), r"labels.csv: binary target 'good': column 'good' is not 0/1"),
        (_set_cell("lr", 0, "0.5"), r"labels.csv: categorical target 'lr': values \[0.5\]"),
        (lambda rows: [["id", "qualty", *rows[0][2:]], *rows[1:]], r"labels.csv: header"),
    ],
)
def test_read_bad_labels(copy, edit, match):
    path = copy / "labels.csv"
    _edit_labels(path, edit)
    with pytest.raises(ValueError, match=match) as err:
        dataset.open(copy)
    assert str(path) in str(err.value)


def test_read_splits_naming_unknown_ids(copy):
    (copy / "splits.json").write_text(json.dumps({"train": [0, 1, 18, 99], "test": [2]}))
    with pytest.raises(
        ValueError, match=r"splits.json: split 'train' names ids outside \[0, 18\): \[18, 99\]"
    ):
        dataset.open(copy)
    (copy / "splits.json").write_text(json.dumps({"train": [0, 1], "test": [1]}))
    with pytest.raises(ValueError, match="splits.json: splits overlap"):
        dataset.open(copy)
    (copy / "splits.json").write_text('{"train": [0, "1"]}')
    with pytest.raises(ValueError, match="splits.json: split 'train' must be a list of integer"):
        dataset.open(copy)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "gllora.dataset", ', "schema.json: not valid JSON"),
        ("[1, 2]", "schema.json: the schema must be a JSON object"),
        ('{"format": "other"}', "schema.json: format 'other'"),
        ('{"format": "gllora.dataset", "version": 99}', "schema.json: version 99"),
    ],
)
def test_read_bad_schema(copy, text, match):
    (copy / "schema.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        dataset.open(copy)


def test_read_schema_inconsistent(copy):
    schema = json.loads((copy / "schema.json").read_text())
    schema["num_examples"] = 19
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ValueError, match="schema.json: the shards hold 18 examples"):
        dataset.open(copy)
    schema["num_examples"] = 18
    schema["modules"][0]["n"] = 13
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ValueError, match=r"schema.json: the schema's modules and groups disagree"):
        dataset.open(copy)
    schema["modules"][0]["n"] = 12
    schema["targets"]["quality"]["columns"] = ["missing"]
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ValueError, match="schema.json: target 'quality' uses unknown column"):
        dataset.open(copy)


@pytest.mark.parametrize("name", ["schema.json", "labels.csv", "splits.json", "shard"])
def test_read_missing_file(copy, name):
    file = _shard(copy, 2)[0] if name == "shard" else copy / name
    os.remove(file)
    with pytest.raises(FileNotFoundError, match=str(file)):
        dataset.open(copy)


def test_read_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        dataset.open(tmp_path / "nothing")


def test_batch_rejects_bad_indices(written):
    ds = dataset.open(written[0])
    for bad in ([], [18], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError, match="indices"):
            ds.batch(bad)


# -- bounded memory ----------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from gllora.io import dataset

    path, limit = sys.argv[1], int(sys.argv[2])
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    # Everything imported: from here on the process may allocate `limit` more. RLIMIT_DATA
    # counts private writable memory (malloc, numpy), not read-only maps of files (Linux
    # >= 4.7); RLIMIT_AS would also count JAX's address-space reservations and the maps.
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + limit, resource.RLIM_INFINITY))
    ds = dataset.open(path)
    out = {}
    for layout in ("leading", "rank_major"):
        sums = np.zeros((ds.num_examples, 2))
        for batch, ids in ds.iterate(np.arange(ds.num_examples), 16, layout=layout):
            u = batch.u[0] if layout == "leading" else np.moveaxis(batch.u[0], 2, 0)
            flat = u.reshape(len(ids), -1)
            sums[ids, 0] = flat.sum(axis=1, dtype=np.float64)
            sums[ids, 1] = flat @ np.linspace(-1, 1, flat.shape[1])
        out[layout] = sums.tolist()
    out["grown"] = vm_data() - base
    try:  # the limit is real: reading one shard whole does not fit
        np.fromfile(ds._headers[0].path, np.uint8)
        out["whole_shard"] = "read"
    except MemoryError:
        out["whole_shard"] = "MemoryError"
    try:
        np.ones(limit + (16 << 20), np.uint8)
        out["alloc"] = "allocated"
    except MemoryError:
        out["alloc"] = "MemoryError"
    print(json.dumps(out))
    """
)


def test_streams_a_dataset_larger_than_the_memory_limit(tmp_path):
    limit = 64 << 20  # the shards are 2.5 times larger, the dataset 5 times
    k, n, m, r, num, chunk = 8, 512, 512, 16, 640, 64  # 512 KiB per LoRA, 320 MiB in all
    path = tmp_path / "big"
    writer = dataset.DatasetWriter(
        path, modules=[(f"m{i}", n, m) for i in range(k)], shard_bytes=160 << 20
    )
    rng = np.random.default_rng(0)
    weights = np.linspace(-1, 1, k * n * r)
    want = np.zeros((num, 2))
    for s in range(0, num, chunk):
        factors = {
            f"m{i}": (
                rng.random((chunk, n, r), dtype=np.float32),
                rng.random((chunk, m, r), dtype=np.float32),
            )
            for i in range(k)
        }
        writer.add(factors, {"y": np.arange(s, s + chunk, dtype=float)})
        u = np.stack([factors[f"m{i}"][0] for i in range(k)], axis=1).reshape(chunk, -1)
        want[s : s + chunk, 0] = u.sum(axis=1, dtype=np.float64)
        want[s : s + chunk, 1] = u @ weights
    writer.close()
    shard_sizes = [os.path.getsize(f) for f in (path / "shards").iterdir()]
    assert len(shard_sizes) == 2 and min(shard_sizes) > 2 * limit
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["alloc"] == "MemoryError"  # the limit is enforced ...
    assert got["whole_shard"] == "MemoryError"  # ... and a shard alone exceeds it
    assert got["grown"] < limit
    for layout in ("leading", "rank_major"):
        np.testing.assert_allclose(np.asarray(got[layout]), want, rtol=1e-9)


def test_add_lora_and_extras_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    writer = _writer(tmp_path, targets={}, extras={"magnitude": ["dec.fc"]})
    f, l = _good(rng)
    writer.add(f, l, extras=mag_of(rng, 2))
    with pytest.raises(ValueError, match=r"extra 'magnitude' must be a finite \[B=2, 7\]"):
        writer.add(f, l, extras={"magnitude": {"dec.fc": np.ones((2, 6))}})
    with pytest.raises(ValueError, match="differ from the declared"):
        writer.add(f, l)
    other = Lora.from_factors(
        {"enc.q": (np.ones((12, 2), np.float32), np.ones((10, 2), np.float32))}
    )
    with pytest.raises(ValueError, match="LoRA differs from the schema: module 'dec.fc'"):
        writer.add_lora(other, {})
    with dataset.open(writer.close()) as ds:
        assert len(ds) == 2 and ds.batch([1]).extras["magnitude"]["dec.fc"].shape == (1, 7)
        assert ds._mapped
    assert not ds._mapped  # unmapped on leaving the block; still readable
    assert ds.get(0).u[0].shape == (2, 12, 2)
    again = pickle.loads(pickle.dumps(ds))  # for worker processes
    np.testing.assert_array_equal(again.batch([0, 1]).v[1], ds.batch([0, 1]).v[1])
