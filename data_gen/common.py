"""Shared machinery of the built-in dataset generators (``data_gen/*``).

Stable helpers any family may use (the flags are in :mod:`data_gen.cli`, the run every
family shares in :mod:`data_gen.family`):

- :func:`parse_size`: the ``--size`` knob (``quick``, ``paper`` or a count);
- :func:`cache_root`, :func:`cache_key`, :func:`cached`: base models pretrained once,
  deterministically from a seed, stored with orbax under a key that hashes their config
  and seed (a changed config never reuses a stale model);
- :func:`run_chunked`: the driver that feeds a fixed-shape, jitted, vmapped chunk
  function with slices of per-LoRA arrays (the last chunk padded), so one compile serves
  a whole dataset; the chunk's LoRA axis is split over every device (a
  :mod:`gllora.parallel` mesh), so a GPU node or a TPU host finetunes on all its chips;
- :func:`write_dataset`: writes factors and labels with :mod:`gllora.io.dataset`;
- :func:`peak_memory_mb`, :func:`lora_seeds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from gllora import parallel

#: Bump when a change to the generators makes cached base models invalid.
CACHE_VERSION = 1


def parse_size(size: str | int, sizes: Mapping[str, int]) -> int:
    """Number of LoRAs for a ``--size`` value.

    Args:
      size: a name in ``sizes`` (``quick``, ``paper``) or a positive integer (or its text).
      sizes: the family's named sizes.
    """
    if isinstance(size, str) and size in sizes:
        return int(sizes[size])
    try:
        n = int(size)
    except (TypeError, ValueError):
        raise ValueError(
            f"--size must be one of {sorted(sizes)} or a positive integer, got {size!r}"
        ) from None
    if n <= 0:
        raise ValueError(f"--size must be positive, got {n}")
    return n


def lora_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` per-LoRA seeds ``[n]`` int64 in ``[0, 2**31)``, drawn from ``rng``."""
    return rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# -- the base-model cache -------------------------------------------------------------


def cache_root(cache_dir: str | None = None) -> str:
    """The cache folder: ``cache_dir``, else ``$GLLORA_CACHE``, else ``~/.cache/gllora``."""
    return os.path.expanduser(
        cache_dir or os.environ.get("GLLORA_CACHE") or os.path.join("~", ".cache", "gllora")
    )


def _jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def cache_key(name: str, config: Any, seed: int) -> str:
    """``{name}-{digest}``: the digest hashes ``config`` (a dataclass or JSON-able dict),
    ``seed`` and :data:`CACHE_VERSION`, so any change gives a new entry."""
    blob = json.dumps(
        {"name": name, "config": _jsonable(config), "seed": int(seed), "version": CACHE_VERSION},
        sort_keys=True,
    )
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cached(
    name: str,
    config: Any,
    seed: int,
    build: Callable[[], tuple[Any, Mapping[str, Any]]],
    abstract: Any,
    cache_dir: str | None = None,
    regenerate: bool = False,
) -> tuple[Any, dict[str, Any], str]:
    """Loads a pretrained base model from the cache, or builds and stores it.

    Args:
      name: what is cached (part of the folder name).
      config: the model's configuration (dataclass or JSON-able dict), hashed into the key.
      seed: the pretraining seed, hashed into the key.
      build: ``() -> (params, metrics)``, pretrains deterministically.
      abstract: the params' shapes and dtypes (``jax.eval_shape`` of the init), to restore.
      cache_dir: see :func:`cache_root`.
      regenerate: build even if cached (and replace the entry).

    Returns:
      ``(params, info, path)``; ``info`` holds the config, seed, metrics, build time and
      ``"from_cache"``.
    """
    import orbax.checkpoint as ocp

    path = os.path.join(cache_root(cache_dir), cache_key(name, config, seed))
    info_file = os.path.join(path, "info.json")
    if not regenerate and os.path.exists(info_file):
        with open(info_file) as f:
            info = json.load(f)
        try:
            params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
        except Exception as e:  # orbax raises many kinds; all mean the entry is unusable
            raise ValueError(
                f"{path}: cached {name} cannot be restored ({type(e).__name__}: {e}); "
                "delete the folder or rerun with --regenerate"
            ) from e
        logging.info("%s: loaded from %s", name, path)
        return params, {**info, "from_cache": True}, path
    logging.info("%s: pretraining (cache entry %s)", name, path)
    start = time.perf_counter()
    params, metrics = build()
    params = jax.device_get(params)
    info = {
        "name": name,
        "config": _jsonable(config),
        "seed": int(seed),
        "version": CACHE_VERSION,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "build_seconds": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "params"), params)
        checkpointer.wait_until_finished()
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written entry
    except OSError:
        if os.path.exists(info_file):  # another process finished first: same content
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    logging.info("%s: pretrained in %.1f s: %s", name, info["build_seconds"], info["metrics"])
    return params, {**info, "from_cache": False}, path


# -- the chunked driver -----------------------------------------------------------------


@dataclasses.dataclass
class ChunkStats:
    """Wall-clock times of :func:`run_chunked`: the first chunk includes compilation."""

    num_items: int
    chunk: int
    num_chunks: int
    first_seconds: float = 0.0
    rest_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.first_seconds + self.rest_seconds

    def steady_rate(self) -> float:
        """Items per second after the first chunk (0 if there was only one)."""
        done = self.num_items - min(self.chunk, self.num_items)
        return done / self.rest_seconds if self.rest_seconds > 0 and done > 0 else 0.0


