"""What a reproduction of section 5 runs: sizes, datasets, experiments.

Every experiment is one dataset and one target, trained with every model (the paper's
five and the peers); the
tables, Appendix D.3 and Figure 4 are computed from those runs (Figure 4 reuses the
persona-attribute models). Sizes:

- ``paper``: the paper's dataset sizes (personas 3,900, digit subsets 2,046, arithmetic
  sources 2,000), 3 seeds, the epochs of ``experiments/configs/paper.py``;
- ``quick``: the generators' quick sizes (1,000 / 512 / 256 LoRAs), 3 seeds, the main
  job of the README (18 min 34 s on 2 CPU cores from an empty cache, BUILD_NOTES.md);
- ``tiny``: tiny base models and 80 LoRAs per dataset, 2 seeds, 2 epochs: the CI smoke
  test (every table and plot, meaningless numbers).
"""

from __future__ import annotations

import dataclasses

#: The paper's five models (the findings judge these), then the peers of issue 14 (not in
#: the paper: extra rows in every table, marked so).
PAPER_MODELS = ("mlp", "mlp_oalign", "mlp_svd", "mlp_dense", "glnet")
PEERS = ("w2t", "spectral", "glnet_seq")
MODELS = PAPER_MODELS + PEERS
#: Rank of the persona LoRAs the Figure 4 models are trained on.
TRAIN_RANK = 4


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One prediction task: a dataset family and its target(s)."""

    name: str
    family: str  # "personas", "digit_subsets", "arith_sources"
    targets: tuple[str, ...]
    table: str
    description: str


EXPERIMENTS = {
    e.name: e
    for e in (
        Experiment("quality", "personas", ("quality",), "Table 2", "persona quality score"),
        Experiment("attributes", "personas", ("attributes",), "Table 3", "persona attributes"),
        Experiment("membership", "digit_subsets", ("membership",), "Table 3", "class membership"),
        Experiment("dataset_size", "digit_subsets", ("dataset_size",), "Table 4", "dataset size"),
        Experiment("sources", "arith_sources", ("membership",), "Table 5", "source membership"),
        Experiment("val_loss", "arith_sources", ("val_loss",), "Table 5", "validation loss"),
        Experiment(
            "challenge_acc", "arith_sources", ("challenge_acc",), "Table 5", "challenge acc"
        ),
    )
}


#: Experiments beyond the paper, run only when named in ``--experiments`` (each its own
#: module: ``backdoor`` is :mod:`experiments.repro.backdoor`).
BEYOND_PAPER = ("backdoor",)


@dataclasses.dataclass(frozen=True)
class Size:
    """How big a reproduction is."""

    name: str
    dataset_size: dict[str, str | int]  # family -> the generators' --size
    base_config: str  # the generators' --base_config
    num_seeds: int
    ranks: tuple[int, ...]  # Figure 4 test ranks
    gpt3: tuple[str, ...]  # Figure 5 model sizes
    preprocess_inputs: int = 64
    forward_inputs: int = 512
    forward_batch: int = 64
    memory_cap_gb: float = 6.0


SIZES = {
    "tiny": Size(
        "tiny",
        {"personas": 80, "digit_subsets": 80, "arith_sources": 80, "backdoors": 80},
        "tiny",
        num_seeds=2,
        ranks=(1, 4, 8),
        gpt3=("125M", "350M"),
        preprocess_inputs=8,
        forward_inputs=16,
        forward_batch=8,
        memory_cap_gb=2.0,
    ),
    "quick": Size(
        "quick",
        {
            "personas": "quick",
            "digit_subsets": "quick",
            "arith_sources": "quick",
            "backdoors": "quick",
        },
        "default",
        num_seeds=3,
        ranks=(1, 2, 4, 8, 16, 32),
        gpt3=("125M", "760M", "2.7B", "13B", "175B"),
    ),
    "paper": Size(
        "paper",
        {
            "personas": "paper",
            "digit_subsets": "paper",
            "arith_sources": "paper",
            "backdoors": "paper",
        },
        "default",
        num_seeds=3,
        ranks=(1, 2, 4, 8, 16, 32),
        gpt3=("125M", "350M", "760M", "1.3B", "2.7B", "6.7B", "13B", "175B"),
    ),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset folder: a generator and its arguments."""

    name: str  # folder name under DIR/data
    family: str
    rank: int | None = None  # None: the family's default
    # Several base models into one multi-structure folder (arithmetic family only), one of
    # them held out (all its LoRAs in the test split).
    base_configs: tuple[str, ...] = ()
    holdout: str | None = None

    @property
    def module(self) -> str:
        return f"data_gen.{self.family}"

    def command(self, size: Size, out: str, cache_dir: str | None) -> list[str]:
        """The generator's command line (without the interpreter)."""
        args = [
            "-m",
            self.module,
            f"--size={size.dataset_size[self.family]}",
            f"--out={out}",
            "--seed=0",
        ]
        if self.rank is not None:
            args.append(f"--rank={self.rank}")
        if self.base_configs:
            args.append(f"--base_configs={','.join(self.base_configs)}")
            if self.holdout:
                args.append(f"--holdout={self.holdout}")
        elif size.base_config != "default":
            args.append(f"--base_config={size.base_config}")
        if cache_dir:
            args.append(f"--cache_dir={cache_dir}")
        return args


def datasets(size: Size) -> dict[str, DatasetSpec]:
    """Every dataset a reproduction of ``size`` needs, by folder name.

    The Figure 4 persona datasets of rank ``r`` share personas, images, hyperparameters
    and seeds with the rank-4 dataset (same seed and size), so their test splits hold
    the same finetunes at another rank.
    """
    out = {f: DatasetSpec(f, f) for f in ("personas", "digit_subsets", "arith_sources")}
    for r in size.ranks:
        if r != TRAIN_RANK:
            out[f"personas_r{r}"] = DatasetSpec(f"personas_r{r}", "personas", rank=r)
    return out


def rank_datasets(size: Size) -> dict[int, str]:
    """Figure 4: ``{rank: dataset folder name}``."""
    return {r: ("personas" if r == TRAIN_RANK else f"personas_r{r}") for r in size.ranks}
