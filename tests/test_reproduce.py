"""Tests of the section 5 reproduction (experiments/reproduce.py, experiments/repro/).

Fast: equation 38 against a direct simulation and the paper's own numbers, the
summing strategy, the configs, the Figure 5 memory plan, and the report writer on
synthetic results (every table and plot). Slow (CI's second step): the whole
reproduction at the ``tiny`` size, then again to check that everything is reused.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from scipy.special import comb

from experiments.configs import paper as paper_config
from experiments.repro import analysis, paper, registry, report, runner, timing, tuning, workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BINOM = np.array([comb(10, k) for k in range(11)]) / 2.0**10
NONEMPTY = np.where(np.arange(11) > 0, BINOM, 0.0) / (1 - BINOM[0])  # the digit subsets


@pytest.mark.parametrize("p", [0.5, 0.656, 0.904, 0.99])
@pytest.mark.parametrize("probs", [NONEMPTY, np.full(11, 1 / 11)], ids=["subsets", "uniform"])
def test_eq38_matches_a_direct_simulation(p, probs):
    num = 200_000
    simulated = analysis.simulate_sum_accuracy(p, probs, num, np.random.default_rng(0))
    exact = analysis.eq38_accuracy(p, probs)
    sigma = np.sqrt(exact * (1 - exact) / num)
    assert abs(simulated - exact) < 5 * sigma, (simulated, exact)


def test_eq38_reproduces_the_papers_numbers_and_limits():
    # Appendix D.3: p = .904 -> 46.1 %, p = .656 -> "21 %" (each class present w.p. 1/2).
    assert round(100 * analysis.eq38_accuracy(0.904, BINOM), 1) == 46.1
    assert int(100 * analysis.eq38_accuracy(0.656, BINOM)) == 21  # 21.5 %, "21 %"
    assert analysis.eq38_accuracy(1.0, NONEMPTY) == pytest.approx(1.0)
    # p = 0: every bit flipped, the sum is 10 - s, right only when s = 5.
    assert analysis.eq38_accuracy(0.0, NONEMPTY) == pytest.approx(NONEMPTY[5])
    with pytest.raises(ValueError, match="probability"):
        analysis.eq38_accuracy(1.5, NONEMPTY)
    with pytest.raises(ValueError, match="probability vector"):
        analysis.eq38_accuracy(0.9, [0.5, 0.6])


def test_sum_strategy_and_size_distribution():
    truth = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1]], bool)
    sizes = truth.sum(1)
    perfect = np.where(truth, 2.0, -2.0)[None]
    swapped = perfect.copy()
    swapped[0, 0, :2] *= -1  # one false negative and one false positive: same sum
    one_off = perfect.copy()
    one_off[0, 1, 0] = 3.0  # one false positive
    logits = np.concatenate([perfect, swapped, one_off])  # three "seeds"
    np.testing.assert_allclose(analysis.sum_strategy_accuracy(logits, sizes), [1, 1, 2 / 3])
    np.testing.assert_allclose(analysis.size_distribution(sizes, 3), [0, 1 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="sizes"):
        analysis.size_distribution([4], 3)


def test_paper_configs():
    for experiment in paper_config.FAMILY:
        for model in paper_config.MODELS:
            config = paper_config.get_config(f"{experiment}:{model}:quick")
            assert config.model == model and config.num_seeds == 3
            assert tuple(config.targets) == paper_config.TARGETS[experiment]
    paper_size = paper_config.get_config("sources:glnet")
    assert paper_size.num_epochs == 60 and paper_size.optimizer == "adamw"
    for bad in ("quality", "quality:resnet", "nope:glnet", "quality:glnet:huge"):
        with pytest.raises(ValueError):
            paper_config.get_config(bad)


def test_figure5_memory_plan():
    layers, d = timing.GPT3["175B"]
    dense = timing.plan("mlp_dense", layers, d, 6 << 30, 64, 64, {})
    assert dense["forward_batch"] == 0  # the kernel alone, 96 x 12288^2 x 16 floats
    assert dense["forward_planned_mb"] > dense["params_mb"] > 6 << 10
    layers, d = timing.GPT3["125M"]
    glnet = timing.plan("glnet", layers, d, 6 << 30, 64, 64, {})
    assert glnet["forward_batch"] == 64 and glnet["params_mb"] < 64


def test_figure5_plan_reads_the_compiled_programs():
    """The need of a batch is XLA's buffer assignment of that very program (plus the
    stated scratch), and a cap between two batches' needs picks the smaller batch."""
    layers, d = timing.GPT3["125M"]
    roomy = timing.plan("mlp_dense", layers, d, 6 << 30, 16, 16, {})
    assert roomy["forward_batch"] == 16
    need16 = roomy["forward_planned_mb"]
    # MLP+Dense's need: its kernel (12 x 768^2 x 16 floats) and the inputs, plus what the
    # batch adds; the products of the batch (16 x 12 x 768^2 floats, 432 MB) are not in it.
    kernel_mb = 12 * 768 * 768 * 16 * 4 / 2**20
    held = (need16 - timing.SCRATCH_MB) / (1 + timing.SCRATCH_FRACTION)
    assert kernel_mb < held < kernel_mb + 100
    tight = timing.plan("mlp_dense", layers, d, int((need16 - 1) * 2**20), 16, 16, {})
    assert 0 < tight["forward_batch"] < 16 and tight["forward_planned_mb"] < need16
    none = timing.plan("mlp_dense", layers, d, int(kernel_mb * 2**20), 16, 16, {})
    assert none["forward_batch"] == 0


