"""``gllora.io`` runs on numpy alone: importing it, and reading adapters and datasets
with it, loads no JAX, Flax, optax or orbax (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "orbax", "chex")

SCRIPT = """
import json, sys
import gllora.io
from gllora import io
from gllora.io import dataset, importer
after_import = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})
lora = io.load_adapter({adapter!r})
info = io.inspect({adapter!r})
result = importer.import_adapters({folder!r}, {out!r}, progress=False)
ds = dataset.open(result.out)
batch = ds.batch([0], layout="rank_major")
print(json.dumps({{
    "after_import": after_import,
    "after_use": sorted(m for m in sys.modules if m.split(".")[0] in {forbidden}),
    "numpy": all(type(x).__module__ == "numpy" for x in lora.u + lora.v + batch.u),
    "names": list(info.names) == list(lora.names),
}}))
"""


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_use_of_gllora_io_loads_no_jax(tmp_path):
    folder = tmp_path / "adapters"
    (folder / "a").mkdir(parents=True)
    src = DATA / "real_loras" / "peft_llm" / "lora_r4_kv"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "a" / f).write_bytes((src / f).read_bytes())
    got = _run(
        SCRIPT.format(
            forbidden=set(FORBIDDEN),
            adapter=str(src),
            folder=str(folder),
            out=str(tmp_path / "ds"),
        )
    )
    assert got == {"after_import": [], "after_use": [], "numpy": True, "names": True}


def test_the_check_can_fail():
    """Negative control: the same check sees JAX where something does import it."""
    got = _run(
        "import json, sys; import gllora; gllora.Lora; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {set(FORBIDDEN)})))"
    )
    assert "jax" in got


@pytest.mark.parametrize("name", ["Lora", "stack", "in_axes", "to_layout", "LoraSpec", "io"])
def test_lazy_root_keeps_the_public_names(name):
    import gllora

    assert name in gllora.__all__ and getattr(gllora, name) is not None
    assert name in dir(gllora)


def test_unknown_root_attribute_is_an_attribute_error():
    import gllora

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gllora.nope  # noqa: B018
