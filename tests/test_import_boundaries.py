"""The import boundaries DESIGN.md (section 9) states, checked two ways.

- At run time: a fresh interpreter imports every module of a part and the test reads
  its ``sys.modules``. Readers (``gllora.io``, ``gllora.spec``, ``gllora._lora``) load
  no JAX, Flax, optax, orbax or chex; the group math (``group``, ``ops``, ``features``,
  ``linalg``) no Flax; the models no optax, orbax, safetensors, ``gllora.io`` or
  ``gllora.train``; the whole library never ``experiments`` or ``data_gen``.
- Statically, where run time cannot tell: every import statement of those files, at
  module level or inside a function (a lazy import runs only when its function does),
  is read from the source. ``TYPE_CHECKING`` blocks never run and are skipped. Models
  also call no ``open``.

Modules are found by walking the package, so a new file is covered by the rule of its
folder without a change here. Negative controls: the same checks flag ``gllora.layers``
for Flax at run time, and a file with a lazy forbidden import statically.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "gllora")

#: gllora modules that load JAX: a reader must not import them either.
JAX_MODULES = (
    "gllora.lora",
    "gllora.group",
    "gllora.ops",
    "gllora.features",
    "gllora.linalg",
    "gllora.layers",
    "gllora.models",
    "gllora.train",
    "gllora.parallel",
    "gllora.testing",
    "gllora.product_dense",
)
NO_JAX = ("jax", "jaxlib", "flax", "optax", "orbax", "chex")
#: (file, imported module): why the statement is allowed.
ALLOWED = {
    ("gllora/_lora.py", "jax.numpy"): "runs only when a JAX array was given (JAX is loaded)",
    ("gllora/_lora.py", "gllora.lora"): "runs only if JAX is loaded already",
}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def files_of(*parts: str) -> list[str]:
    """The ``.py`` files of ``gllora/<part>`` (a module file or a package folder)."""
    out = []
    for part in parts:
        path = os.path.join(PACKAGE, part)
        if path.endswith(".py"):
            out.append(path)
            continue
        for folder, _, names in os.walk(path):
            out.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return sorted(out)


READERS = files_of("io", "spec.py", "_lora.py")
GROUP_MATH = files_of("group.py", "ops.py", "features.py", "linalg.py")
MODELS = files_of("models")
LIBRARY = files_of(".")
#: (name, files, forbidden module prefixes)
RULES = (
    ("readers import no JAX", READERS, NO_JAX + JAX_MODULES),
    (
        "group math imports no Flax",
        GROUP_MATH,
        ("flax", "optax", "orbax", "gllora.layers", "gllora.models", "gllora.train"),
    ),
    (
        "models import no optax, orbax or I/O",
        MODELS,
        ("optax", "orbax", "safetensors", "gllora.io", "gllora.train"),
    ),
    ("the library never imports experiments or data_gen", LIBRARY, ("experiments", "data_gen")),
)


def _matches(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# -- at run time ------------------------------------------------------------------------

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(*modules: str) -> list[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules``."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def runtime_violations(files: list[str], forbidden) -> dict[str, list[str]]:
    """``{module: forbidden modules it loads}``; one interpreter for the lot, then one per
    module only if something was loaded (to name the culprit)."""
    names = [module_name(f) for f in files]
    if not [m for m in loaded_by(*names) if _matches(m, forbidden)]:
        return {}
    out = {}
    for name in names:
        bad = sorted({m for m in loaded_by(name) if _matches(m, forbidden)})
        if bad:
            out[name] = bad
    return out


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_boundary_holds_at_run_time(rule):
    _, files, forbidden = rule
    # A module of a part may import a lazily loaded gllora module only through its own
    # code; importing the part itself must not load the forbidden ones.
    assert runtime_violations(files, forbidden) == {}


def test_runtime_check_catches_a_violation_negative_control():
    layers = os.path.join(PACKAGE, "layers.py")
    got = runtime_violations([layers], ("flax",))
    assert list(got) == ["gllora.layers"] and "flax.linen" in got["gllora.layers"]


# -- statically -------------------------------------------------------------------------


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imported_names(path: str, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement of a file, at any depth (``from a
    import b`` gives ``a`` and ``a.b``: ``b`` may be a module)."""
    source = _read(path) if source is None else source
    tree = ast.parse(source, path)
    package = module_name(path)
    if not path.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
    return out


def static_violations(files: list[str], forbidden, sources=None) -> list[str]:
    out = []
    for path in files:
        rel = os.path.relpath(path, ROOT)
        source = None if sources is None else sources[path]
        for line, name in imported_names(path, source):
            allowed = any(_matches(name, [a]) for r, a in ALLOWED if r == rel)
            if _matches(name, forbidden) and not allowed:
                out.append(f"{rel}:{line}: imports {name}")
    return out


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_boundary_holds_in_every_import_statement(rule):
    _, files, forbidden = rule
    assert files, "no files found for the rule"
    assert static_violations(files, forbidden) == []


def test_models_do_no_io():
    calls = []
    for path in MODELS:
        for node in ast.walk(ast.parse(_read(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                calls.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert calls == []


def test_static_check_catches_lazy_imports_negative_control():
    path = os.path.join(PACKAGE, "io", "_example_reader.py")  # never written
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        import numpy as np
        if TYPE_CHECKING:
            import jax  # never runs: allowed
        def load(path):
            from gllora import lora  # runs when load does: JAX
            import experiments.cli
            return np.load(path)
        """
    )
    sources = {path: source}
    got = static_violations([path], NO_JAX + JAX_MODULES, sources)
    assert got == ["gllora/io/_example_reader.py:7: imports gllora.lora"]
    assert static_violations([path], ("experiments",), sources) == [
        "gllora/io/_example_reader.py:8: imports experiments.cli"
    ]
    # The same file without the lazy imports passes: the check is not vacuous either way.
    clean = {path: source.replace("from gllora import lora", "pass").replace("import exp", "#")}
    assert static_violations([path], NO_JAX + JAX_MODULES + ("experiments",), clean) == []
