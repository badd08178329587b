"""The training engine end to end: tiny runs, resume after SIGKILL, seeds, predict, bad configs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_gen import synthetic
from experiments.configs import default
from gllora import Predictor, io, models
from gllora.io import dataset
from gllora.train import evaluation, train_and_evaluate
from gllora.train.predictor import predict_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "real_loras")


@pytest.fixture(scope="module")
def synthetic_3k(tmp_path_factory):
    return synthetic.write(str(tmp_path_factory.mktemp("data") / "synthetic"), num=3000, seed=0)


def tiny(dataset_path, **overrides):
    config = default.get_config("tiny")
    config.dataset = dataset_path
    config.progress = False
    for key, value in overrides.items():
        config[key] = value
    return config


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def constant_mse(ds_path, target):
    """Test MSE (standardised units) of predicting the training mean."""
    ds = dataset.open(ds_path)
    y = ds.labels[target]
    mu, sd = y[ds.splits["train"]].mean(), y[ds.splits["train"]].std()
    return float(np.mean(((y[ds.splits["test"]] - mu) / sd) ** 2))


@pytest.mark.parametrize(
    "model",
    # W2T's training compiles for about two minutes on 2 busy cores: the slow step has it.
    [pytest.param(m, marks=pytest.mark.slow) if m == "w2t" else m for m in models.names()],
)
def test_tiny_preset_trains_every_model_and_beats_a_constant(model, synthetic_3k, tmp_path):
    results = train_and_evaluate(tiny(synthetic_3k, model=model), str(tmp_path))
    test = results["summary"]["test"]
    ratios = {
        t: test[t]["mse"]["mean"] / constant_mse(synthetic_3k, t) for t in ("log_norm", "alignment")
    }
    # Each model learns at least one of the two targets: the scale-type one (log_norm) or
    # the direction-type one (alignment); see data_gen/synthetic.py.
    assert min(ratios.values()) < 0.9, ratios
    for name in ("config.json", "targets.json", "metrics.jsonl", "results.json"):
        assert os.path.exists(tmp_path / name)
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert {line["split"] for line in lines} == {"train", "validation"}
    assert lines[-1]["epoch"] == 6


def _train_cmd(dataset_path, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/default.py:tiny",
        f"--config.dataset={dataset_path}",
        f"--workdir={workdir}",
        "--config.model=mlp_svd",
        "--config.progress=false",
        "--config.num_epochs=20",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_results(synthetic_3k, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(synthetic_3k, full), cwd=ROOT, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(synthetic_3k, killed),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    subprocess.run(_train_cmd(synthetic_3k, killed), cwd=ROOT, check=True, capture_output=True)
    a = read_json(full / "results.json")
    b = read_json(killed / "results.json")
    assert a["per_seed"] == b["per_seed"]
    # The metrics log has each step once.
    steps = [(d["split"], d["step"]) for d in read_jsonl(killed / "metrics.jsonl")]
    assert len(steps) == len(set(steps))


def test_seeds_train_together_as_they_would_apart(synthetic_3k, tmp_path):
    """Two seeds vmapped in one program end where each would alone.

    The programs differ (batched over seeds or not), so XLA may order sums differently:
    in float32 that difference, amplified by Adam's division by ``sqrt(nu) + 1e-8``
    where a gradient is near zero, depends on the machine. In float64 (a subprocess with
    JAX_ENABLE_X64) it starts at ~1e-16, and ``rtol = 1e-9`` leaves seven orders of
    magnitude for two epochs to amplify it, far below what a seed mixing up another
    seed's batch, key or template would change.
    """
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "seeds", synthetic_3k, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": ROOT},
        check=True,
        capture_output=True,
        timeout=600,
    )
    together = read_json(tmp_path / "together" / "results.json")
    for i, seed in enumerate((0, 1)):
        alone = read_json(tmp_path / f"seed{seed}" / "results.json")
        a, b = together["per_seed"][i], alone["per_seed"][0]
        assert a["seed"] == b["seed"] == seed and a["best_epoch"] == b["best_epoch"]
        for split in ("train", "validation", "test"):
            for target in ("log_norm", "alignment"):
                np.testing.assert_allclose(
                    a[split][target]["mse"], b[split][target]["mse"], rtol=1e-9
                )
    summary = together["summary"]["test"]["log_norm"]["mse"]
    per_seed = [s["test"]["log_norm"]["mse"] for s in together["per_seed"]]
    np.testing.assert_allclose(summary["mean"], np.mean(per_seed), rtol=1e-9)
    np.testing.assert_allclose(summary["std"], np.std(per_seed), rtol=1e-9)


def _worker_seeds(data: str, out: str) -> None:
    import jax

    assert jax.config.jax_enable_x64
    config = tiny(data, model="mlp_svd", num_epochs=2, num_seeds=2, dtype="float64")
    train_and_evaluate(config, os.path.join(out, "together"))
    for seed in (0, 1):
        config = tiny(data, model="mlp_svd", num_epochs=2, seed=seed, dtype="float64")
        train_and_evaluate(config, os.path.join(out, f"seed{seed}"))


@pytest.fixture(scope="module")
def fixture_shaped_run(tmp_path_factory):
    """A tiny model trained on random LoRAs shaped like the PEFT rank-4 k/v fixture."""
    lora = io.load_adapter(os.path.join(FIXTURES, "peft_llm", "lora_r4_kv"))
    rng = np.random.default_rng(0)
    modules = [(name, *lora.shapes[name]) for name in lora.names]
    factors = {
        name: (
            rng.normal(size=(200, n, 4)).astype(np.float32),
            rng.normal(size=(200, m, 4)).astype(np.float32),
        )
        for name, n, m in modules
    }
    score = sum(np.abs(u).mean((1, 2)) for u, _ in factors.values())
    root = tmp_path_factory.mktemp("fixture_run")
    writer = dataset.DatasetWriter(
        str(root / "data"),
        modules=modules,
        targets={"score": {"task": "regression", "columns": ["score"]}},
    )
    writer.add(factors, {"score": score})
    writer.close()
    config = tiny(str(root / "data"), model="glnet", num_epochs=1, targets=("score",))
    train_and_evaluate(config, str(root / "run"))
    return str(root / "run"), lora


def test_predictor_and_evaluate_reproduce_the_run(fixture_shaped_run):
    workdir, lora = fixture_shaped_run
    predictor = Predictor.from_workdir(workdir)
    one = predictor(lora)
    assert set(one) == {"score"} and np.shape(one["score"]) == ()
    ds = dataset.open(read_json(os.path.join(workdir, "targets.json"))["dataset"])
    batch = predictor(ds.batch([0, 1, 2]))
    np.testing.assert_allclose(batch["score"][1], predictor(ds.get(1))["score"], rtol=1e-5)
    results = read_json(os.path.join(workdir, "results.json"))
    again = evaluation.evaluate_workdir(workdir, "test")
    np.testing.assert_allclose(
        again["per_seed"][0]["score"]["mse"],
        results["per_seed"][0]["test"]["score"]["mse"],
        rtol=1e-5,
    )


def test_predict_on_a_folder_of_real_adapter_files(fixture_shaped_run, tmp_path):
    workdir, _ = fixture_shaped_run
    predictor = Predictor.from_workdir(workdir)
    rows, failures = predict_inputs(predictor, FIXTURES)
    assert [r["path"] for r in rows] == ["peft_llm/lora_r4_kv"]
    failed = dict(failures)
    assert "peft_llm/dora" in failed and "differ" in failed["peft_llm/dora"]
    assert "diffusers_sd/ground_truth.safetensors" in failed
    assert len(rows) + len(failures) == len(io.importer.find_adapters(FIXTURES))
    out = tmp_path / "predictions.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.predict",
            f"--workdir={workdir}",
            f"--inputs={FIXTURES}",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1  # some inputs could not be predicted
    assert "peft_llm/dora" in proc.stderr
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == ["peft_llm/lora_r4_kv"] and float(
        table[0]["score"]
    ) == pytest.approx(float(rows[0]["score"]), rel=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(model="gl_net"), "unknown model 'gl_net'"),
        (dict(targets=("quality",)), "unknown target 'quality'"),
        (dict(targets=("regression:nope",)), "unknown label column 'nope'"),
        (dict(targets=("binary:alignment",)), "0/1 or bool column"),
        (dict(targets=("ordinal:alignment",)), "unknown task 'ordinal'"),
        (dict(augment="so"), "config.augment"),
    ],
)
def test_bad_configs_fail_before_training(overrides, match, synthetic_3k, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(tiny(synthetic_3k, **overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_config_is_locked_against_typos():
    config = default.get_config("tiny")
    with pytest.raises(AttributeError):
        config.learning_rat = 1.0
    with pytest.raises(AttributeError):
        config.models.glnet.equiv_widht = 3


def test_nan_guard_stops_with_a_clear_message(synthetic_3k, tmp_path):
    config = tiny(synthetic_3k, model="mlp_svd", learning_rate=1e30, num_epochs=1)
    with pytest.raises(FloatingPointError, match="NaN/Inf at step .*learning_rate"):
        train_and_evaluate(config, str(tmp_path))


def test_resuming_with_another_config_is_refused(synthetic_3k, tmp_path):
    train_and_evaluate(tiny(synthetic_3k, model="mlp_svd", num_epochs=1), str(tmp_path))
    with pytest.raises(ValueError, match="another config.*learning_rate"):
        train_and_evaluate(
            tiny(synthetic_3k, model="mlp_svd", num_epochs=1, learning_rate=0.5), str(tmp_path)
        )


def test_progress_bar_starts_after_the_first_step(synthetic_3k, tmp_path, monkeypatch):
    # Its clock (and so its ETA) must not include the first step's compilation: the bar
    # is made once that step is done, starting at 1 of the total.
    from gllora.train import loop

    made = []

    class Bar:
        def __init__(self, total, initial, **kwargs):
            made.append((total, initial))

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(loop, "tqdm", Bar)
    train_and_evaluate(tiny(synthetic_3k, model="mlp_svd", num_epochs=1), str(tmp_path))
    assert len(made) == 1 and made[0][1] == 1 and made[0][0] > 1, made


if __name__ == "__main__":
    {"seeds": _worker_seeds}[sys.argv[1]](*sys.argv[2:])
