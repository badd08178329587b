"""``python -m experiments.inspect``, run as a user runs it: output and exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MORE = ROOT / "tests" / "data" / "more_loras"
REAL = ROOT / "tests" / "data" / "real_loras"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_reports_format_modules_and_what_is_not_low_rank():
    out = run(str(MORE / "peft_modules_to_save"), str(MORE / "wan_native" / "wan_lora.safetensors"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "format peft: 2 modules in 2 shapes" in text
    assert "1 x lora linear [32, 32] rank 4, scale 2 (alpha 8)" in text
    assert "not a low-rank delta: base_model.model.lm_head.weight F32 [64, 32]" in text
    assert "modules_to_save ('lm_head')" in text
    assert "format comfyui: 4 modules" in text and "dense linear [16, 16] rank 16" in text
    assert "norm3.diff F32 [16]: a dense difference of a vector" in text
    assert "extra input 'bias' on 3 modules" in text
    assert out.stderr == ""


def test_refused_files_are_listed_with_the_reason_and_exit_1(tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    shutil.copy(MORE / "lycoris_glora" / "lycoris_glora.safetensors", folder / "glora.safetensors")
    shutil.copy(
        MORE / "lycoris_dora_in" / "lycoris_dora_in.safetensors", folder / "dora.safetensors"
    )
    shutil.copytree(REAL / "peft_llm" / "lora_r4_kv", folder / "peft_run")
    out = run(str(folder))
    assert out.returncode == 1
    assert (
        "glora.safetensors\n  REFUSED: module 'lycoris_conv': a LyCORIS GLoRA module" in out.stdout
    )
    assert "extra input 'magnitude_in' on 3 modules" in out.stdout
    assert "note: DoRA scale per input column" in out.stdout
    assert f"{folder / 'peft_run'}\n  format peft: 4 modules" in out.stdout
    assert out.stderr.strip() == "inspect: 1 of 3 adapters cannot be read (listed above)"


def test_json_is_one_object_per_adapter():
    out = run(
        "--json", str(MORE / "flux_kohya" / "flux_kohya.safetensors"), str(MORE / "lycoris_boft")
    )
    assert out.returncode == 1
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["format"] == "kohya" and first["modules"] == 4
    qkv = [g for g in first["module_groups"] if g["first"].endswith("img_attn_qkv")]
    assert qkv[0]["rank"] == 6 and abs(qkv[0]["scale"] - 2 / 6) < 1e-12
    assert "BOFT" in second["refused"]


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    for args, message in (
        ((str(tmp_path / "nope"),), f"inspect: error: {tmp_path / 'nope'}: no such file or folder"),
        ((), "inspect: error: give at least one adapter file or folder"),
        ((str(tmp_path),), f"inspect: error: no adapters under {tmp_path}"),
    ):
        out = run(*args)
        assert out.returncode == 2, args
        assert out.stderr.strip() == message and out.stdout == ""
