r"""Reproduces the paper's section 5: ``python -m experiments.reproduce --size=quick --out=DIR``.

Runs every experiment of section 5 on the built-in datasets with all five models
(Tables 2-5, Appendix D.3, Figures 4-5) and writes ``DIR/report.md``: each table with
our numbers (mean ± std over seeds) beside the paper's, the plots as PNG, whether each
of the paper's findings holds here, and the exact commands. Datasets already generated
and runs already finished are reused; an interrupted reproduction continues where it
stopped when the same command is run again.

    python -m experiments.reproduce --size=quick --out=out/quick      # 19 min, 2 CPU cores
    python -m experiments.reproduce --size=paper --out=out/paper      # the paper's sizes

The quick reproduction took 18 min 34 s on the project's 2-core machine from an empty
cache (``GLLORA_CACHE=/tmp/fulljob/cache python -m experiments.reproduce --size=quick
--out=/tmp/fulljob/out``; BUILD_NOTES.md, "Section 5 at quick size").

``--size``: ``quick`` (the generators' quick datasets, 3 seeds), ``paper`` (the
paper's dataset sizes, 3 seeds), ``tiny`` (CI smoke test: tiny base models, 80 LoRAs,
meaningless numbers). See ``experiments/repro/registry.py`` and
``experiments/configs/paper.py``. ``--experiments=backdoor`` adds the backdoor-detection
experiment (beyond the paper, :mod:`experiments.repro.backdoor`); alone, with
``--parts=tables``, it runs only that. ``--cache_dir`` (or ``$GLLORA_CACHE``) holds the
pretrained base models of the generators. An unknown experiment, model or part prints
one line and exits with status 2 (``--debug``: the traceback).
"""

from __future__ import annotations

from absl import flags

from experiments import cli
from experiments.repro import pipeline, registry

_SIZE = flags.DEFINE_enum("size", "quick", list(registry.SIZES), "Reproduction size.")
_OUT = flags.DEFINE_string("out", None, "Output folder (datasets, runs, report.md).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Base-model cache (default $GLLORA_CACHE).")
_JOBS = flags.DEFINE_integer("jobs", 0, "Worker processes, one CPU core each (0: all cores).")
_PARTS = flags.DEFINE_list("parts", list(pipeline.PARTS), f"Parts: {', '.join(pipeline.PARTS)}.")
_MODELS = flags.DEFINE_list("models", list(registry.MODELS), "Models to run.")
_EXPERIMENTS = flags.DEFINE_list(
    "experiments",
    list(registry.EXPERIMENTS),
    "Experiments to run (default: all of the paper's); beyond the paper, run only when "
    f"named: {', '.join(registry.BEYOND_PAPER)}.",
)
flags.mark_flag_as_required("out")


def main(argv):
    del argv  # cli.run refuses positional arguments
    # Before anything is written: a misspelt name costs nothing.
    cli.check_choices(
        "experiments", _EXPERIMENTS.value, list(registry.EXPERIMENTS) + list(registry.BEYOND_PAPER)
    )
    cli.check_choices("models", _MODELS.value, list(registry.MODELS))
    cli.check_choices("parts", _PARTS.value, list(pipeline.PARTS))
    from experiments.repro import report

    state = pipeline.reproduce(
        _SIZE.value,
        _OUT.value,
        cache_dir=_CACHE.value,
        jobs=_JOBS.value,
        parts=tuple(_PARTS.value),
        models=tuple(_MODELS.value),
        experiments=tuple(_EXPERIMENTS.value),
    )
    print("\n" + report.summary(state))
    print()
    for f in state["findings"]:
        print(f"- {f['finding']}: {f['verdict']}")
    print(f"\nreport: {state['report']}  ({state['seconds']:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
