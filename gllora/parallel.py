"""Past one device and one host: a device mesh, shardings, and ``jax.distributed``.

gllora scales with JAX's own machinery and nothing else:

- one 1-D :class:`jax.sharding.Mesh` with the axis ``"data"`` (:data:`DATA`) over the
  devices, ordered by process so that each process's devices hold one contiguous block
  of every batch;
- batches sharded along their example axis ``B`` (``u [k, n, S, B, r]``, ``rank
  [k, S, B]``, labels ``[S, B, C]``), parameters replicated; optionally the
  ``GroupedDense`` kernels (``[S, k, F, h]``: the first layer of the MLP baselines and
  GL-net's head) sharded along their fan-in ``F`` or fan-out ``h`` over the same axis,
  as in FSDP: XLA gathers them where they are used, and the parameter, its optimizer
  moments and the best-epoch copy take ``1 / num_devices`` of the memory each;
- across hosts, ``jax.distributed``: every process runs the same program, reads only the
  rows its devices hold (:func:`local_slice`) and assembles global arrays with
  :func:`host_to_global` (``jax.make_array_from_process_local_data``).

With one device and one process every helper reduces to ``jax.device_put`` on that
device; the models stay per-example and unaware of any of this: sharding enters through
the inputs, ``jit``'s ``out_shardings`` and its sharding propagation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: The name of the mesh axis the batch (and, optionally, the largest kernels) is split on.
DATA = "data"
#: Values of :func:`state_shardings`' ``shard_params`` (``config.shard_params``): which
#: axis of every ``GroupedDense`` kernel ``[..., k, F, h]`` is split over the devices.
SHARD_PARAMS = ("none", "fan_in", "fan_out")
#: Values of :func:`maybe_initialize_distributed`'s ``mode`` (the entrypoints'
#: ``--distributed``, :mod:`experiments.cli`).
DISTRIBUTED_MODES = ("auto", "on", "off")


# -- processes ----------------------------------------------------------------------


def cluster_environment(environ: dict[str, str] | None = None) -> str | None:
    """The multi-process launcher this process runs under, if any.

    ``"env"``: ``JAX_COORDINATOR_ADDRESS`` and ``JAX_NUM_PROCESSES`` are set (any
    launcher; ``JAX_PROCESS_ID`` or the launcher gives the process id); ``"slurm"``: an
    ``srun`` step of more than one task; ``"tpu"``: a Cloud TPU VM with a list of
    several workers; ``None`` otherwise (one process).
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        return "env"
    slurm = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID"))
    if slurm and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def maybe_initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when asked to, or when the environment is a cluster.

    Call it first, before anything touches a device. ``mode="on"`` always initialises
    (arguments left ``None`` are found by ``jax.distributed.initialize``: on TPU VMs,
    SLURM and Open MPI it needs none; elsewhere give all three, or the environment
    variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
    ``"auto"`` initialises when :func:`cluster_environment` sees a multi-process launch
    or a coordinator address is given; ``"off"`` never. CPU processes reduce across
    hosts with gloo.

    Returns:
      Whether ``jax.distributed`` is initialised (by this call or an earlier one).
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"mode must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    env = cluster_environment()
    if mode == "auto" and env is None and not coordinator_address:
        return False
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    # Only the CPU backend reads it; without it CPU processes cannot reduce across hosts.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info(
        "jax.distributed.initialize(%s, num_processes=%s, process_id=%s) [%s]",
        coordinator_address,
        num_processes,
        process_id,
        env or mode,
    )
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:
        raise ValueError(
            f"mode={mode!r}: cannot start jax.distributed ({e}); outside TPU VMs, SLURM and "
            "Open MPI pass coordinator_address='HOST:PORT', num_processes and process_id "
            "(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        ) from e
    return True


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across all processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# -- the mesh and shardings ---------------------------------------------------------


def make_mesh(num_devices: int = 0, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every device of every process).

    Args:
      num_devices: use the first ``num_devices`` devices (``0``: all). With several
        processes the mesh must hold all devices.
      devices: the devices to choose from (default ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    # Process-major order: each process's devices hold one contiguous block of a batch.
    devices.sort(key=lambda d: (d.process_index, d.id))
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices}: must be 0 (all) or between 1 and the "
            f"{len(devices)} devices present"
        )
    if num_devices and num_devices != len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"num_devices={num_devices}: with {jax.process_count()} processes the "
            f"mesh takes all {len(devices)} devices (0)"
        )
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), (DATA,))


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's own devices (for work each process does alone)."""
    return make_mesh(devices=jax.local_devices())


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def split_along(mesh: Mesh, ndim: int, axis: int | None) -> NamedSharding:
    """An ``ndim``-axis array split along ``axis`` over the mesh (``None``: replicated)."""
    if axis is None:
        return replicated(mesh)
    spec = [None] * ndim
    spec[axis % ndim] = DATA
    return NamedSharding(mesh, PartitionSpec(*spec))


