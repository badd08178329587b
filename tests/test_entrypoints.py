"""The entrypoints as a user meets them: commands run in subprocesses, output and exit status.

- a user error prints one line ``<command>: error: <message>`` and exits with status 2;
  ``--debug`` shows the traceback instead;
- ``train`` and ``evaluate`` say the units of each MSE, and report it in the targets'
  units too; ``predict`` keys its CSV as the labels are (``id`` for a dataset folder,
  ``path`` relative to ``--inputs`` for adapters), so predictions join with the labels;
- ``--help`` of every entrypoint loads no JAX (what makes it answer in well under 2 s:
  ``benchmarks/bench_help.py`` measures it);
- the README and ``reproduce --help`` quote the same measured figure;
- the demo trains with the engine.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=experiments/configs/default.py:tiny"
ENTRYPOINTS = cli.entrypoints()


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic dataset of rank-2 LoRAs written by its command and a one-epoch mlp_svd
    run trained on it."""
    root = tmp_path_factory.mktemp("entry")
    data, workdir = str(root / "data"), str(root / "run")
    run("data_gen.synthetic", f"--out={data}", "--num=400", "--seed=3", "--rank=2", check=True)
    proc = run(
        "experiments.train",
        TINY,
        f"--config.dataset={data}",
        f"--workdir={workdir}",
        "--config.model=mlp_svd",
        "--config.targets=('log_norm',)",
        "--config.num_epochs=1",
        "--config.progress=false",
        check=True,
    )
    return data, workdir, proc


def test_train_and_evaluate_say_the_units_of_each_mse(trained):
    _, workdir, proc = trained
    lines = [line for line in proc.stdout.splitlines() if "log_norm" in line]
    assert len(lines) == 3  # train, validation, test
    for line in lines:
        assert "mse (standardised)" in line and "mse (target units)" in line, line
    evaluated = run("experiments.evaluate", f"--workdir={workdir}", "--split=test", check=True)
    (line,) = [x for x in evaluated.stdout.splitlines() if x.startswith("test log_norm")]
    assert "mse (standardised)" in line and "mse (target units)" in line
    # One column: the target-unit MSE is the standardised one times the training variance.
    with open(os.path.join(workdir, "targets.json")) as f:
        (target,) = json.load(f)["targets"]
    with open(os.path.join(workdir, "results.json")) as f:
        test = json.load(f)["per_seed"][0]["test"]["log_norm"]
    (std,) = target["std"]
    np.testing.assert_allclose(test["mse_target_units"], test["mse"] * std**2, rtol=1e-12)
    assert abs(std**2 - 1) > 0.01  # else the two units could not be told apart