def test_figure5_records_tell_out_of_memory_from_other_failures():
    assert timing.failure(MemoryError("x"))["status"] == "oom"
    exhausted = timing.failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
    assert exhausted["status"] == "oom" and exhausted["oom_kind"] == "allocation"
    other = timing.failure(RuntimeError("INTERNAL: YNNPACK operation failed: error"))
    assert other["status"] == "error" and other["error_type"] == "RuntimeError"
    assert other["error"] == "INTERNAL: YNNPACK operation failed: error"
    bug = timing.failure(ValueError("product_dense: a [3, 6, 2] and b [3, 10, 3]"))
    assert bug["status"] == "error" and "product_dense" in bug["reason"]
    # A child's RESULT line is kept; library diagnostics on stderr turn an opaque error
    # into the allocation failure it was (YNNPACK's own, or a C++ bad_alloc).
    ok = timing.from_process(0, 'noise\nRESULT {"status": "ok", "forward_s": 1.0}\n', "")
    assert ok == {"status": "ok", "forward_s": 1.0}
    line = 'RESULT {"status": "error", "error": "INTERNAL: YNNPACK operation failed"}\n'
    ynn = timing.from_process(0, line, "allocate of <3> failed.\n")
    assert (ynn["status"], ynn["oom_kind"]) == ("oom", "allocation")
    assert ynn["error"] == "INTERNAL: YNNPACK operation failed" and "allocate" in ynn["stderr_tail"]
    plain = timing.from_process(0, line, "some warning\n")
    assert plain["status"] == "error" and "oom_kind" not in plain
    bad_alloc = "terminate called after throwing an instance of 'std::bad_alloc'\n"
    assert timing.from_process(-6, "", bad_alloc)["oom_kind"] == "allocation"
    killed = timing.from_process(-9, "", "")
    assert (killed["status"], killed["oom_kind"]) == ("oom", "killed")
    crashed = timing.from_process(-11, "", "Segmentation fault")
    assert crashed["status"] == "error" and crashed["error_type"] == "signal 11"
    assert timing.from_process(1, "", "Traceback ...")["status"] == "error"
    # A resident peak over the cap is a measured out of memory; under it, ok.
    over = timing._judge({"forward_peak_mb": 2100.0}, "forward", 2.0)
    assert (over["status"], over["oom_kind"]) == ("oom", "measured") and "2.05 GB" in over["reason"]
    assert timing._judge({"forward_peak_mb": 2000.0}, "forward", 2.0)["status"] == "ok"
    # The phases' records merge into one; the first failure decides the status.
    pre = {"status": "ok", "preprocess_s": 1.0, "plan": {"preprocess_chunk": 8}}
    fwd = {"status": "oom", "oom_kind": "planned", "reason": "r", "plan": {"forward_batch": 0}}
    merged = timing.merge({"preprocess": pre, "forward": fwd})
    assert merged["status"] == "oom" and merged["failed_phase"] == "forward"
    assert merged["preprocess_s"] == 1.0
    assert merged["plan"] == {"preprocess_chunk": 8, "forward_batch": 0}
    both = timing.merge({"preprocess": pre, "forward": {**pre, "forward_s": 2.0}})
    assert both["status"] == "ok" and "failed_phase" not in both


