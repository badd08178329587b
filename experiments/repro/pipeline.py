"""The reproduction, end to end: datasets, training runs, analyses, Figure 5, report.

Every step reuses what a previous invocation finished (see :mod:`runner`), so running
the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from experiments.repro import registry, runner, workers

PARTS = ("tables", "figure4", "figure5", "any_structure")
# Experiments beyond the paper (registry.BEYOND_PAPER) are named in ``experiments``.


def train_command(experiment: str, model: str, size: str, dataset: str, workdir: str) -> str:
    """The stand-alone command equivalent to one training run of the reproduction."""
    return (
        "python -m experiments.train "
        f"--config=experiments/configs/paper.py:{experiment}:{model}:{size} "
        f"--config.dataset={dataset} --workdir={workdir}"
    )


def reproduce(
    size_name: str,
    out: str,
    cache_dir: str | None = None,
    jobs: int = 0,
    parts: tuple[str, ...] = PARTS,
    models: tuple[str, ...] = registry.MODELS,
    experiments: tuple[str, ...] = tuple(registry.EXPERIMENTS),
    quiet: bool = False,
) -> dict[str, Any]:
    """Runs the reproduction of ``size_name`` into ``out``; writes ``out/report.md``.

    Returns:
      What the report was made from (runs, analyses, measurements, paths).
    """
    from experiments.repro import analysis, report, timing

    size = registry.SIZES[size_name]
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    log = runner.Log(out, quiet=quiet)
    start = time.perf_counter()
    beyond = tuple(e for e in experiments if e in registry.BEYOND_PAPER)
    experiments = tuple(e for e in experiments if e not in registry.BEYOND_PAPER)
    unknown = sorted(set(experiments) - set(registry.EXPERIMENTS))
    bad_models = sorted(set(models) - set(registry.MODELS))
    bad_parts = sorted(set(parts) - set(PARTS))
    if unknown or bad_models or bad_parts:
        raise ValueError(
            f"reproduce: unknown experiments {unknown}, models {bad_models} or parts "
            f"{bad_parts}; experiments: {[*registry.EXPERIMENTS, *registry.BEYOND_PAPER]}, models: "
            f"{list(registry.MODELS)}, parts: {list(PARTS)}"
        )
    experiments = [registry.EXPERIMENTS[e] for e in experiments]
    if "attributes" not in {e.name for e in experiments}:
        parts = tuple(p for p in parts if p != "figure4")  # Figure 4 reuses those models
    needed = {e.family for e in experiments}
    specs = registry.datasets(size)
    if "figure4" not in parts:
        specs = {k: v for k, v in specs.items() if v.rank is None}
    specs = {k: v for k, v in specs.items() if v.family in needed}
    log.say(f"reproduce --size={size_name}: {len(specs)} datasets -> {out}/data")
    paths = {name: runner.ensure_dataset(spec, size, out, cache_dir, log)
             for name, spec in specs.items()}  # fmt: skip

    runs: dict[str, dict[str, Any]] = {}
    fig4: dict[str, dict] = {}
    d3: dict[str, dict] = {}
    pool = workers.Pool(jobs)
    log.say(f"training {len(experiments) * len(models)} runs, {pool.jobs} worker(s)")
    try:
        futures = {}
        # The slowest runs first, so the two workers finish together.
        order = sorted(models, key=lambda m: m not in ("mlp_svd", "mlp_dense"))
        for exp in experiments:
            for model in order:
                workdir = os.path.join(out, "runs", exp.name, model)
                data = paths[exp.family]
                futures[(exp.name, model)] = (
                    pool.submit(workers.train, exp.name, model, size_name, data, workdir),
                    train_command(exp.name, model, size_name, data, workdir),
                )
        for (name, model), (future, command) in futures.items():
            results, seconds, status = future.result()
            runs.setdefault(name, {})[model] = results
            log.record("train", f"runs/{name}/{model}", command, seconds, status)
            log.say(f"  {name}/{model}: {status} {runner.headline(results)}")
        analyses = {}
        for model in models:
            if "membership" in runs:
                analyses[("d3", model)] = pool.submit(
                    workers.d3, os.path.join(out, "runs", "membership", model)
                )
            if "figure4" in parts:
                rank_paths = {r: paths[n] for r, n in registry.rank_datasets(size).items()}
                analyses[("fig4", model)] = pool.submit(
                    workers.figure4, os.path.join(out, "runs", "attributes", model), rank_paths
                )
        for (kind, model), future in analyses.items():
            (d3 if kind == "d3" else fig4)[model] = future.result()
        if "any_structure" in parts:
            anys = _any_structure(size, size_name, out, cache_dir, log, pool, models)
        backdoor = None
        if "backdoor" in beyond:
            backdoor = _backdoor(size, size_name, out, cache_dir, log, pool, models)
            paths["backdoors"] = backdoor["dataset"]
    finally:
        pool.close()  # frees the workers' memory before Figure 5

    if "any_structure" not in parts:
        anys = None
    fig5: list[dict] = []
    if "figure5" in parts:
        log.say("figure 5: " + ", ".join(size.gpt3))
        cores = workers.available_cores()[: pool.jobs]
        fig5 = timing.run_all(size, out, cores, log, models)
    chance = {
        e.name: analysis.chance_accuracy(paths[e.family], e.targets[0])
        for e in experiments
        if e.name in ("attributes", "membership", "dataset_size", "sources")
    }
    seconds = time.perf_counter() - start
    state = {
        "size": size,
        "out": out,
        "models": models,
        "runs": runs,
        "d3": d3,
        "fig4": fig4,
        "fig5": fig5,
        "chance": chance,
        "paths": paths,
        "log": log,
        "seconds": seconds,
        "parts": parts,
        "any_structure": anys,
        "experiments": tuple(e.name for e in experiments) + beyond,
        "backdoor": backdoor,
    }
    state["report"] = report.write(state)
    return state


def _any_structure(size, size_name, out, cache_dir, log, pool, models) -> dict:
    """The "any structure" experiment (:mod:`experiments.repro.anystructure`)."""
    from experiments.repro import anystructure

    spec = anystructure.dataset_spec(size)
    mix = runner.ensure_dataset(spec, size, out, cache_dir, log)
    futures = {}
    for experiment, model, data, workdir in anystructure.runs(size, out, mix, models):
        trained_on = os.path.basename(workdir)
        futures[(experiment, model, trained_on)] = (
            pool.submit(workers.train, experiment, model, size_name, data, workdir),
            train_command(experiment, model, size_name, data, workdir),
        )
    results = {}
    for key, (future, command) in futures.items():
        res, seconds, status = future.result()
        results[key] = res
        log.record("train", "runs/any_structure/" + "/".join(key), command, seconds, status)
        log.say(f"  any structure {'/'.join(key)}: {status} {runner.headline(res)}")
    return {"dataset": mix, "results": results}


def _backdoor(size, size_name, out, cache_dir, log, pool, models) -> dict:
    """The backdoor experiment (:mod:`experiments.repro.backdoor`): its dataset and
    views, every model on every task, the linear probe and the poison-rate curves."""
    from experiments.repro import backdoor

    path = runner.ensure_dataset(backdoor.DATASET, size, out, cache_dir, log)
    views = backdoor.make_views(path, os.path.join(out, "data", "backdoors_views"))
    probe = pool.submit(backdoor.probe, views)
    futures = {}
    for task, model, experiment, data, workdir, overrides in backdoor.runs(out, views, models):
        futures[(task, model)] = (
            pool.submit(workers.train, experiment, model, size_name, data, workdir, overrides),
            backdoor.command(experiment, model, size_name, data, overrides["targets"][0],
                             workdir),
        )  # fmt: skip
    results: dict[str, dict] = {}
    for (task, model), (future, command) in futures.items():
        res, seconds, status = future.result()
        results.setdefault(task, {})[model] = res
        log.record("train", f"runs/backdoor/{task}/{model}", command, seconds, status)
        log.say(f"  backdoor {task}/{model}: {status} {runner.headline(res)}")
    for task, res in probe.result().items():
        results.setdefault(task, {})[backdoor.PROBE] = res
    curve_futures = {
        m: pool.submit(backdoor.rate_curve, os.path.join(out, "runs", "backdoor", "detect", m))
        for m in results.get("detect", {})
        if m != backdoor.PROBE
    }
    curves = {m: f.result() for m, f in curve_futures.items()}
    curves[backdoor.PROBE] = backdoor.probe_curve(results["detect"][backdoor.PROBE], path)
    return {"dataset": path, "views": views, "results": results, "curves": curves,
            "info": backdoor.info(path, views)}  # fmt: skip
