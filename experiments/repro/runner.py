"""Running a reproduction: datasets (generated once, reused), training runs (skipped when
finished, resumed when interrupted).

Layout of the output folder ``DIR``::

    DIR/data/<dataset>/            dataset folders (reused if their provenance matches)
    DIR/runs/<experiment>/<model>/ one training run each (train_and_evaluate's workdir)
    DIR/logs/                      generator logs
    DIR/commands.json              every command run, with its wall time
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from experiments.repro import registry


class Log:
    """Prints progress; records this invocation's commands (``commands.json``) and the
    time each dataset, run and measurement took when it was produced (``timings.json``,
    kept across invocations, so a resumed reproduction still reports its full cost)."""

    def __init__(self, out: str, quiet: bool = False):
        self.out, self.quiet = out, quiet
        self.commands: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        path = os.path.join(out, "timings.json")
        if os.path.exists(path):
            with open(path) as f:
                self.timings = json.load(f)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def record(self, kind: str, key: str, command: str, seconds: float, status: str) -> None:
        with self._lock:
            self._record(kind, key, command, seconds, status)

    def _record(self, kind, key, command, seconds, status) -> None:
        if status != "reused":
            self.timings[key] = round(seconds, 1)
        self.commands.append(
            {"kind": kind, "key": key, "command": command, "status": status,
             "seconds": self.timings.get(key)}
        )  # fmt: skip
        for name, data in (("commands.json", self.commands), ("timings.json", self.timings)):
            with open(os.path.join(self.out, name), "w") as f:
                json.dump(data, f, indent=1)


# -- datasets ------------------------------------------------------------------------


def _matches(path: str, spec: registry.DatasetSpec, size: registry.Size) -> bool:
    """Whether ``path`` holds a finished dataset generated with ``spec`` at ``size``."""
    try:
        with open(os.path.join(path, "schema.json")) as f:
            prov = json.load(f)["provenance"]
    except (OSError, ValueError, KeyError):
        return False
    want_rank = spec.rank if spec.rank is not None else prov.get("rank")
    if spec.base_configs:
        return (
            prov.get("generator") == spec.module
            and str(prov.get("size")) == str(size.dataset_size[spec.family])
            and prov.get("seed") == 0
            and tuple(prov.get("base_configs", ())) == spec.base_configs
            and prov.get("holdout") == spec.holdout
        )
    return (
        prov.get("generator") == spec.module
        and str(prov.get("size")) == str(size.dataset_size[spec.family])
        and prov.get("seed") == 0
        and prov.get("rank") == want_rank
        and prov.get("base_model", {}).get("preset") == size.base_config
    )


def ensure_dataset(
    spec: registry.DatasetSpec, size: registry.Size, out: str, cache_dir: str | None, log: Log
) -> str:
    """Generates one dataset folder unless a matching one exists; returns its path."""
    path = os.path.join(out, "data", spec.name)
    args = spec.command(size, path, cache_dir)
    shown = "python " + " ".join(args)
    if _matches(path, spec, size):
        log.say(f"  data {spec.name}: reused ({path})")
        log.record("data", f"data/{spec.name}", shown, 0.0, "reused")
        return path
    if os.path.exists(path):
        args.append("--overwrite")  # an unfinished or different folder
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"data_{spec.name}.log")
    log.say(f"  data {spec.name}: {shown}")
    start = time.perf_counter()
    with open(log_path, "w") as f:
        # The generators are driven through their command lines (their modules change).
        proc = subprocess.run(
            [sys.executable, *args], check=False, stdout=f, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not _matches(path, spec, size):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{shown} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    log.say(f"  data {spec.name}: {seconds:.0f} s")
    log.record("data", f"data/{spec.name}", shown, seconds, "generated")
    return path


# -- training runs -------------------------------------------------------------------


#: Digests already computed in this process, keyed on each file's inode, size and times.
_DIGESTS: dict[tuple, str] = {}


def dataset_digest(path: str) -> str:
    """``"sha256:<hex>"`` over a dataset folder's file names and bytes.

    A run's fingerprint names its dataset by this digest, not by its path, so a folder
    moved or copied into another reproduction keeps its finished runs, and a dataset
    regenerated in place with other content does not. Each file is read once per process
    (the digest is remembered against every file's inode, size, modification and change
    times).
    """
    path = os.path.abspath(path)
    names = sorted(
        os.path.relpath(os.path.join(folder, name), path)
        for folder, _, files in os.walk(path)
        for name in files
    )
    stats = [os.stat(os.path.join(path, n)) for n in names]
    stamps = tuple(
        (n, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for n, st in zip(names, stats)
    )
    key = (path, stamps)
    if key not in _DIGESTS:
        total = hashlib.sha256()
        for name in names:
            with open(os.path.join(path, name), "rb") as f:
                total.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
        _DIGESTS[key] = "sha256:" + total.hexdigest()
    return _DIGESTS[key]


def _fingerprint(config) -> dict[str, Any]:
    """What decides a run's results (compared before a finished run is reused); the
    dataset is named by its content (:func:`dataset_digest`)."""
    keys = [
        "dataset",
        "targets",
        "model",
        "optimizer",
        "learning_rate",
        "weight_decay",
        "schedule",
        "batch_size",
        "num_epochs",
        "num_seeds",
        "seed",
        "augment",
        "input_scale",
    ]
    out = {k: config[k] for k in keys}
    out["targets"] = list(out["targets"])
    out["dataset"] = dataset_digest(config.dataset)
    out["hparams"] = dict(config.models[config.model])
    return json.loads(json.dumps(out, default=str))


def run_training(config, workdir: str) -> tuple[dict[str, Any], float, str]:
    """Trains one (experiment, model) pair unless its results exist for the same config.

    A finished run with the same fingerprint is reused; an unfinished one is resumed by
    ``train_and_evaluate``; a run made with another config (a changed sweep choice) is
    moved to ``<workdir>.old`` and trained again. Call it in a worker of
    :mod:`experiments.repro.workers`.

    Returns:
      ``(results, seconds, status)``, status ``"reused"``, ``"trained"`` or
      ``"retrained"`` (the previous run had another config).
    """
    from gllora import train  # JAX on first use

    fingerprint = _fingerprint(config)
    fp_path = os.path.join(workdir, "repro.json")
    results_path = os.path.join(workdir, "results.json")
    old, status = None, "trained"
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old["dataset"] == config.dataset:  # recorded by path, before content digests
            old["dataset"] = fingerprint["dataset"]
            with open(fp_path, "w") as f:
                json.dump(old, f, indent=1)
    if old is not None and old != fingerprint:
        shutil.rmtree(workdir + ".old", ignore_errors=True)
        os.replace(workdir, workdir + ".old")
        old, status = None, "retrained"
    if old is not None and os.path.exists(results_path):
        with open(results_path) as f:
            return json.load(f), 0.0, "reused"
    if old is None and os.path.exists(workdir):
        shutil.rmtree(workdir)  # a run of unknown config: start clean
    os.makedirs(workdir, exist_ok=True)
    with open(fp_path, "w") as f:
        json.dump(fingerprint, f, indent=1)
    start = time.perf_counter()
    with config.unlocked():
        config.progress = False
    results = train.train_and_evaluate(config, workdir)
    return results, time.perf_counter() - start, status


def headline(results: dict[str, Any]) -> str:
    """The main test metric of a run, ``name mean +- std``."""
    target = results["targets"][0]
    m = results["summary"]["test"][target]
    key = "r2" if "r2" in m else "accuracy"
    return f"test {key} {m[key]['mean']:.3f} +- {m[key]['std']:.3f}"
