"""The "any structure" experiment (issue 14; not in the paper): one model for LoRAs of
several base language models.

The arithmetic-sources family finetuned on base LMs of different depth and width
(``data_gen.arith_sources --base_configs=...``) into one multi-structure dataset folder,
one base model held out (all its LoRAs in its test split; its widths are those of a
training base model, so the encoders of ``glnet_seq`` apply). Trained on the mix: the
models whose parameters do not depend on the structure (``glnet_seq``, ``spectral``),
tested on each base model's test split and on the held-out one. The comparison: GL-net
and W2T trained on each base model alone (``DIR/structures/<base>``, the same splits).
Targets: validation loss (R²) and source membership (accuracy).
"""

from __future__ import annotations

import os
from typing import Any

from experiments.repro import paper, registry

#: ``{size: (base presets, the held-out preset)}``.
BASES = {
    "tiny": (("tiny", "tiny_deep"), "tiny_mid"),
    "quick": (("default", "deep", "wide"), "mid"),
    "paper": (("default", "deep", "wide"), "mid"),
}
EXPERIMENTS = (("val_loss", "r2", "val-loss R²"), ("sources", "accuracy", "membership acc"))
MIX_MODELS = ("glnet_seq", "spectral")
PER_STRUCTURE_MODELS = ("glnet", "w2t")


def dataset_spec(size: registry.Size) -> registry.DatasetSpec:
    bases, holdout = BASES[size.name]
    return registry.DatasetSpec(
        "arith_mix", "arith_sources", base_configs=bases + (holdout,), holdout=holdout
    )


def runs(size: registry.Size, out: str, mix_path: str, models) -> list[tuple[str, str, str, str]]:
    """``[(experiment, model, dataset folder, workdir)]`` of the experiment."""
    bases, _ = BASES[size.name]
    todo = []
    for experiment, _, _ in EXPERIMENTS:
        for model in MIX_MODELS:
            if model in models:
                workdir = os.path.join(out, "runs", "any_structure", experiment, model, "mix")
                todo.append((experiment, model, mix_path, workdir))
        for model in PER_STRUCTURE_MODELS:
            if model not in models:
                continue
            for base in bases:
                data = os.path.join(mix_path, "structures", base)
                workdir = os.path.join(out, "runs", "any_structure", experiment, model, base)
                todo.append((experiment, model, data, workdir))
    return todo


def table(size: registry.Size, results: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Markdown: test metric per base model (and the held-out one), mean ± std over seeds.

    ``results``: ``{(experiment, model, trained on): results.json}``, trained on ``"mix"``
    or a base preset.
    """
    from experiments.repro.tables import fmt

    bases, holdout = BASES[size.name]
    cols = (
        ["target", "model", "trained on"] + [f"test {b}" for b in bases] + [f"held out: {holdout}"]
    )
    rows = []
    for experiment, key, label in EXPERIMENTS:
        for model in MIX_MODELS + PER_STRUCTURE_MODELS:
            name = paper.MODEL_NAMES[model]
            if model in MIX_MODELS:
                r = results.get((experiment, model, "mix"))
                if r is None:
                    continue
                per = r.get("summary_per_structure", {}).get("test", {})
                cells = [_cell(per.get(b), r, key, fmt) for b in bases + (holdout,)]
                rows.append([label, name, "the mix of " + ", ".join(bases), *cells])
            else:
                cells = []
                for b in bases:
                    r = results.get((experiment, model, b))
                    cells.append(_cell(r["summary"]["test"] if r else None, r, key, fmt))
                if any(c != "-" for c in cells):
                    rows.append([label, name, "each base model alone", *cells, "n/a"])
    lines = [
        "### Any structure: one model for LoRAs of several base models (not in the paper)",
        "",
        (
            f"Arithmetic-sources LoRAs of the base LMs {', '.join(bases)} in one dataset; "
            f"{holdout} is held out (all its LoRAs in the test split). GL-net-seq and the spectral "
            "detector train once on the mix; GL-net and W2T train on each base model alone "
            "(the same splits). Test metric, mean ± std over seeds."
        ),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(summary, results, key, fmt) -> str:
    if not summary or not results:
        return "-"
    target = results["targets"][0]
    m = summary.get(target, {}).get(key)
    return fmt((m["mean"], m["std"])) if m else "-"