def run_chunked(
    fn: Callable[..., Any],
    per_item: Mapping[str, np.ndarray],
    chunk: int,
    order: Sequence[int] | None = None,
    shared: Sequence[Any] = (),
    name: str = "chunks",
    mesh: Mesh | None = None,
) -> tuple[Any, ChunkStats]:
    """Runs ``fn(*shared, **items)`` over fixed-size chunks of per-item arrays.

    ``fn`` must be a module-level jitted function that takes everything as arguments
    (base parameters in ``shared``, per-item data as keywords), so that every chunk
    reuses one compiled program; the last chunk is padded with copies of its last item,
    and the padding is dropped from the results.

    Every chunk's items are split over the devices of ``mesh`` (their leading axis; the
    arrays in ``shared`` are replicated), and ``jit`` runs each device's slice of the
    vmapped LoRA axis where it lies. A chunk holds the same ``chunk`` items as on one
    device (each call padded to a multiple of the device count), so results agree with
    one device's up to float32 rounding (each device runs a smaller batch).

    Args:
      fn: ``fn(*shared, **items) -> pytree`` of arrays with leading axis ``chunk``.
      per_item: ``{argument: pytree of [N, ...] numpy arrays}``.
      chunk: items per call.
      order: process items in this order (a permutation of ``range(N)``, e.g. sorted by
        step count so that a chunk's loop runs no longer than needed); results are in
        the original order.
      shared: leading positional arguments, the same for every chunk.
      name: for log lines.
      mesh: the devices (default :func:`gllora.parallel.make_mesh`: all of them).

    Returns:
      ``(results, stats)``: the pytree of numpy arrays ``[N, ...]``, and timings.
    """
    leaves = jax.tree_util.tree_leaves_with_path(per_item)
    sizes = {jax.tree_util.keystr(path): len(x) for path, x in leaves}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"run_chunked: per-item arrays must share their length, got {sizes}")
    if chunk <= 0:
        raise ValueError(f"run_chunked: chunk must be positive, got {chunk}")
    n = next(iter(sizes.values()))
    order = np.arange(n) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("run_chunked: order must be a permutation of range(N)")
    num_chunks = -(-n // chunk)
    stats = ChunkStats(num_items=n, chunk=chunk, num_chunks=num_chunks)
    mesh = parallel.make_mesh() if mesh is None else mesh
    width = parallel.round_up(chunk, mesh)  # items per call: the chunk, padded for the mesh
    # One device of one process: numpy straight into jit, as before meshes (a device_put
    # per chunk would add ~0.25 ms a call for nothing).
    spread = mesh.size > 1 or jax.process_count() > 1
    on_mesh = lambda x: spread and isinstance(x, (np.ndarray, np.generic, jax.Array))
    shared = jax.tree_util.tree_map(
        lambda x: parallel.put(x, parallel.replicated(mesh)) if on_mesh(x) else x, tuple(shared)
    )
    source = jax.tree_util.tree_map(np.asarray, dict(per_item)) if spread else dict(per_item)
    parts = []
    for c in range(num_chunks):
        idx = order[c * chunk : (c + 1) * chunk]
        idx = np.concatenate([idx, np.full(width - len(idx), idx[-1])])
        start = time.perf_counter()
        items = jax.tree_util.tree_map(lambda x, idx=idx: x[idx], source)
        if spread:
            split = jax.tree_util.tree_map(lambda x: parallel.split_along(mesh, x.ndim, 0), items)
            items = parallel.put(items, split)
        out = parallel.to_host(fn(*shared, **items))
        seconds = time.perf_counter() - start
        if c == 0:
            stats.first_seconds = seconds
        else:
            stats.rest_seconds += seconds
        parts.append(out)
        logging.log_every_n_seconds(
            logging.INFO, "%s: %d/%d chunks (%.1f s)", 10, name, c + 1, num_chunks, seconds
        )
    valid = np.minimum(chunk, n - np.arange(num_chunks) * chunk)
    flat = jax.tree_util.tree_map(
        lambda *xs: np.concatenate([x[:k] for x, k in zip(xs, valid)]), *parts
    )
    inverse = np.argsort(order)
    return jax.tree_util.tree_map(lambda x: x[inverse], flat), stats


# -- writing ----------------------------------------------------------------------------


def write_dataset(
    out: str,
    modules: Sequence[tuple[str, int, int]],
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    targets: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    split_seed: int,
    overwrite: bool = False,
    batch: int = 512,
) -> str:
    """Writes a dataset folder with :class:`gllora.io.dataset.DatasetWriter`.

    Args:
      out: the folder.
      modules: ``[(name, n, m)]``.
      factors: ``{name: (u [N, n, r], v [N, m, r])}``.
      labels: ``{column: [N]}``.
      targets: see the writer.
      provenance: free JSON.
      split_seed: seeds the stored 80/10/10 train/validation/test split.

    Returns:
      The folder path.
    """
    from gllora.io import dataset

    n = len(next(iter(labels.values())))
    writer = dataset.DatasetWriter(
        out, modules=modules, targets=targets, provenance=provenance, overwrite=overwrite
    )
    with writer:
        for s in range(0, n, batch):
            writer.add(
                {name: (u[s : s + batch], v[s : s + batch]) for name, (u, v) in factors.items()},
                {col: np.asarray(x)[s : s + batch] for col, x in labels.items()},
            )
        # The `with` closes with the default fractions; close() is idempotent.
        writer.close(split_seed=split_seed)
    return out
