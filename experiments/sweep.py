r"""Hyperparameter sweep of the section 5 models: ``python -m experiments.sweep --out=DIR``.

A coordinate sweep per experiment and model on the validation split of the quick-size
datasets (generated into ``DIR/data`` unless there); the grid and the rule are in
``experiments/repro/tuning.py``. Pairs run side by side in one worker per CPU core.
Results go to ``DIR/sweep.json`` and ``DIR/sweep.md``; the chosen values are printed as
the ``HPARAMS`` literal of ``experiments/configs/paper.py``. Finished trials are reused,
so an interrupted sweep continues; ``--experiments`` and ``--models`` restrict it (an
unknown name prints one line and exits with status 2)::

    python -m experiments.sweep --out=out/sweep [--experiments=quality,attributes --models=glnet]
"""

from __future__ import annotations

import json
import os
import pprint

from absl import flags

from experiments import cli
from experiments.repro import registry, runner, tuning, workers

_OUT = flags.DEFINE_string("out", "out/sweep", "Sweep folder (datasets, trials, results).")
_EXPERIMENTS = flags.DEFINE_list("experiments", list(registry.EXPERIMENTS), "Experiments.")
_MODELS = flags.DEFINE_list("models", list(registry.MODELS), "Models.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Base-model cache of the generators.")
_JOBS = flags.DEFINE_integer("jobs", 0, "Worker processes (0: one per CPU core).")


def main(argv):
    del argv  # cli.run refuses positional arguments
    cli.check_choices("experiments", _EXPERIMENTS.value, list(registry.EXPERIMENTS))
    cli.check_choices("models", _MODELS.value, list(registry.MODELS))
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    log = runner.Log(out)
    size = registry.SIZES["quick"]
    path = os.path.join(out, "sweep.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    with workers.Pool(_JOBS.value) as pool:
        futures = {}
        for experiment in _EXPERIMENTS.value:
            family = registry.EXPERIMENTS[experiment].family
            spec = registry.datasets(size)[family]
            data = runner.ensure_dataset(spec, size, out, _CACHE.value, log)
            for model in _MODELS.value:
                futures[(experiment, model)] = pool.submit(
                    tuning.sweep_pair, experiment, model, data, out
                )
        for (experiment, model), future in futures.items():
            done.setdefault(experiment, {})[model] = future.result()
            with open(path, "w") as f:
                json.dump(done, f, indent=1)
            log.say(f"sweep {experiment}/{model}: {done[experiment][model]['chosen']}")
    lines = ["| experiment | model | lr | wd | val loss | trials |", "|---" * 6 + "|"]
    chosen: dict[str, dict] = {}
    for experiment, per_model in done.items():
        for model, r in per_model.items():
            h = r["chosen"]
            chosen.setdefault(experiment, {})[model] = {
                "learning_rate": h["learning_rate"],
                "weight_decay": h["weight_decay"],
                "val_loss": round(r["val_loss"], 4),
                "trials": len(r["trials"]),
            }
            lines.append(
                f"| {experiment} | {model} | {h['learning_rate']:g} | {h['weight_decay']:g} | "
                f"{r['val_loss']:.4f} | {len(r['trials'])} |"
            )
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("\nHPARAMS = " + pprint.pformat(chosen, width=100, sort_dicts=True))


if __name__ == "__main__":
    cli.run(main)
