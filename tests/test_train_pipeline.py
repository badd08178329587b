"""The training input pipeline: streamed batches (read ahead by gllora.io.dataset.prefetched)
train exactly as batches held on the device do."""

import json

import pytest

from data_gen import synthetic
from experiments.configs import default
from gllora.train import pipeline, train_and_evaluate


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory):
    return synthetic.write(str(tmp_path_factory.mktemp("data") / "synthetic"), num=400, seed=1)


def test_streamed_training_equals_in_memory(synthetic_small, tmp_path, monkeypatch):
    read_ahead = []

    def counted(fn, items, depth):
        read_ahead.append(depth)
        return prefetched(fn, items, depth)

    prefetched = pipeline.prefetched
    monkeypatch.setattr(pipeline, "prefetched", counted)

    def run(name, **overrides):
        read_ahead.clear()
        config = default.get_config("tiny")
        config.update(dataset=synthetic_small, progress=False, model="mlp", num_epochs=2)
        config.update(**overrides)
        train_and_evaluate(config, str(tmp_path / name))
        with open(tmp_path / name / "results.json") as f:
            return json.load(f)["per_seed"], len(read_ahead)

    in_memory, threads = run("in_memory")
    assert threads == 0  # the training split fits: gathered on the device, no thread
    # in_memory_gb=0: no split fits, every batch is read from the shards by the prefetch
    # thread. The same rows reach the same compiled step, so the results are equal, not close.
    streamed, threads = run("streamed", in_memory_gb=0.0)
    assert threads > 0
    assert streamed == in_memory
    # Negative control: another seed draws other batches and inits, and other results.
    other, _ = run("other_seed", in_memory_gb=0.0, seed=1)
    assert other != in_memory
