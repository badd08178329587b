"""Tests of gllora.io.importer and experiments/import_adapters.py on the real adapter files.

The adapters folders are built in tmp dirs from tests/data/real_loras: a kohya LoCon,
a LyCORIS LoHa and a LoKr of the same 17 modules (ranks 2-16, three formats), given
kohya ``ss_*`` training metadata; PEFT folders; a kohya file of other modules; junk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from safetensors.numpy import load_file, save_file

from experiments import import_adapters as entry
from gllora import io
from gllora.io import dataset, importer

DATA = Path(__file__).parent / "data" / "real_loras"
LOCON = DATA / "kohya_lycoris_locon" / "kohya_lycoris_locon.safetensors"
LOHA = DATA / "lycoris_loha" / "lycoris_loha.safetensors"
LOKR = DATA / "lycoris_lokr" / "lycoris_lokr.safetensors"
KOHYA_OTHER = DATA / "kohya_from_diffusers" / "kohya_lora.safetensors"  # other module names
ROOT = Path(__file__).resolve().parent.parent


def _with_metadata(src: Path, dst: Path, **metadata) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dst), metadata={k: str(v) for k, v in metadata.items()})


def _meta(images, lr, tags):
    return {
        "ss_num_train_images": images,
        "ss_learning_rate": lr,
        "ss_tag_frequency": json.dumps({"10_set": tags}),
        "ss_output_name": "run",
        "ss_seed": "None",
    }


@pytest.fixture
def folder(tmp_path):
    """Three good kohya/LyCORIS files with metadata, a junk file, a labels CSV."""
    ad = tmp_path / "adapters"
    _with_metadata(
        LOCON, ad / "sd" / "run_10.safetensors", **_meta(12, "1e-4", {"cat": 3, " dog": 1})
    )
    _with_metadata(LOHA, ad / "sd" / "run_2.safetensors", **_meta(40, "0.0003", {"cat": 1}))
    _with_metadata(LOKR, ad / "sd" / "deep" / "c.safetensors", **_meta(7, "2e-5", {"bird": 2}))
    (ad / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    (ad / "README.md").write_text("not an adapter")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,quality,liked,style\n"
        "sd/run_10.safetensors,0.25,true,ink\n"
        "./sd/run_2.safetensors,1,false,oil\n"
        "sd/deep/c.safetensors,2.5e-3,TRUE,ink\n"
        "broken.safetensors,1,false,ink\n"
        "gone.safetensors,9,true,oil\n"
    )
    return ad, labels


def test_find_adapters(tmp_path):
    ad = tmp_path / "a"
    for rel in ("x/run_10.safetensors", "x/run_9.safetensors", "old.bin", ".hidden/h.safetensors"):
        (ad / rel).parent.mkdir(parents=True, exist_ok=True)
        (ad / rel).write_bytes(b"")
    shutil.copytree(DATA / "peft_llm" / "lora_r4_kv", ad / "peft" / "kv")
    (ad / "peft" / "kv" / "sub").mkdir()
    (ad / "peft" / "kv" / "sub" / "inner.safetensors").write_bytes(b"")
    assert importer.find_adapters(ad) == [
        "old.bin",
        "peft/kv",
        "x/run_9.safetensors",
        "x/run_10.safetensors",
    ]
    with pytest.raises(FileNotFoundError, match="no such adapters folder"):
        importer.find_adapters(tmp_path / "nope")


def test_import_skips_a_bad_file_and_keeps_the_rest(folder, tmp_path):
    ad, labels = folder
    result = importer.import_adapters(
        ad,
        tmp_path / "ds",
        labels=labels,
        progress=False,
        targets=["quality:regression", "liked:binary", "style:categorical"],
    )
    assert result.imported == [
        "sd/deep/c.safetensors",
        "sd/run_2.safetensors",
        "sd/run_10.safetensors",
    ]
    assert [s.path for s in result.skipped] == ["broken.safetensors"]
    assert result.skipped[0].reason.startswith("not a safetensors file")
    assert result.unused_labels == ["gone.safetensors"]
    assert "broken.safetensors: " in result.summary()

    ds = dataset.open(result.out)
    assert ds.columns == {"path": "str", "quality": "float", "liked": "bool", "style": "str"}
    assert ds.labels["path"].tolist() == result.imported
    assert ds.labels["quality"].tolist() == [2.5e-3, 1.0, 0.25]
    assert ds.labels["liked"].tolist() == [True, False, True]
    assert ds.targets["style"]["classes"] == ["ink", "oil"]
    assert ds.provenance["skipped"][0]["path"] == "broken.safetensors"
    assert ds.provenance["formats"] == {"lycoris_lokr": 1, "lycoris_loha": 1, "kohya_locon": 1}
    # Every module of every adapter exactly as load_adapter reads it, true ranks kept.
    for i, key in enumerate(result.imported):
        want = io.load_adapter(ad / key)
        got = ds.get(i)
        assert got.names == want.names
        for name in want.names:
            r = int(want.rank_of(name))
            assert int(got.rank_of(name)) == r
            for x, y in zip(got.factors(name), want.factors(name)):
                np.testing.assert_array_equal(np.asarray(x)[:, :r], np.asarray(y)[:, :r])
    assert ds.max_ranks() != [4] * len(ds.spec.groups)  # mixed ranks across the files


def test_metadata_columns_and_tags(folder, tmp_path):
    ad, labels = folder
    result = importer.import_adapters(
        ad,
        tmp_path / "ds",
        labels=labels,
        progress=False,
        metadata_columns=["ss_num_train_images", "ss_learning_rate", "ss_tag_frequency"],
        targets=["size:regression:ss_num_train_images", "tags:multilabel:tag.*"],
    )
    ds = dataset.open(result.out)
    assert ds.columns["ss_num_train_images"] == "int"
    assert ds.columns["ss_learning_rate"] == "float"
    assert ds.labels["ss_num_train_images"].tolist() == [7, 40, 12]
    assert ds.labels["ss_learning_rate"].tolist() == [2e-5, 3e-4, 1e-4]
    assert ds.targets["tags"]["columns"] == ["tag.bird", "tag.cat", "tag.dog"]
    np.testing.assert_array_equal(ds.target_values("tags"), [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    # Metadata is a label, never an input: the factors are those of the file without it.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(LOCON, plain / "x.safetensors")
    bare = dataset.open(importer.import_adapters(plain, tmp_path / "bare", progress=False).out)
    for a, b in zip(ds.batch([2]).u + ds.batch([2]).v, bare.batch([0]).u + bare.batch([0]).v):
        np.testing.assert_array_equal(a, b)
    assert not any(k.startswith("ss_") for k in bare.columns)

    # Tags used by one adapter only are dropped with min_tag_adapters=2.
    result = importer.import_adapters(
        ad,
        tmp_path / "ds2",
        labels=labels,
        progress=False,
        metadata_columns=["ss_tag_frequency"],
        min_tag_adapters=2,
    )
    assert [c for c in result.columns if c.startswith("tag.")] == ["tag.cat"]


def test_missing_metadata_or_labels_skip_the_file(folder, tmp_path):
    ad, labels = folder
    shutil.copy(LOCON, ad / "sd" / "no_meta.safetensors")  # no ss_* keys at all
    rows = labels.read_text() + "sd/no_meta.safetensors,,true,ink\n"
    labels.write_text(rows)
    result = importer.import_adapters(
        ad, tmp_path / "ds", labels=labels, progress=False, metadata_columns=["ss_learning_rate"]
    )
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["sd/no_meta.safetensors"].startswith("missing labels in")
    assert "['quality']" in reasons["sd/no_meta.safetensors"]
    labels.write_text(rows.replace("no_meta.safetensors,,", "no_meta.safetensors,3,"))
    result = importer.import_adapters(
        ad,
        tmp_path / "ds",
        labels=labels,
        progress=False,
        overwrite=True,
        metadata_columns=["ss_learning_rate", "ss_seed"],
    )
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["sd/no_meta.safetensors"] == "header metadata 'ss_learning_rate' is missing"
    assert reasons["sd/run_2.safetensors"] == "header metadata 'ss_seed' is None"
    # An adapter with no row in the table.
    labels.write_text("path,quality\nsd/run_2.safetensors,1\n")
    result = importer.import_adapters(
        ad, tmp_path / "ds", labels=labels, progress=False, overwrite=True
    )
    assert result.imported == ["sd/run_2.safetensors"]
    assert {s.path: s.reason for s in result.skipped}["sd/run_10.safetensors"].startswith(
        "no row for it in the labels table"
    )


def test_jsonl_labels_and_split_column(folder, tmp_path):
    ad, _ = folder
    labels = tmp_path / "labels.jsonl"
    rows = [
        {"path": "sd/run_10.safetensors", "score": 1, "name": "a", "ok": True, "split": "train"},
        {"path": "sd/run_2.safetensors", "score": 0.5, "name": "b", "ok": False, "split": "test"},
        {"path": "sd/deep/c.safetensors", "score": 2, "name": "c", "ok": True, "split": "train"},
    ]
    labels.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = importer.import_adapters(
        ad,
        tmp_path / "ds",
        labels=labels,
        progress=False,
        split_column="split",
        targets=["score:regression", "ok:binary"],
    )
    ds = dataset.open(result.out)
    assert ds.columns == {"path": "str", "score": "float", "name": "str", "ok": "bool"}
    assert ds.labels["score"].tolist() == [2.0, 0.5, 1.0]
    assert {k: v.tolist() for k, v in ds.splits.items()} == {"train": [0, 2], "test": [1]}

    labels.write_text(json.dumps({"path": "x", "v": [1]}) + "\n")
    with pytest.raises(importer.ImportAdaptersError, match="column 'v' holds a list"):
        importer.import_adapters(ad, tmp_path / "ds2", labels=labels, progress=False)
    labels.write_text('{"path": "x"}\n{"path": "x"}\n')
    with pytest.raises(
        importer.ImportAdaptersError, match=r"labels.jsonl:2: .*'x' has a second row"
    ):
        importer.import_adapters(ad, tmp_path / "ds2", labels=labels, progress=False)
    labels.write_text('{"path": "x"}\n{oops\n')
    with pytest.raises(importer.ImportAdaptersError, match=r"labels.jsonl:2: not a JSON object"):
        importer.import_adapters(ad, tmp_path / "ds2", labels=labels, progress=False)


def test_bad_tables_and_targets(folder, tmp_path):
    ad, labels = folder
    with pytest.raises(importer.ImportAdaptersError, match="no key column 'file'"):
        importer.import_adapters(
            ad, tmp_path / "x", labels=labels, key_column="file", progress=False
        )
    with pytest.raises(importer.ImportAdaptersError, match="no column matches 'qualty'"):
        importer.import_adapters(
            ad, tmp_path / "x", labels=labels, progress=False, targets=["q:regression:qualty"]
        )
    with pytest.raises(
        importer.ImportAdaptersError, match="binary target 'b': column 'quality' is float"
    ):
        importer.import_adapters(
            ad, tmp_path / "x", labels=labels, progress=False, targets=["b:binary:quality"]
        )
    with pytest.raises(importer.ImportAdaptersError, match="name:task"):
        importer.parse_target("q:ranking:quality")
    with pytest.raises(FileNotFoundError, match="no such labels table"):
        importer.import_adapters(ad, tmp_path / "x", labels=tmp_path / "nope.csv", progress=False)
    assert not (tmp_path / "x").exists()


def test_mismatched_adapters(folder, tmp_path):
    ad, labels = folder
    shutil.copy(KOHYA_OTHER, ad / "other.safetensors")
    labels.write_text(labels.read_text() + "other.safetensors,3,true,oil\n")
    with pytest.raises(importer.ImportAdaptersError) as err:
        importer.import_adapters(ad, tmp_path / "ds", labels=labels, progress=False)
    text = str(err.value)
    assert "2 different structures among 4 adapters" in text
    assert "A: 3 adapter(s) (sd/deep/c.safetensors, sd/run_2.safetensors, sd/run_10" in text
    assert "B: 1 adapter(s) (other.safetensors): 45 modules" in text
    assert (
        "against A: lacks 9 module(s): 'lora_te_text_model_encoder_layers_0_mlp_fc1' [32, 16]"
        in text
    )
    assert "against A: adds 37 module(s): 'lora_te1_text_model" in text
    assert "on_mismatch='majority'" in text and "keeping the 8 modules" in text
    assert "broken.safetensors" in text  # the skipped file is not forgotten
    assert not (tmp_path / "ds").exists()

    result = importer.import_adapters(
        ad, tmp_path / "ds", labels=labels, progress=False, on_mismatch="majority"
    )
    assert len(result.imported) == 3
    reason = {s.path: s.reason for s in result.skipped}["other.safetensors"]
    assert reason.startswith("its modules differ from the majority's (3 adapters): lacks 9")

    result = importer.import_adapters(
        ad, tmp_path / "ds2", labels=labels, progress=False, on_mismatch="intersect"
    )
    assert len(result.imported) == 4 and len(result.dropped) == 9 + 37
    ds = dataset.open(result.out)
    assert len(ds.spec.order) == 8 and all(n.startswith("lora_unet_") for n in ds.spec.order)
    assert ds.provenance["dropped_modules"] == result.dropped
    other = io.load_adapter(ad / "other.safetensors")
    name = ds.spec.order[0]
    u = np.asarray(ds.get(result.imported.index("other.safetensors")).factors(name)[0])
    r = int(other.rank_of(name))
    np.testing.assert_array_equal(u[:, :r], np.asarray(other.factors(name)[0])[:, :r])


def test_peft_folders_and_extras(tmp_path):
    ad = tmp_path / "adapters"
    shutil.copytree(DATA / "peft_llm" / "lora_r4_kv", ad / "kv")
    shutil.copytree(DATA / "peft_llm" / "lora_r8_qkvo_patterns", ad / "runs" / "qkvo")
    shutil.copytree(DATA / "peft_llm" / "dora", ad / "dora")
    result = importer.import_adapters(ad, tmp_path / "ds", progress=False, on_mismatch="intersect")
    assert result.imported == ["dora", "kv", "runs/qkvo"]
    assert result.skipped == []
    ds = dataset.open(result.out)
    assert ds.spec.order == ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")
    assert ds.spec.extras == ()  # only the DoRA adapter has magnitudes: dropped
    assert any("(extra magnitude)" in d for d in result.dropped)
    # Alone, the DoRA adapter keeps its magnitude vectors as extras.
    only = tmp_path / "only"
    shutil.copytree(DATA / "peft_llm" / "dora", only / "dora")
    ds = dataset.open(importer.import_adapters(only, tmp_path / "d2", progress=False).out)
    want = io.load_adapter(only / "dora")
    got = ds.get(0)
    for name, x in want.extras["magnitude"].items():
        np.testing.assert_array_equal(got.extras["magnitude"][name], np.asarray(x))


def _flags(argv):
    fv = flags.FlagValues()
    entry.define_flags(fv)
    fv(["import_adapters", *argv])
    return fv


def test_entrypoint_exit_status(folder, tmp_path, capsys):
    ad, labels = folder
    args = [f"--adapters={ad}", f"--labels={labels}", "--noprogress", "--target=quality:regression"]
    assert entry.run(_flags([*args, f"--out={tmp_path / 'a'}"])) == 1
    out, err = capsys.readouterr()
    assert "skipped 1" in out and "broken.safetensors: " in out and "--allow_skipped" in err
    assert dataset.open(tmp_path / "a").num_examples == 3
    assert entry.run(_flags([*args, f"--out={tmp_path / 'b'}", "--allow_skipped"])) == 0
    shutil.copy(KOHYA_OTHER, ad / "other.safetensors")
    labels.write_text(labels.read_text() + "other.safetensors,3,true,oil\n")
    assert entry.run(_flags([*args, f"--out={tmp_path / 'c'}", "--allow_skipped"])) == 2
    assert "different structures" in capsys.readouterr().err
    os.remove(ad / "broken.safetensors")
    os.remove(ad / "other.safetensors")
    assert entry.run(_flags([*args, f"--out={tmp_path / 'a'}", "--overwrite"])) == 0


def test_entrypoint_runs_as_a_module(folder, tmp_path):
    ad, labels = folder
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.import_adapters",
            f"--adapters={ad}",
            f"--labels={labels}",
            f"--out={tmp_path / 'ds'}",
            "--metadata_columns=ss_learning_rate",
            "--target=lr:regression:ss_learning_rate",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "broken.safetensors: " in proc.stdout
    assert "import:" in proc.stderr  # the progress bar
    assert dataset.open(tmp_path / "ds").targets["lr"]["columns"] == ["ss_learning_rate"]
