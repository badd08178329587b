"""--base_configs: one family finetuned on several base LMs into one multi-structure folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_gen import multi
from data_gen.arith import sources
from gllora.io.dataset.multi import MultiDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bad_base_configs_fail_before_any_work(tmp_path):
    for bad, holdout, match in (
        (["tiny"], None, "two or more distinct"),
        (["tiny", "tiny"], None, "two or more distinct"),
        (["tiny", "tiny_deep"], "tiny_mid", "not one of"),
        (["tiny", "tiny_deep"], "tiny_deep", "at least two other"),
    ):
        with pytest.raises(ValueError, match=match):
            multi.run_multi(sources.FAMILY, str(tmp_path / "x"), bad, holdout, size=4)
    assert not os.path.exists(tmp_path / "x")
    proc = subprocess.run(
        [sys.executable, "-m", "data_gen.arith_sources", f"--out={tmp_path / 'y'}", "--holdout=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "--holdout needs --base_configs" in proc.stderr


@pytest.mark.slow
def test_two_depths_and_a_held_out_one_in_one_folder(tmp_path):
    out = str(tmp_path / "mix")
    multi.run_multi(
        sources.FAMILY, out, ["tiny", "tiny_deep", "tiny_mid"], "tiny_mid", size=12,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    ds = MultiDataset(out)
    assert ds.names() == ["tiny", "tiny_deep", "tiny_mid"] and ds.num_examples == 36
    layers = [len(sub.spec.order) // 2 for _, sub in ds.structures]
    assert layers == [2, 4, 3]
    held = ds.structures[2][1]
    assert set(held.splits) == {"test"} and len(held.splits["test"]) == 12
    assert set(range(24, 36)) <= set(ds.splits["test"].tolist())
    with open(os.path.join(out, "schema.json")) as f:
        prov = json.load(f)["provenance"]
    assert prov["holdout"] == "tiny_mid" and prov["generator"] == "data_gen.arith_sources"
    assert [prov["structures"][p]["seed"] for p in ds.names()] == [0, 1000, 2000]
    # Different seeds: different finetunes, not one recipe on three base models.
    a, b = ds.structures[0][1], ds.structures[1][1]
    assert not np.array_equal(a.labels["log10_learning_rate"], b.labels["log10_learning_rate"])
