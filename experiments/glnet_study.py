r"""GL-net's depth, width and nonlinearity on the three built-in families (issue 12).

``python -m experiments.glnet_study --out=DIR``: GL-net variants trained on one target of
each family at quick size (3 seeds, the quick protocol's epochs, the family's base
learning rate and weight decay), compared on validation loss (the test metric is shown,
never used to choose):

- one equivariant layer of width 64 (the authors' diffusion scripts) and of width 16;
- two and three layers of width 16 with eq. 6's ``relu(sign(row sums))`` gate between them
  (the authors' language-model setting, and gllora's former default), with the learned
  invariant gate (``nonlinearity="gate"``), and with that gate in residual blocks.

Datasets are generated into ``DIR/data`` unless there (``--data=DIR2`` reuses another
folder's); runs go to ``DIR/runs`` and are reused when their config matches; the table is
printed and written to ``DIR/glnet_study.md``.

    python -m experiments.glnet_study --out=out/glnet_study [--experiments=attributes,membership,sources]
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments import cli
from experiments.repro import registry, runner, workers

VARIANTS = {
    "1x64": {"equiv_depth": 1, "equiv_width": 64},
    "1x16": {"equiv_depth": 1, "equiv_width": 16},
    "2x16 eq.6": {"equiv_depth": 2, "equiv_width": 16, "nonlinearity": "relu_sign"},
    "2x16 gate": {"equiv_depth": 2, "equiv_width": 16, "nonlinearity": "gate"},
    "2x16 gate+res": {
        "equiv_depth": 2, "equiv_width": 16, "nonlinearity": "gate", "residual": True,
    },  # fmt: skip
    "3x16 eq.6": {"equiv_depth": 3, "equiv_width": 16, "nonlinearity": "relu_sign"},
    "3x16 gate": {"equiv_depth": 3, "equiv_width": 16, "nonlinearity": "gate"},
    "3x16 gate+res": {
        "equiv_depth": 3, "equiv_width": 16, "nonlinearity": "gate", "residual": True,
    },  # fmt: skip
}

_OUT = flags.DEFINE_string("out", "out/glnet_study", "Study folder (data, runs, table).")
_DATA = flags.DEFINE_string("data", None, "A folder whose data/ to reuse (default: --out).")
_EXPERIMENTS = flags.DEFINE_list(
    "experiments", ["attributes", "membership", "sources"], "One experiment per family."
)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Base-model cache of the generators.")
_JOBS = flags.DEFINE_integer("jobs", 0, "Worker processes (0: one per CPU core).")


def _train(experiment: str, variant: str, data: str, out: str) -> dict:
    overrides = {"model": VARIANTS[variant]}
    workdir = os.path.join(out, "runs", experiment, variant.replace(" ", "_").replace("+", "_"))
    results, seconds, _ = workers.train(experiment, "glnet", "quick", data, workdir, overrides)
    val = results["summary"]["validation"]["loss"]
    return {
        "val_loss": val["mean"],
        "val_loss_std": val["std"],
        "test": runner.headline(results),
        "seconds": round(seconds, 1),
    }


def main(argv):
    del argv
    cli.check_choices("experiments", _EXPERIMENTS.value, list(registry.EXPERIMENTS))
    cli.check_choices("variants", _VARIANTS.value, list(VARIANTS))
    out = os.path.abspath(_OUT.value)
    data_root = os.path.abspath(_DATA.value or _OUT.value)
    os.makedirs(out, exist_ok=True)
    log = runner.Log(out)
    size = registry.SIZES["quick"]
    results: dict[str, dict] = {}
    with workers.Pool(_JOBS.value) as pool:
        futures = {}
        for experiment in _EXPERIMENTS.value:
            spec = registry.datasets(size)[registry.EXPERIMENTS[experiment].family]
            data = runner.ensure_dataset(spec, size, data_root, _CACHE.value, log)
            for variant in _VARIANTS.value:
                futures[(experiment, variant)] = pool.submit(_train, experiment, variant, data, out)
        for (experiment, variant), future in futures.items():
            results.setdefault(experiment, {})[variant] = r = future.result()
            log.say(f"{experiment} {variant}: val loss {r['val_loss']:.4f} ({r['test']})")
    with open(os.path.join(out, "glnet_study.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| variant | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for variant in _VARIANTS.value:
        cells = []
        for experiment, per in results.items():
            r = per[variant]
            best = min(per.values(), key=lambda x: x["val_loss"]) is r
            val = f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f}"
            cells.append(f"{'**' + val + '**' if best else val} ({r['test']})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    text = (
        "GL-net variants, quick size, 3 seeds: validation loss (mean ± std; bold: lowest "
        "per experiment) and the test metric\n\n" + "\n".join(lines) + "\n"
    )
    with open(os.path.join(out, "glnet_study.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
