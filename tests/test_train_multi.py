"""Datasets of several structures: the folder, per-structure batches, training any-structure
models on a mix with a held-out structure, and the errors for single-structure models."""

import json
import os

import numpy as np
import pytest

from data_gen import synthetic
from experiments.configs import default
from gllora.io import dataset
from gllora.io.dataset import multi as multi_lib
from gllora.train import multi, train_and_evaluate

SHALLOW = (("m.layers.0.q", 8, 12), ("m.layers.0.v", 8, 12), ("m.head", 6, 8))
DEEP = SHALLOW[:2] + (("m.layers.1.q", 8, 12), ("m.layers.1.v", 8, 12), ("m.head", 6, 8))
DEEPER = DEEP[:4] + (("m.layers.2.q", 8, 12), ("m.layers.2.v", 8, 12), ("m.head", 6, 8))


def _write(path, modules, num, seed, splits=None):
    factors, labels = synthetic.generate(num, seed, 4, modules)
    # Targets whose columns or classes depend on the modules are left out.
    drop = ("active", "largest", "num_active")
    labels = {k: v for k, v in labels.items() if not k.startswith(drop)}
    targets = {k: v for k, v in synthetic.targets(modules).items() if k not in drop}
    writer = dataset.DatasetWriter(path, modules=modules, targets=targets)
    writer.add(factors, labels)
    return writer.close(splits=splits, split_seed=seed)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    parts = {
        "shallow": _write(str(root / "a"), SHALLOW, 900, 0),
        "deep": _write(str(root / "b"), DEEP, 700, 1),
        # Held out: every example in the test split.
        "deeper": _write(str(root / "c"), DEEPER, 200, 2, splits={"test": list(range(200))}),
    }
    return multi_lib.combine(str(root / "mix"), parts, provenance={"test": True})


def test_multi_folder_concatenates_labels_and_splits(mix):
    ds = multi_lib.MultiDataset(mix)
    assert ds.names() == ["shallow", "deep", "deeper"]
    assert ds.num_examples == 1800 and list(ds.offsets) == [0, 900, 1600, 1800]
    sub = ds.structures[1][1]
    np.testing.assert_array_equal(ds.labels["log_norm"][900:1600], sub.labels["log_norm"])
    assert set(ds.splits["test"]) >= set(range(1600, 1800))
    assert not set(ds.splits["train"]) & set(range(1600, 1800))
    np.testing.assert_array_equal(
        np.sort(ds.splits["validation"][ds.structure_of(ds.splits["validation"]) == 1]) - 900,
        np.sort(sub.splits["validation"]),
    )
    with pytest.raises(ValueError, match="several structures"):
        dataset.open(mix)
    with pytest.raises(ValueError, match="outside structure 'shallow'"):
        ds.local_ids(np.asarray([899, 900]), 0)


def test_every_step_holds_one_structure_and_epochs_are_reproducible(mix):
    ds = multi_lib.MultiDataset(mix)
    train = np.sort(ds.splits["train"])
    per_epoch = multi.steps_per_epoch(ds, train, 32)
    got = list(multi.step_batches([0, 1], ds, train, 32, 0, 2 * per_epoch))
    assert {s for s, _ in got} == {0, 1}  # the held-out structure never trains
    for s, ids in got:
        assert ids.shape == (2, 32) and (ds.structure_of(ids) == s).all()
    epoch0 = np.concatenate([ids[0] for _, ids in got[:per_epoch]])
    assert len(np.unique(epoch0)) == len(epoch0)  # no example twice in an epoch
    resumed = list(multi.step_batches([0, 1], ds, train, 32, per_epoch + 3, 2 * per_epoch))
    for (s, a), (t, b) in zip(got[per_epoch + 3 :], resumed):
        assert s == t and (a == b).all()


def _config(path, model, **overrides):
    config = default.get_config("tiny")
    config.dataset = path
    config.model = model
    config.progress = False
    config.num_epochs = 4
    config.targets = ("log_norm",)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("model", ["glnet_seq", "spectral"])
def test_any_structure_model_trains_on_a_mix_and_scores_each_structure(mix, model, tmp_path):
    # A linear model moves slowly at 1e-3 in the few steps of a test.
    config = _config(mix, model, learning_rate=1e-2 if model == "spectral" else 1e-3)
    if model == "glnet_seq":
        config.models.glnet_seq.hidden = 32
        config.models.glnet_seq.width = 4
    results = train_and_evaluate(config, str(tmp_path))
    per = results["summary_per_structure"]["test"]
    assert set(per) == {"shallow", "deep", "deeper"}
    r2 = {name: per[name]["log_norm"]["r2"]["mean"] for name in per}
    print(model, r2)
    # Beats the training mean on the structures it trained on (the held-out one is
    # reported, not asserted: a total over more modules than any training LoRA had is an
    # extrapolation; measured -1.1 for glnet_seq here).
    assert r2["shallow"] > 0.2 and r2["deep"] > 0.2, r2
    with open(tmp_path / "targets.json") as f:
        assert [s["name"] for s in json.load(f)["structures"]] == ["shallow", "deep", "deeper"]


def test_single_structure_models_refuse_a_mix_and_train_on_one_structure(mix, tmp_path):
    with pytest.raises(ValueError, match=r"model 'glnet' takes one structure.*glnet_seq"):
        train_and_evaluate(_config(mix, "glnet"), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    sub = os.path.join(mix, "structures", "deep")
    config = _config(sub, "w2t", num_epochs=1)
    config.models.w2t.hidden = 16
    assert train_and_evaluate(config, str(tmp_path / "y"))["num_seeds"] == 1