def test_predict_keys_rows_as_the_labels_so_they_join(trained, tmp_path):
    data, workdir, _ = trained
    out = tmp_path / "predictions.csv"
    proc = run("experiments.predict", f"--workdir={workdir}", f"--inputs={data}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "never saw" not in proc.stderr  # the trained rank: no warning
    with open(out) as f:
        predictions = list(csv.DictReader(f))
    with open(os.path.join(data, "labels.csv")) as f:
        labels = {row["id"]: row for row in csv.DictReader(f)}
    assert next(iter(predictions[0])) == "id" and len(predictions) == len(labels)
    joined = [(float(p["log_norm"]), float(labels[p["id"]]["log_norm"])) for p in predictions]
    # The join is right: the predictions, in the targets' units, track their own labels
    # and the test-split MSE is the one the run reported (float32 outputs: rtol 1e-4).
    with open(os.path.join(data, "splits.json")) as f:
        test_ids = {str(i) for i in json.load(f)["test"]}
    errors = [(p - y) ** 2 for (p, y), row in zip(joined, predictions) if row["id"] in test_ids]
    with open(os.path.join(workdir, "results.json")) as f:
        reported = json.load(f)["per_seed"][0]["test"]["log_norm"]["mse_target_units"]
    np.testing.assert_allclose(np.mean(errors), reported, rtol=1e-4)
    shuffled = [(p, y) for (p, _), (_, y) in zip(joined, joined[1:] + joined[:1])]
    assert np.corrcoef(np.asarray(joined).T)[0, 1] > np.corrcoef(np.asarray(shuffled).T)[0, 1]


def _one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_user_errors_print_one_line_and_exit_2(trained, tmp_path):
    data, workdir, _ = trained
    train = ("experiments.train", TINY, "--config.progress=false")
    fresh = f"--workdir={tmp_path / 'w'}"
    cases = [
        ((*train, "--config.dataset=/no/such/data", fresh), "train", "/no/such/data"),
        ((*train, f"--config.dataset={data}", "--config.targets=('nope',)", fresh), "train",
         "unknown target 'nope'"),
        ((*train, f"--config.dataset={data}", "--config.model=gl_net", fresh), "train",
         "unknown model 'gl_net'"),
        ((*train, f"--config.dataset={data}", "--config.num_epoch=3", fresh), "train",
         '--config.num_epoch: the config has no such field (Did you mean "num_epochs"'),
        ((*train, f"--config.dataset={data}", "--config.model=mlp", "--config.num_epochs=2",
          f"--workdir={workdir}"), "train", "holds a run with another config"),
        ((*train, "--no_such_flag=1", fresh), "train", "Unknown command line flag 'no_such_flag'"),
        ((*train, fresh, "extra"), "train", "unexpected arguments: extra"),
        (("experiments.evaluate", f"--workdir={tmp_path / 'none'}"), "evaluate",
         "not a gllora run directory"),
        (("experiments.predict", f"--workdir={workdir}", f"--inputs={tmp_path / 'none'}"),
         "predict", "no such folder"),
        (("experiments.reproduce", "--experiments=quality,qualty", f"--out={tmp_path / 'r'}"),
         "reproduce", "--experiments: unknown 'qualty'; known: quality,"),
        (("experiments.sweep", "--models=glnet,gl_net", f"--out={tmp_path / 's'}"), "sweep",
         "--models: unknown 'gl_net'"),
        (("data_gen.personas", f"--out={data}"), "personas", "pass --overwrite"),
        (("data_gen.synthetic", f"--out={data}"), "synthetic", "pass --overwrite"),
        (("data_gen.arith_sources", "--size=huge", f"--out={tmp_path / 'a'}"), "arith_sources",
         "--size must be one of"),
        (("experiments.demo", "--target=positive"), "demo", "--target: unknown 'positive'"),
    ]  # fmt: skip
    for args, command, message in cases:
        line = _one_line_error(run(*args), command)
        assert message in line, (args, line)
    # Nothing was left behind by the refused runs, and the existing run is untouched.
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()
    assert os.path.exists(os.path.join(workdir, "results.json"))


def test_debug_shows_the_traceback(trained, tmp_path):
    data, _, _ = trained
    args = ("experiments.train", TINY, f"--config.dataset={data}", f"--workdir={tmp_path}/w")
    proc = run(*args, "--config.model=gl_net", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "unknown model 'gl_net'" in proc.stderr.strip().splitlines()[-1]
    proc = run(*args, "--config.num_epoch=3", "--debug")  # also when flags do not parse
    assert proc.returncode == 1 and "Traceback" in proc.stderr


_HELP = """
import json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("jax", "flax", "optax", "orbax", "chex") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("module", ENTRYPOINTS)
def test_help_loads_no_jax(module):
    proc = subprocess.run(
        [sys.executable, "-c", _HELP, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    *text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result == {"code": 1, "heavy": []}, (module, result)  # absl's --help exits 1
    assert "--[no]debug" in "\n".join(text)  # every entrypoint takes it, and says so
    # Negative control: the probe sees JAX where an entrypoint would load it first.
    if module == "experiments.train":
        probe = _HELP.replace('"--help"', '"--helpfull"').replace(
            "try:", "import gllora.train\ntry:"
        )
        proc = subprocess.run(
            [sys.executable, "-c", probe, module], cwd=ROOT, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        assert "jax" in json.loads(proc.stdout.strip().splitlines()[-1])["heavy"]


def test_every_command_is_covered():
    # The README's commands are among those found (a rename would drop one silently).
    for command in (
        "experiments.train",
        "experiments.predict",
        "data_gen.personas",
        "data_gen.digit_subsets",
        "data_gen.arith_sources",
        "data_gen.synthetic",
    ):
        assert command in ENTRYPOINTS  # fmt: skip
    assert "experiments.cli" not in ENTRYPOINTS and "data_gen.family" not in ENTRYPOINTS


def test_readme_and_reproduce_help_quote_one_measured_figure():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    help_text = run("experiments.reproduce", "--help").stdout
    figure = "18 min 34 s"  # BUILD_NOTES.md, "Section 5 at quick size", with its command
    assert figure in readme and figure in help_text
    for stale in ("about ten minutes", "~10 min", "18.5 min"):
        assert stale not in readme and stale not in help_text, stale


def test_demo_trains_with_the_engine(tmp_path):
    proc = run("experiments.demo", "--num=300", "--epochs=1", "--models=mlp", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"constant", "mlp"}
    assert float(rows["mlp"][1]) > 0 and float(rows["constant"][1]) > 0
    # The engine's run directory holds the result the demo printed.
    with open(tmp_path / "runs" / "mlp" / "results.json") as f:
        mse = json.load(f)["summary"]["test"]["log_norm"]["mse"]["mean"]
    assert f"{mse:.3f}" == rows["mlp"][1]


def test_predict_warns_on_ranks_the_model_never_saw(trained, tmp_path):
    # The run is mlp_svd on rank-2 LoRAs: on rank-4 inputs it keeps only the top 2
    # singular values, and predict must say so, once (on rank 2 it says nothing:
    # test_predict_keys_rows_as_the_labels_so_they_join).
    _, workdir, _ = trained
    high = tmp_path / "r4"
    run("data_gen.synthetic", f"--out={high}", "--num=40", "--rank=4", check=True)
    proc = run("experiments.predict", f"--workdir={workdir}", f"--inputs={high}",
               f"--out={tmp_path / 'p.csv'}", check=True)  # fmt: skip
    warnings = [line for line in proc.stderr.splitlines() if "never saw" in line]
    assert len(warnings) == 1, proc.stderr[-2000:]
    assert "rank 4 (trained on 2)" in warnings[0] and "truncation" in warnings[0]