@pytest.mark.slow
def test_figure5_measured_peak_stays_within_the_plan():
    """One measurement, in its own capped process as the reproduction runs it."""
    import subprocess
    import sys

    args = ["--model=mlp_dense", "--gpt3=125M", "--preprocess=8", "--forward=16"]
    args += ["--batch=8", "--cap_gb=2.0"]
    cmd = [sys.executable, "-m", "experiments.repro.timing", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    result = timing.from_process(proc.returncode, proc.stdout, proc.stderr)
    assert result["status"] == "ok", result
    plan = result["plan"]
    assert result["forward_batch"] == 8
    assert result["forward_peak_mb"] <= plan["forward_planned_mb"]
    assert result["preprocess_peak_mb"] <= plan["preprocess_planned_mb"]
    assert result["forward_peak_mb"] > plan["params_mb"]  # the kernel was really resident


def _results(target: str, task: str, rng) -> dict:
    def metrics():
        if task == "regression":
            keys = ("mse", "r2", "kendall_tau", "loss")
        else:
            keys = ("loss", "accuracy")
        return {k: {"mean": float(rng.uniform()), "std": 0.01} for k in keys}

    summary = {s: {target: metrics()} for s in ("train", "validation", "test")}
    per_seed = [
        {s: {target: {k: m["mean"] + d for k, m in summary[s][target].items()}} for s in summary}
        for d in (-0.01, 0.0, 0.01)
    ]
    return {"targets": [target], "summary": summary, "per_seed": per_seed}


def test_report_has_every_table_plot_and_finding(tmp_path):
    rng = np.random.default_rng(0)
    size = registry.SIZES["tiny"]
    runs = {}
    for name, e in registry.EXPERIMENTS.items():
        task = "regression" if name in ("quality", "val_loss", "challenge_acc") else "x"
        runs[name] = {m: _results(e.targets[0], task, rng) for m in registry.MODELS}
    seeds = lambda: list(rng.uniform(0.4, 0.9, 2))
    fig4 = {
        m: {r: {"accuracy": seeds(), "loss": seeds()} for r in size.ranks} for m in registry.MODELS
    }
    fig4["mlp"][8] = None
    d3 = {m: {"p": seeds(), "eq38": seeds(), "sum": seeds(), "size_probs": list(NONEMPTY),
              "num_test": 8} for m in registry.MODELS}  # fmt: skip
    fig5 = []
    for g in size.gpt3:
        for m in registry.MODELS:
            oom = m == "mlp_dense" and g == "350M"
            error = m == "mlp_oalign" and g == "350M"
            row = {
                "model": m,
                "gpt3": g,
                "status": "oom" if oom else "error" if error else "ok",
                "settings": {"forward": 16, "preprocess": 8},
            }
            if oom:
                row.update(reason="needs >= 9.9 GB (cap 2 GB)", oom_kind="planned")
            elif error:
                row.update(error="JaxRuntimeError: INTERNAL: something else failed")
            else:
                row.update(preprocess_s=0.1, forward_s=1.0, forward_batch=8,
                           preprocess_peak_mb=10.0, forward_peak_mb=20.0)  # fmt: skip
            fig5.append(row)
    state = {
        "size": size, "out": str(tmp_path), "models": registry.MODELS, "runs": runs,
        "d3": d3, "fig4": fig4, "fig5": fig5, "paths": {}, "log": runner.Log(str(tmp_path)),
        "seconds": 1.0, "parts": ("tables", "figure4", "figure5"),
        "chance": {"attributes": 0.6, "membership": 0.5, "dataset_size": 0.25, "sources": 0.5},
    }  # fmt: skip
    path = report.write(state)
    with open(path) as f:
        text = f.read()
    for heading in ("Table 2", "Table 3 (left)", "Table 3 (right)", "Table 4", "Appendix D.3",
                    "Table 5", "Figure 4", "Figure 5", "Findings", "Commands"):  # fmt: skip
        assert heading in text, heading
    # Tiny numbers mean nothing: every finding is listed, none judged, nothing in bold.
    assert len(state["findings"]) == 8
    assert all(f["verdict"] == "tiny: not judged" for f in state["findings"])
    assert "tiny: not judged" in text and "HOLDS" not in text
    assert "OOM (planned)" in text and "46.1" in text  # an out-of-memory row; D.3's number
    assert "ERROR: JaxRuntimeError" in text  # an error is not an out of memory
    assert "forward 16 (s)" in text and "preprocess 8 (s)" in text  # the measured counts
    assert "DESIGN.md" not in text
    orderings_section = text.split("## The paper's orderings here")[1].split("## Tables")[0]
    assert orderings_section.strip().startswith("tiny: not judged")
    for png in ("figure4_accuracy", "figure4_loss", "figure5_preprocess", "figure5_forward",
                "figure5_memory"):  # fmt: skip
        assert os.path.getsize(tmp_path / f"{png}.png") > 1000
    table = report.summary(state).splitlines()
    assert paper.MODEL_NAMES["glnet_seq"] in table[-1]
    assert len({len(line) for line in table}) == 1  # the longest name does not shift a column


SMOKE_MODELS = ("mlp", "glnet")


@pytest.mark.slow
def test_tiny_reproduction_writes_every_table_and_plot_and_resumes(tmp_path):
    from experiments.repro import pipeline

    out = tmp_path / "out"
    # Two models keep CI's slow step bounded (~8 min); the tables and plots are the same.
    run = lambda: pipeline.reproduce(
        "tiny", str(out), cache_dir=str(tmp_path / "cache"), models=SMOKE_MODELS, quiet=True
    )
    state = run()
    with open(state["report"]) as f:
        text = f.read()
    for heading in ("Table 2", "Table 3 (left)", "Table 3 (right)", "Table 4", "Appendix D.3",
                    "Table 5", "Figure 4", "Figure 5", "Findings"):  # fmt: skip
        assert heading in text, heading
    for png in ("figure4_accuracy", "figure4_loss", "figure5_preprocess", "figure5_forward",
                "figure5_memory"):  # fmt: skip
        assert (out / f"{png}.png").exists()
    assert len(state["runs"]) == 7 and all(len(r) == 2 for r in state["runs"].values())
    assert {row["model"] for row in state["fig5"]} == set(SMOKE_MODELS)
    # Run again: every dataset, run and measurement is reused, the report the same tables.
    again = run()
    statuses = {c["status"] for c in again["log"].commands}
    assert statuses == {"reused"}, statuses
    assert again["runs"]["attributes"]["glnet"] == state["runs"]["attributes"]["glnet"]


def test_a_finished_run_follows_its_dataset_content_not_its_path(monkeypatch, tmp_path):
    # A run finished on one dataset folder is reused from a copy of that folder (another
    # reproduction's), retrained when a byte of the copy changes, and a run recorded by
    # the dataset's path (before content digests) is still reused.
    from gllora import train

    trained = []

    def fake_train(config, workdir):
        trained.append(config.dataset)
        results = {"targets": ["y"], "trained_on": config.dataset}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        return results

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    first = tmp_path / "a" / "data" / "personas"
    (first / "shards").mkdir(parents=True)
    (first / "labels.csv").write_text("id,y\n0,1.5\n")
    (first / "shards" / "00000.safetensors").write_bytes(b"\x00" * 64)
    copy = tmp_path / "b" / "data" / "personas"
    shutil.copytree(first, copy)
    run = lambda data, workdir: runner.run_training(
        workers.make_config("quality", "mlp", "tiny", str(data)), str(tmp_path / workdir)
    )
    assert run(first, "run")[2] == "trained"
    assert run(copy, "run")[2] == "reused" and trained == [str(first)]
    (copy / "shards" / "00000.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert run(copy, "run")[2] == "retrained" and trained[-1] == str(copy)
    # A fingerprint written with the path: reused, and rewritten with the digest.
    with open(tmp_path / "run" / "repro.json") as f:
        recorded = json.load(f)
    recorded["dataset"] = str(copy)
    with open(tmp_path / "run" / "repro.json", "w") as f:
        json.dump(recorded, f)
    assert run(copy, "run")[2] == "reused" and len(trained) == 2
    with open(tmp_path / "run" / "repro.json") as f:
        assert json.load(f)["dataset"] == runner.dataset_digest(str(copy))


def test_unknown_experiment_model_or_part_fails_before_any_work(tmp_path):
    from experiments.repro import pipeline

    for kwargs in ({"experiments": ("quality", "nope")}, {"models": ("resnet",)},
                   {"parts": ("tables", "figure9")}):  # fmt: skip
        with pytest.raises(ValueError, match="unknown experiments"):
            pipeline.reproduce("tiny", str(tmp_path / "out"), quiet=True, **kwargs)
    assert not (tmp_path / "out" / "data").exists()


def test_findings_of_experiments_not_run_say_so():
    runs = {"attributes": {m: _results("attributes", "x", np.random.default_rng(1))
                           for m in registry.MODELS}}  # fmt: skip
    found = {f["finding"]: f["verdict"] for f in
             report.findings.all_findings(runs, registry.MODELS, {}, {}, {}, [])}  # fmt: skip
    verdicts = list(found.values())
    assert verdicts[2].startswith("not tested") and verdicts[5].startswith("not tested")
    assert not verdicts[1].startswith("not tested")  # attributes alone decides it
    state = {"size": registry.SIZES["quick"], "out": "o", "models": ("glnet",),
             "experiments": ("attributes",), "parts": ("tables",)}  # fmt: skip
    assert report.command(state) == (
        "python -m experiments.reproduce --size=quick --out=o --experiments=attributes "
        "--parts=tables --models=glnet"
    )


def test_peer_configs_follow_their_recipes_and_are_not_judged():
    w2t = paper_config.get_config("sources:w2t:quick")
    assert w2t.schedule == "cosine" and w2t.weight_decay == 1e-3
    assert w2t.models.w2t.token_augment == 0.5  # classification: the authors' augmentation
    assert paper_config.get_config("val_loss:w2t:quick").models.w2t.token_augment == 0.0
    assert paper_config.get_config("val_loss:glnet:quick").schedule == "constant"
    assert set(registry.PEERS) <= set(registry.MODELS) and registry.PAPER_MODELS == paper.MODELS
    assert all("not in paper" in paper.MODEL_NAMES[m] for m in registry.PEERS)


def test_any_structure_table_reads_mix_and_per_structure_runs():
    from experiments.repro import anystructure

    size = registry.SIZES["quick"]
    bases, holdout = anystructure.BASES["quick"]
    metric = lambda v: {"val_loss": {"r2": {"mean": v, "std": 0.01}}}
    mix = {
        "targets": ["val_loss"],
        "summary_per_structure": {"test": {b: metric(0.9) for b in bases + (holdout,)}},
    }
    alone = {"targets": ["val_loss"], "summary": {"test": metric(0.8)}}
    results = {("val_loss", "glnet_seq", "mix"): mix}
    results.update({("val_loss", "glnet", b): alone for b in bases})
    text = anystructure.table(size, results)
    assert "held out: mid" in text and text.count("0.900 ± 0.010") == 4
    assert text.count("0.800 ± 0.010") == 3 and "each base model alone" in text
    spec = anystructure.dataset_spec(size)
    cmd = spec.command(size, "/tmp/x", None)
    assert "--base_configs=default,deep,wide,mid" in cmd and "--holdout=mid" in cmd


@pytest.mark.parametrize("model", ["glnet", "w2t"])
def test_sweep_picks_the_best_of_all_its_trials(monkeypatch, tmp_path, model):
    # A fake trainer whose validation loss is lowest at learning rate 1e-3 and weight
    # decay 1e-3 (W2T's recipe, off the {0, 1e-2} grid). The coordinate sweep must end on
    # the lowest loss it measured; before the second stage included the starting weight
    # decay, W2T's sweep ended on wd 0 (loss 0.7) after measuring 0.5 in its first stage.
    losses = {0.0: 0.7, 1e-3: 0.5, 1e-2: 0.8}

    def fake_training(config, workdir):
        loss = losses[config.weight_decay] + abs(np.log10(config.learning_rate) + 3)
        results = {
            "targets": ["y"],
            "summary": {
                "validation": {"loss": {"mean": loss, "std": 0.0}},
                "test": {"y": {"r2": {"mean": 0.0, "std": 0.0}}},
            },
        }
        return results, 1.0, workdir

    monkeypatch.setattr(runner, "run_training", fake_training)
    monkeypatch.setattr(workers, "make_config", lambda e, m, s, d, o: _Config(o))
    out = tuning.sweep_pair("quality", model, "unused", str(tmp_path))
    trials = out["trials"].values()
    best = min(trials, key=lambda t: t["val_loss"])
    assert out["val_loss"] == best["val_loss"]
    assert out["chosen"]["learning_rate"] == 1e-3
    start = paper_config.hparams("quality", model, tuned=False)["weight_decay"]
    assert out["chosen"]["weight_decay"] == (1e-3 if start == 1e-3 else 0.0)
    assert len(trials) == (7 if model == "w2t" else 6)


class _Config:
    """The fields of a training config the fake trainer reads."""

    def __init__(self, overrides):
        self.learning_rate = overrides["learning_rate"]
        self.weight_decay = overrides["weight_decay"]


def test_tuned_hparams_are_the_stored_sweeps_best_trials():
    # Every tuned pair of configs/paper.py is the lowest mean validation loss among the
    # trials stored in configs/sweep_quick.json (the coordinate sweep's final pick is the
    # minimum over all its trials), with the same count; an untuned pair says so.
    with open(os.path.join(ROOT, "experiments", "configs", "sweep_quick.json")) as f:
        sweeps = json.load(f)
    assert paper_config.HPARAMS
    for experiment, per in paper_config.HPARAMS.items():
        for model, chosen in per.items():
            trials = sweeps[experiment][model]["trials"].values()
            best = min(trials, key=lambda t: t["val_loss"])
            start = paper_config.hparams(experiment, model, tuned=False)["weight_decay"]
            count = 5 + len(tuning.weight_decays(start)) - 1  # stage 2 repeats stage 1's best
            assert len(trials) == chosen["trials"] == count, (experiment, model)
            assert best["hparams"]["learning_rate"] == chosen["learning_rate"]
            assert best["hparams"]["weight_decay"] == chosen["weight_decay"]
            assert abs(best["val_loss"] - chosen["val_loss"]) < 5e-5  # stored to 4 decimals
            assert paper_config.hparams(experiment, model)["chosen_by"].startswith(
                f"sweep: {count} trials"
            )
    untuned = [(e, m) for e in paper_config.FAMILY for m in paper.MODELS
               if m not in paper_config.HPARAMS.get(e, {})]  # fmt: skip
    for e, m in untuned:
        assert paper_config.hparams(e, m)["chosen_by"].startswith("not swept"), (e, m)