def shardings_along(tree: Any, axes: Any, mesh: Mesh) -> Any:
    """Shardings for ``tree`` with each leaf split along the axis given by ``axes``.

    Args:
      tree: a pytree of arrays (or shape-dtype structs).
      axes: a pytree of ints with the structure of ``tree`` (e.g. :func:`gllora.lora.in_axes`
        of a batch), or one int for every leaf.
    """
    if isinstance(axes, int):
        return jax.tree_util.tree_map(lambda x: split_along(mesh, x.ndim, axes), tree)
    return jax.tree_util.tree_map(lambda x, a: split_along(mesh, x.ndim, a), tree, axes)


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    """Raises unless ``size`` splits evenly over the mesh's devices."""
    if size % mesh.size:
        raise ValueError(
            f"{what}={size} does not split over {mesh.size} devices; use a multiple of "
            f"{mesh.size} (or a mesh of fewer devices)"
        )


def round_up(size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is ``>= size``."""
    return -(-size // mesh.size) * mesh.size


def local_slice(size: int, mesh: Mesh) -> slice:
    """The rows of a length-``size`` axis split over ``mesh`` that this process's devices hold."""
    index = split_along(mesh, 1, 0).addressable_devices_indices_map((size,))
    starts = sorted(idx[0].indices(size)[:2] for idx in index.values())
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError(f"this process's devices do not hold one contiguous block of {size}")
    return slice(lo, hi)


def state_shardings(abstract: Any, mesh: Mesh, shard_params: str = "none", strict: bool = True):
    """Shardings of a training state: replicated, except ``GroupedDense`` kernels if asked.

    A ``GroupedDense`` kernel is any leaf named ``kernel_<group key>`` (``[..., k, F, h]``):
    in the parameters, the best parameters and the optimizer's moments alike.

    Args:
      abstract: the state's shapes (``jax.eval_shape``).
      mesh: the mesh.
      shard_params: ``"none"``, ``"fan_in"`` (split ``F``) or ``"fan_out"`` (split ``h``).
      strict: raise if a kernel's axis does not split evenly (else replicate that kernel).
    """
    if shard_params not in SHARD_PARAMS:
        raise ValueError(f"shard_params must be one of {SHARD_PARAMS}, got {shard_params!r}")
    axis = {"fan_in": -2, "fan_out": -1}.get(shard_params)
    found = []

    def rule(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        if axis is None or not (isinstance(name, str) and name.startswith("kernel_")):
            return replicated(mesh)
        found.append(name)
        if leaf.shape[axis] % mesh.size:
            if strict:
                raise ValueError(
                    f"shard_params={shard_params!r}: kernel {jax.tree_util.keystr(path)} "
                    f"{list(leaf.shape)} has {leaf.shape[axis]} along that axis, which does not "
                    f"split over {mesh.size} devices; use the other axis or 'none'"
                )
            return replicated(mesh)
        return split_along(mesh, leaf.ndim, axis)

    out = jax.tree_util.tree_map_with_path(rule, abstract)
    if axis is not None and not found and strict:
        raise ValueError(
            f"shard_params={shard_params!r}: the model has no GroupedDense kernel to split"
        )
    return out


# -- host data to global arrays and back ----------------------------------------------


def put(tree: Any, shardings: Any) -> Any:
    """Places host data that every process holds in full onto ``shardings``.

    Args:
      tree: a pytree of arrays, the same on every process.
      shardings: one sharding for every leaf, or a pytree of them.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, tree, shardings)


def host_to_global(local: Any, shardings: Any, global_shapes: Any) -> Any:
    """Global arrays from each process's block of rows (``jax.make_array_from_process_local_data``).

    Args:
      local: this process's rows (:func:`local_slice` of the split axis), numpy.
      shardings: a sharding per leaf (or one for all).
      global_shapes: the global shape per leaf (a pytree of tuples with ``local``'s
        structure).
    """
    if jax.process_count() == 1:
        return jax.device_put(local, shardings)
    leaves, treedef = jax.tree_util.tree_flatten(local)
    shapes = treedef.flatten_up_to(global_shapes)
    if isinstance(shardings, jax.sharding.Sharding):
        sh = [shardings] * len(leaves)
    else:
        sh = treedef.flatten_up_to(shardings)
    out = [
        jax.make_array_from_process_local_data(s, np.asarray(x), tuple(g))
        for x, s, g in zip(leaves, sh, shapes)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly global) arrays, complete on every process."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree_util.tree_map(one, tree)


def shares(num: int, num_processes: int | None = None) -> list[slice]:
    """Contiguous, near-equal shares of ``num`` items for every process, in process order."""
    count = jax.process_count() if num_processes is None else num_processes
    bounds = np.linspace(0, num, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


__all__ = [
    "DATA",
    "DISTRIBUTED_MODES",
    "SHARD_PARAMS",
    "check_divisible",
    "cluster_environment",
    "host_to_global",
    "is_main_process",
    "local_mesh",
    "local_slice",
    "make_mesh",
    "maybe_initialize_distributed",
    "put",
    "replicated",
    "round_up",
    "shardings_along",
    "shares",
    "split_along",
    "state_shardings",
    "sync",
    "to_host",
]
