"""Which of the paper's orderings of its five models hold on the built-in analogues.

For each experiment, every pair of the paper's models that its table orders (the paper's
means differ) is compared on our per-seed test metric with the Welch test of
:mod:`experiments.repro.findings` (rule 0): the pair *holds* when ours is significantly
in the paper's order, is *reversed* when significantly in the other, and is *not
distinguishable* otherwise. The report prints one paragraph per table from these counts,
naming every reversed pair; why a pair differs is a question the counts cannot answer:
BUILD_NOTES.md ("Where the reproduction differs from the paper") gives the measured
evidence for each.
"""

from __future__ import annotations

import itertools

from experiments.repro import findings, paper

#: ``experiment -> (paper table, the paper's column, our metric, table name)``.
COLUMNS = {
    "quality": (paper.TABLE2, "r2", "r2", "Table 2"),
    "attributes": (paper.TABLE3_ATTRIBUTES, "test_acc", "accuracy", "Table 3"),
    "membership": (paper.TABLE3_MEMBERSHIP, "test_acc", "accuracy", "Table 3"),
    "dataset_size": (paper.TABLE4, "test_acc", "accuracy", "Table 4"),
    "sources": (paper.TABLE5, "membership_acc", "accuracy", "Table 5"),
    "val_loss": (paper.TABLE5, "val_loss_r2", "r2", "Table 5"),
    "challenge_acc": (paper.TABLE5, "challenge_r2", "r2", "Table 5"),
}
HOLDS, REVERSED, NOISE = "holds", "reversed", "not distinguishable"


def compare(runs, experiment: str) -> list[dict]:
    """Every ordered pair of the paper's models on ``experiment`` that both ran here.

    Returns:
      ``[{"above", "below", "paper": (mean above, mean below), "ours": (...), "p",
      "standing"}]``, ``above`` the model the paper puts higher; ``p`` the one-sided
      Welch p-value of ours being in the paper's order.
    """
    table, column, key, _ = COLUMNS[experiment]
    out = []
    for a, b in itertools.combinations(paper.MODELS, 2):
        pa, pb = table[a][column][0], table[b][column][0]
        if pa == pb:
            continue  # the paper does not order them
        above, below = (a, b) if pa > pb else (b, a)
        va = findings.per_seed(runs, experiment, above, "test", key)
        vb = findings.per_seed(runs, experiment, below, "test", key)
        if va is None or vb is None or not len(va) or not len(vb):
            continue
        p_order = findings.p_greater(va, vb)
        p_reverse = findings.p_greater(vb, va)
        standing = (
            HOLDS if p_order < findings.ALPHA else REVERSED if p_reverse < findings.ALPHA else NOISE
        )
        out.append({
            "above": above, "below": below, "paper": (max(pa, pb), min(pa, pb)),
            "ours": (float(va.mean()), float(vb.mean())), "p": p_order, "standing": standing,
        })  # fmt: skip
    return out


def paragraph(runs, experiments) -> str:
    """One paragraph per table: counts of held, noisy and reversed orderings, reversals
    named with both means; empty when none of the tables' experiments ran."""
    by_table: dict[str, list[str]] = {}
    for experiment in experiments:
        if experiment not in COLUMNS:
            continue
        pairs = compare(runs, experiment)
        if not pairs:
            continue
        name = paper.MODEL_NAMES
        counts = {s: sum(p["standing"] == s for p in pairs) for s in (HOLDS, NOISE, REVERSED)}
        text = (
            f"{experiment}: of the paper's {len(pairs)} pairwise orderings, "
            f"{counts[HOLDS]} held, {counts[NOISE]} inside the seed noise, "
            f"{counts[REVERSED]} reversed"
        )
        reversed_ = [p for p in pairs if p["standing"] == REVERSED]
        if reversed_:
            text += (
                " ("
                + "; ".join(
                    f"paper {name[p['above']]} {p['paper'][0]:g} > {name[p['below']]} "
                    f"{p['paper'][1]:g}, here {p['ours'][0]:.3f} < {p['ours'][1]:.3f}"
                    for p in reversed_
                )
                + ")"
            )
        by_table.setdefault(COLUMNS[experiment][3], []).append(text + ".")
    return "\n\n".join(f"**{table}.** " + " ".join(lines) for table, lines in by_table.items())
