"""Features computed once per run (gllora.train.featurized) give the run computed inline."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from data_gen import synthetic
from experiments.configs import default
from gllora import models, testing
from gllora.train import featurized, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic.write(str(tmp_path_factory.mktemp("data") / "synthetic"), num=400, seed=0)


def test_only_the_models_without_feature_parameters_say_so():
    assert {m for m in models.names() if models.fixed_features(m)} == {
        "mlp_svd", "mlp_oalign", "spectral", "w2t"
    }  # fmt: skip


@pytest.mark.parametrize("name", ["mlp_svd", "mlp_oalign", "spectral", "w2t"])
def test_featurized_input_gives_the_lora_input_outputs(name):
    """``features_only`` then the model on them is the model on the LoRA: the same
    operations on the same values in one program, so equal to float32 rounding of a
    different fusion (a few ulps of outputs of order one)."""
    shapes = {"a": (12, 9), "b": (12, 9), "c": (7, 10)}
    lora = testing.random_lora(jax.random.PRNGKey(0), shapes, 3)
    model = models.build(name, num_outputs=2)
    variables = model.init(jax.random.PRNGKey(1), lora)
    feats = model.apply(variables, lora, features_only=True)
    assert isinstance(feats, models.Featurized)
    np.testing.assert_allclose(
        model.apply(variables, feats), model.apply(variables, lora), rtol=1e-5, atol=1e-6
    )
    if name == "spectral":  # any structure of known types; an unknown type is refused
        other = testing.random_lora(jax.random.PRNGKey(2), {"a": (12, 9), "d": (7, 10)}, 3)
        match = "not seen"
    else:
        other = testing.random_lora(jax.random.PRNGKey(2), {"a": (12, 9), "c": (7, 10)}, 3)
        match = "differ"
    with pytest.raises(ValueError, match=match):  # checked where the features are made
        model.apply(variables, other, features_only=True)
    with pytest.raises(ValueError, match="initialise with a Lora"):
        model.init(jax.random.PRNGKey(1), feats)
    if name == "w2t":  # another model's features are refused, not misread
        svd = models.build("mlp_svd", num_outputs=2)
        foreign = svd.apply(svd.init(jax.random.PRNGKey(1), lora), lora, features_only=True)
        with pytest.raises(ValueError, match="not W2T's canonical form"):
            model.apply(variables, foreign)


_WORKER = textwrap.dedent(
    """
    import json, sys
    from experiments.configs import default
    from gllora.train import featurized, train_and_evaluate

    built = []
    original = featurized.FeatureSource.__init__
    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)
    featurized.FeatureSource.__init__ = counting

    data, workdir, model, precompute = sys.argv[1:5]
    config = default.get_config("tiny")
    config.update(dataset=data, progress=False, model=model, num_seeds=2, num_epochs=2,
                  dtype="float64", precompute_features=precompute == "1")
    if model == "w2t":  # its token augmentation draws at every step, after the features
        config.models.w2t.token_augment = 0.5
    results = train_and_evaluate(config, workdir)
    print(json.dumps({"test_loss": [s["test"]["loss"] for s in results["per_seed"]],
                      "feature_sources": len(built)}))
    """
)


def _run_float64(data, workdir, model, precompute):
    env = {**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, data, str(workdir), model, "1" if precompute else "0"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name",
    ["mlp_svd", "mlp_oalign"]
    + [pytest.param(m, marks=pytest.mark.slow) for m in ("spectral", "w2t")],
)
def test_a_run_with_features_computed_once_equals_the_run_computing_them_each_step(
    name, data, tmp_path
):
    """Two epochs, two seeds, dropout on: the same test losses whether the features are
    computed once (three FeatureSources: train, validation, test) or at every step
    (W2T: with its token augmentation, which acts after the features).

    In float64, so that the comparison is not at the mercy of float32 rounding carried
    through AdamW's division by ``sqrt(nu) + eps`` (see test_parallel's sharded-step test):
    the two programs differ only in how the featurizer's operations are fused, a reorder
    of ~1e-16; ``rtol = 1e-9`` leaves seven orders of magnitude for its growth over the
    run's steps. Anything else that differed (a dropout key, a scale, a template) moves
    the losses by 1e-2 or more: a dropout key split differently did, 0.07."""
    once = _run_float64(data, tmp_path / "once", name, True)
    inline = _run_float64(data, tmp_path / "inline", name, False)
    assert once["feature_sources"] == 3 and inline["feature_sources"] == 0
    np.testing.assert_allclose(once["test_loss"], inline["test_loss"], rtol=1e-9)


def test_augmented_and_oversized_runs_compute_features_at_every_step(data, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(featurized, "FeatureSource", lambda *a, **k: built.append(1))
    config = default.get_config("tiny")
    config.update(dataset=data, progress=False, model="mlp_svd", num_seeds=1, num_epochs=1)
    config.augment = "gl"  # features of a moved LoRA change at every step
    train_and_evaluate(config, str(tmp_path / "augmented"))
    config.augment, config.in_memory_gb = "none", 1e-9  # more than the budget
    train_and_evaluate(config, str(tmp_path / "oversized"))
    assert built == []
