"""Past one device and one host: meshes, sharded training, prediction, generation, checkpoints.

The multi-device checks run in subprocesses with 4 virtual CPU devices
(``--xla_force_host_platform_device_count=4``); the multi-host check runs two local
processes on 127.0.0.1 with ``jax.distributed`` (gloo CPU collectives). Each compares
with the plain one-device run of this process. This file is also the subprocesses'
worker: ``python tests/test_parallel.py TASK ARGS...``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT_CONFIG = os.path.join(ROOT, "tests", "data", "real_loras", "peft_llm", "lora_r4_kv")
TIMEOUT = 240  # seconds per subprocess: a hang fails the test, it never blocks the suite

#: The synthetic family's modules in sorted order, the order PEFT files load in.
MODULES = (
    ("head", 6, 8),
    ("layers.0.q", 8, 12),
    ("layers.0.v", 8, 12),
    ("layers.1.q", 8, 12),
    ("layers.1.v", 8, 12),
)


# -- data and configs shared by the tests and the workers ----------------------------


def write_data(root: str) -> tuple[str, str]:
    """A 256-LoRA synthetic dataset and a folder of 11 PEFT adapters (10 good, 1 bad)."""
    from safetensors.numpy import save_file

    from data_gen import synthetic
    from gllora.io import dataset

    data, adapters = os.path.join(root, "data"), os.path.join(root, "adapters")
    if not os.path.exists(data):
        factors, labels = synthetic.generate(256, seed=3, modules=MODULES)
        writer = dataset.DatasetWriter(data, modules=MODULES, targets=synthetic.targets(MODULES))
        writer.add(factors, labels)
        writer.close(split_seed=3)
        with open(os.path.join(PEFT_CONFIG, "adapter_config.json")) as f:
            config = json.load(f)
        config.update(r=4, lora_alpha=4, target_modules=["q", "v", "head"])
        for i in range(10):
            folder = os.path.join(adapters, f"adapter_{i}")
            os.makedirs(folder)
            tensors = {}
            for name, _, _ in MODULES:
                u, v = factors[name][0][i * 7], factors[name][1][i * 7]
                tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(v.T)
                tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(u)
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                json.dump(config, f)
        with open(os.path.join(adapters, "adapter_5b.safetensors"), "wb") as f:
            f.write(b"not a safetensors file")
    return data, adapters


def config_for(data: str, **overrides):
    from experiments.configs import default

    config = default.get_config("tiny")
    config.dataset = data
    config.progress = False
    config.model = "mlp"
    config.models.mlp.hidden = 32
    config.num_epochs = 2
    config.batch_size = 16
    config.eval_batch_size = 50
    for key, value in overrides.items():
        config[key] = value
    return config


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_results_close(a, b, rtol=1e-4, atol=None):
    """Two ``results.json``: the same best epochs, metrics equal to ``rtol``."""
    atol = rtol * 1e-2 if atol is None else atol
    assert [s["best_epoch"] for s in a["per_seed"]] == [s["best_epoch"] for s in b["per_seed"]]

    def close(x, y, where):
        if isinstance(x, dict):
            assert set(x) == set(y), where
            for k in x:
                close(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (xi, yi) in enumerate(zip(x, y)):
                close(xi, yi, f"{where}[{i}]")
        elif isinstance(x, float):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=where)
        else:
            assert x == y, where

    close(a["per_seed"], b["per_seed"], "per_seed")


def subprocess_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # as tests/conftest.py, for the same numbers
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(task: str, *args: str, devices: int = 4) -> None:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), task, *args],
        cwd=ROOT,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"worker {task} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("parallel")))


@pytest.fixture(scope="module")
def one_device_run(data, tmp_path_factory):
    """The plain run: this process, one device; ``(workdir, results)``."""
    from gllora.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("one_device") / "run")
    return workdir, train_and_evaluate(config_for(data[0], shard_params="fan_in"), workdir)


# -- in this process (one device) ---------------------------------------------------


def test_cluster_environment_and_distributed_modes(monkeypatch):
    from gllora import parallel

    assert parallel.cluster_environment({}) is None
    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0"}
    assert parallel.cluster_environment({**slurm, "SLURM_NTASKS": "1"}) is None
    assert parallel.cluster_environment({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
    assert parallel.cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert parallel.cluster_environment({"TPU_WORKER_HOSTNAMES": "a"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
    assert parallel.cluster_environment(env) == "env"
    for key in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_JOB_ID",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(key, raising=False)
    assert parallel.maybe_initialize_distributed("off") is False
    assert parallel.maybe_initialize_distributed("auto") is False  # no cluster: one process
    with pytest.raises(ValueError, match="mode must be one of"):
        parallel.maybe_initialize_distributed("yes")


def test_mesh_shardings_and_shares_on_one_device():
    import jax
    from jax.sharding import PartitionSpec as P

    from gllora import parallel

    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert parallel.local_slice(12, mesh) == slice(0, 12)
    assert parallel.round_up(5, parallel.make_mesh(1)) == 5
    with pytest.raises(ValueError, match="num_devices=99"):
        parallel.make_mesh(99)
    state = {
        "params": {"first": {"kernel_g8x12_0": np.zeros((1, 4, 96, 32)), "bias": np.zeros(32)}},
        "opt_state": ({"mu": {"first": {"kernel_g8x12_0": np.zeros((1, 4, 96, 32))}}},),
    }
    specs = jax.tree_util.tree_map(
        lambda s: s.spec, parallel.state_shardings(state, mesh, "fan_in")
    )
    assert specs["params"]["first"]["kernel_g8x12_0"] == P(None, None, "data", None)
    assert specs["opt_state"][0]["mu"]["first"]["kernel_g8x12_0"] == P(None, None, "data", None)
    assert specs["params"]["first"]["bias"] == P()
    fan_out = parallel.state_shardings(state, mesh, "fan_out")["params"]["first"]
    assert fan_out["kernel_g8x12_0"].spec == P(None, None, None, "data")
    with pytest.raises(ValueError, match="no GroupedDense kernel"):
        parallel.state_shardings({"w": np.zeros(3)}, mesh, "fan_in")
    with pytest.raises(ValueError, match="shard_params must be one of"):
        parallel.state_shardings(state, mesh, "rows")
    # Contiguous shares in process order make up the whole, in order.
    for n, p in ((10, 3), (2, 4), (0, 2)):
        shares = parallel.shares(n, p)
        assert len(shares) == p
        assert [i for s in shares for i in range(n)[s]] == list(range(n))


def test_bad_device_configs_fail_before_training(data, tmp_path):
    from gllora.train import train_and_evaluate

    with pytest.raises(ValueError, match="shard_params"):
        train_and_evaluate(config_for(data[0], shard_params="rows"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="num_devices"):
        train_and_evaluate(config_for(data[0], num_devices=64), str(tmp_path / "b"))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_run_chunked_on_one_device_is_the_plain_loop():
    import jax

    from data_gen import common
    from gllora import parallel

    x = np.arange(11, dtype=np.float32)
    seen = []

    @jax.jit
    def double(x):
        return {"x": 2 * x}

    def fn(scale, x):
        seen.append((type(x), x.shape, type(scale)))
        return double(x * scale)

    mesh = parallel.make_mesh(1)
    out, stats = common.run_chunked(fn, {"x": x}, 4, shared=(np.float32(1.0),), mesh=mesh)
    np.testing.assert_array_equal(out["x"], 2 * x)
    # Numpy straight into jit, as without a mesh (the 4-device worker checks the split).
    assert stats.num_chunks == 3 and seen[0] == (np.ndarray, (4,), np.float32)


# -- 4 virtual devices, in a subprocess ---------------------------------------------


#: Float64 unit roundoff, and a bound on the length of the longest chain of sums behind
#: any gradient entry of the test model (``mlp``, hidden 32, on 376 input features: the
#: forward dot, two hidden layers, LayerNorms, the batch mean of 16, and back again).
U64, CHAIN = 2.0**-53, 1000
GAMMA = CHAIN * U64 / (1 - CHAIN * U64)


def test_sharded_train_steps_equal_the_single_device_steps(data, tmp_path):
    """Steps of mlp on 4 devices (batch split; kernels whole, split on F, split on h; 2 seeds)
    equal the steps on one device; in-memory and streamed batches are the same arrays.

    The two differ only in the order of sums (each device sums its quarter of the batch,
    then the quarters are summed), so the comparison runs in float64, where that order
    moves a gradient entry ``g = sum_i g_i`` (``g_i``: one example's contribution, the
    worker measures ``sum_i |g_i|`` per entry) by at most ``2 gamma_N sum_i |g_i|``
    (Higham, Accuracy and Stability, 3.1: any order of summation, ``N`` the chain length).
    One AdamW step is compared through its moments (``mu = (1 - b1) g``, ``nu = (1 - b2)
    g^2``) and the parameters (``|d update| <= lr |d g| / eps``: Adam divides by
    ``sqrt(nu) + eps``, most sensitive where ``g ~ 0``). Three SGD-momentum steps are
    linear in the gradients: parameters move by ``lr (1 + (1 + b) + (1 + b + b^2)) d g``.
    In float32 the same reorder moved Adam's parameters by 1.5e-6 on another machine,
    because there ``d g / eps`` is not small: hence float64.
    """
    run_worker("steps", str(tmp_path), os.path.dirname(data[0]))
    got = read_json(tmp_path / "steps.json")
    ref = np.load(tmp_path / "steps_1.npz")
    abs_sum = np.load(tmp_path / "abs_grad_sum.npz")  # sum_i |g_i| per entry, per step
    lr, eps, b1, b2, momentum = 1e-3, 1e-8, 0.9, 0.999, 0.9
    for variant in ("none", "fan_in", "fan_out"):
        new = np.load(tmp_path / f"steps_4_{variant}.npz")
        assert sorted(new) == sorted(ref)
        for key in ref:
            if key.startswith("loss"):
                continue
            what, leaf = key.split("/", 1)
            dg = [2 * GAMMA * abs_sum[f"{t}/{leaf}"] for t in range(3)]
            bound = {
                "adam_grad": dg[0],
                "adam_mu": (1 - b1) * dg[0],
                "adam_nu": (1 - b2) * dg[0] * (2 * np.abs(ref[f"adam_grad/{leaf}"]) + dg[0]),
                "adam_params": lr * dg[0] / eps,
                "sgd_params": lr
                * (dg[0] * (3 + 2 * momentum + momentum**2) + dg[1] * (2 + momentum) + dg[2]),
            }[what]
            # One float64 rounding of the value compared, on top.
            bound = bound + 4 * U64 * np.abs(ref[key])
            diff = np.abs(new[key] - ref[key])
            assert np.all(diff <= bound), (variant, key, float(diff.max()), float(bound.max()))
        # The losses are forward passes on the same parameters and data at step 0.
        np.testing.assert_allclose(new["loss/adam"][0], ref["loss/adam"][0], rtol=1e-12)
    # The bounds are not vacuous: float32 reduction noise alone (2^-24 per rounding)
    # would exceed them, and the parameters did move by far more than them.
    moved = np.abs(ref["adam_params/['first']['bias']"] - np.load(tmp_path / "init.npz")["bias"])
    assert moved.max() > 1e3 * (lr * 2 * GAMMA * abs_sum["0/['first']['bias']"] / eps).max()
    assert got["kernel_spec"] == {
        "none": "P()",
        "fan_in": "P(None, None, 'data', None)",
        "fan_out": "P(None, None, None, 'data')",
    }
    # Each device holds a quarter of a split kernel (F = 2 * 8 * 4 + ... per group).
    assert got["kernel_shard_fraction"] == {"none": 1.0, "fan_in": 0.25, "fan_out": 0.25}
    assert got["streamed_equals_in_memory"] is True
    assert "does not split over 3 devices" in got["indivisible_error"]
    assert "config.batch_size=18 does not split over 4 devices" in got["batch_error"]


def test_sharded_prediction_and_generation_equal_unsharded(data, one_device_run, tmp_path):
    """Predictor, predict_inputs (dataset and adapter folders), evaluate_workdir and
    run_chunked on 4 devices give the one-device numbers."""
    workdir, _ = one_device_run
    run_worker("predict", str(tmp_path), os.path.dirname(data[0]), workdir)
    got = read_json(tmp_path / "predict.json")
    for what in ("dataset", "adapters", "evaluate", "chunked"):
        one, four = got[what]["1"], got[what]["4"]
        np.testing.assert_allclose(
            np.asarray(_numbers(four)), np.asarray(_numbers(one)), rtol=1e-5, atol=1e-6
        )
    assert got["dataset"]["keys"] == [str(i) for i in range(256)]
    assert got["adapters"]["keys"] == [f"adapter_{i}" for i in range(10)]
    assert got["adapters"]["failures"] == ["adapter_5b.safetensors"]
    # 6 items a chunk as on one device, each call padded to 8 and split over 4 devices.
    plain = [6, "None", "None"]
    assert got["chunked_calls"] == [plain, plain] + [[8, "P('data', None)", "P()"]] * 2


def _numbers(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_checkpoint_written_on_four_devices_restores_and_resumes_on_one(data, tmp_path):
    """A run trained on 4 devices (kernels split on F) equals the one-device run; its
    checkpoint restores on one device, predicts the same, and a run resumed there from
    its first-epoch checkpoint ends with the same results.

    Both trainings run in float64 (two epochs of AdamW): a reordered float32 sum moves a
    near-zero gradient by ~1e-8, which Adam's division by ``sqrt(nu) + 1e-8`` turns into
    a parameter change of ~lr, so float32 runs agree only to a machine-dependent few
    1e-6. In float64 the same reorder starts at ~1e-16; ``rtol = 1e-9`` leaves seven
    orders of magnitude for Adam to amplify it over the run's 28 steps, while any
    difference in what the runs compute (a batch row on the wrong device, a gradient not
    summed over devices) changes the metrics at 1e-3 or more.
    """
    root = os.path.dirname(data[0])
    run_worker("train", str(tmp_path), root)  # 4 devices
    run_worker("train_one", str(tmp_path), root, devices=1)
    results4 = read_json(tmp_path / "run4" / "results.json")
    assert_results_close(results4, read_json(tmp_path / "run1" / "results.json"), rtol=1e-9)
    # Restored on one device: a forward pass, reordered sums only (float64).
    np.testing.assert_allclose(
        np.load(tmp_path / "outputs_restored.npy"), np.load(tmp_path / "outputs4.npy"), rtol=1e-12
    )
    assert read_json(tmp_path / "restored.json") == {"mesh_size": 1, "checkpoints": 2}
    assert_results_close(read_json(tmp_path / "resumed" / "results.json"), results4, rtol=1e-9)


# -- two processes, jax.distributed on 127.0.0.1 -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(args: list[str], x64: bool = False) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = {**subprocess_env(1), **({"JAX_ENABLE_X64": "1"} if x64 else {})}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *args,
                "--distributed=on",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


_PROBE = textwrap.dedent(
    """
    import sys, jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    from jax.experimental import multihost_utils
    assert multihost_utils.process_allgather(np.float32(1)).sum() == 2
    """
)


def _skip_unless_platform_runs_two_processes(failed: subprocess.CompletedProcess) -> None:
    """Skips (printing why) if two jax.distributed processes cannot run here at all."""
    port = _free_port()
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROBE, f"127.0.0.1:{port}", str(i)],
            env=subprocess_env(1),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in probes]
    if any(p.returncode for p in probes):
        reason = "this platform cannot run two jax.distributed CPU processes: " + errors[0][-500:]
        print(reason)
        pytest.skip(reason)
    raise AssertionError(f"the two-process run failed:\n{failed.stderr[-4000:]}")


@pytest.mark.slow
def test_two_processes_train_evaluate_and_predict_like_one(data, tmp_path):
    """``experiments.train``, ``.evaluate`` and ``.predict`` as two jax.distributed
    processes agree with one process: training with the global batch split over them
    (2 seeds, the split in device memory), evaluation streaming each process's rows,
    prediction of each process's share of the adapter files merged into one CSV.

    Training runs in float64 on both sides, for the reason (and with the tolerance) of
    ``test_checkpoint_written_on_four_devices_restores_and_resumes_on_one``.
    """

    dataset_path, adapters = data
    workdir = str(tmp_path / "two")
    config_args = [
        "--config=experiments/configs/default.py:tiny",
        f"--config.dataset={dataset_path}",
        "--config.progress=false",
        "--config.model=mlp_svd",
        "--config.num_epochs=2",
        "--config.num_seeds=2",
        "--config.batch_size=16",
        "--config.eval_batch_size=50",
        "--config.dtype=float64",
    ]
    trained = _launch_pair(
        ["-m", "experiments.train", *config_args, f"--workdir={workdir}"], x64=True
    )
    if any(p.returncode for p in trained):
        _skip_unless_platform_runs_two_processes(trained[0])
    assert "results:" in trained[0].stdout and "results:" not in trained[1].stdout
    subprocess.run(
        [sys.executable, "-m", "experiments.train", *config_args, f"--workdir={tmp_path / 'one'}"],
        cwd=ROOT,
        env={**subprocess_env(1), "JAX_ENABLE_X64": "1"},
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    one = read_json(tmp_path / "one" / "results.json")
    assert_results_close(read_json(os.path.join(workdir, "results.json")), one, rtol=1e-9)

    evaluated = _launch_pair(["-m", "experiments.evaluate", f"--workdir={workdir}"], x64=True)
    assert [p.returncode for p in evaluated] == [0, 0], evaluated[0].stderr[-3000:]
    again = read_json(os.path.join(workdir, "evaluation_test.json"))["per_seed"]
    assert_results_close(
        {"per_seed": [{"best_epoch": 0, "test": m} for m in again]},
        {"per_seed": [{"best_epoch": 0, "test": s["test"]} for s in one["per_seed"]]},
        rtol=1e-9,
    )

    out2 = str(tmp_path / "two.csv")
    predicted = _launch_pair(
        [
            "-m",
            "experiments.predict",
            f"--workdir={workdir}",
            f"--inputs={adapters}",
            f"--out={out2}",
        ],
        x64=True,
    )
    assert [p.returncode for p in predicted] == [1, 1]  # one unreadable file, on every process
    assert "adapter_5b.safetensors" in predicted[0].stderr
    assert not [f for f in os.listdir(tmp_path) if ".part-" in f]
    out1 = str(tmp_path / "one.csv")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.predict",
            f"--workdir={tmp_path / 'one'}",
            f"--inputs={adapters}",
            f"--out={out1}",
        ],
        cwd=ROOT,
        env={**subprocess_env(1), "JAX_ENABLE_X64": "1"},
        capture_output=True,
        timeout=TIMEOUT,
    )
    with open(out1) as f1, open(out2) as f2:
        a, b = list(csv.reader(f1)), list(csv.reader(f2))
    assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose(
        np.asarray([r[1:] for r in b[1:]], float),
        np.asarray([r[1:] for r in a[1:]], float),
        rtol=1e-9,
        atol=1e-11,
    )


# -- the workers ------------------------------------------------------------------------


def _worker_steps(out: str, root: str) -> None:
    import functools

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # see the test's docstring

    from gllora import parallel
    from gllora.io import dataset
    from gllora.train import loop, pipeline, steps, tasks
    from gllora.train import state as state_lib

    data, _ = write_data(root)
    ds = dataset.open(data)
    splits = loop.read_splits(ds)
    ranks = ds.max_ranks()
    report = {"kernel_spec": {}, "kernel_shard_fraction": {}}
    seeds = [0, 1]
    f64 = lambda tree: jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )
    leaves = lambda tree: {
        jax.tree_util.keystr(p): np.asarray(parallel.to_host(x))
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }

    def run(mesh, shard_params, optimizer, num_steps, abs_sums=None):
        config = config_for(
            data, shard_params=shard_params, num_seeds=2, optimizer=optimizer, dtype="float64"
        )
        targets = tasks.resolve(ds, tuple(config.targets), splits["train"])
        labels = tasks.encode(ds, targets).astype(np.float64)
        setup = steps.make_setup(config, targets, 10)
        state, placed = state_lib.initial(config, ds, splits["train"], ranks, seeds, setup, mesh)
        step_fn = jax.jit(
            functools.partial(steps.train_step, setup),
            out_shardings=(placed, parallel.replicated(mesh)),
        )
        source = pipeline.Source(ds, ranks, splits["train"], mesh, setup.layout)
        w = parallel.put(np.ones((2, 16)), parallel.split_along(mesh, 2, 1))
        losses, init = [], leaves(state["params"])
        for t, ids in enumerate(pipeline.step_indices(seeds, splits["train"], 16, 0, num_steps)):
            batch = f64(source.read(ids))
            y = parallel.put(labels[ids], parallel.split_along(mesh, 3, 1))
            if abs_sums is not None:  # sum_i |g_i| per entry, on the one-device run
                for leaf, x in leaves(_abs_grad_sum(setup, state, batch, y, t)).items():
                    abs_sums[f"{t}/{leaf}"] = x
            state, loss = step_fn(state, batch, y, w)
            losses.append(parallel.to_host(loss))
        kernel = next(
            x
            for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
            if "kernel_" in jax.tree_util.keystr(p)
        )
        report["kernel_spec"][shard_params] = str(kernel.sharding.spec)
        report["kernel_shard_fraction"][shard_params] = (
            kernel.addressable_shards[0].data.size / kernel.size
        )
        return state, np.stack(losses), init

    def record(mesh, shard_params, abs_sums=None):
        adam, adam_loss, init = run(mesh, shard_params, "adamw", 1)
        mu = adam["opt_state"][0].mu
        flat = {f"adam_params/{k}": x for k, x in leaves(adam["params"]).items()}
        flat.update({f"adam_mu/{k}": x for k, x in leaves(mu).items()})
        flat.update({f"adam_nu/{k}": x for k, x in leaves(adam["opt_state"][0].nu).items()})
        flat.update({f"adam_grad/{k}": x / 0.1 for k, x in leaves(mu).items()})
        # Same initial state, batches and keys as the Adam run: its step-0 sums serve both.
        sgd, _, _ = run(mesh, shard_params, "sgd", 3, abs_sums)
        flat.update({f"sgd_params/{k}": x for k, x in leaves(sgd["params"]).items()})
        flat["loss/adam"] = adam_loss
        return flat, init

    abs_sums = {}
    one, init = record(parallel.make_mesh(1), "none", abs_sums)
    np.savez(os.path.join(out, "steps_1.npz"), **one)
    np.savez(os.path.join(out, "abs_grad_sum.npz"), **abs_sums)
    np.savez(os.path.join(out, "init.npz"), bias=init["['first']['bias']"])
    for variant in ("none", "fan_in", "fan_out"):
        flat, _ = record(parallel.make_mesh(4), variant)
        np.savez(os.path.join(out, f"steps_4_{variant}.npz"), **flat)
    # The same batch gathered from device memory and streamed (each device's rows).
    mesh = parallel.make_mesh(4)
    ids = next(pipeline.step_indices([0, 1], splits["train"], 16, 5, 6))
    resident = pipeline.Source(ds, ranks, splits["train"], mesh, "rank_major").read(ids)
    streamed = pipeline.Source(ds, ranks, None, mesh, "rank_major").read(ids)
    pairs = zip(jax.tree_util.tree_leaves(resident), jax.tree_util.tree_leaves(streamed))
    report["streamed_equals_in_memory"] = all(
        a.sharding == b.sharding and np.array_equal(a, b) for a, b in pairs
    )
    try:
        parallel.state_shardings(
            {"kernel_g": np.zeros((1, 4, 8, 32))}, parallel.make_mesh(3), "fan_in"
        )
    except ValueError as e:
        report["indivisible_error"] = str(e)
    try:
        loop.train_and_evaluate(config_for(data, batch_size=18), os.path.join(out, "bad"))
    except ValueError as e:
        report["batch_error"] = str(e)
    with open(os.path.join(out, "steps.json"), "w") as f:
        json.dump(report, f)


def _abs_grad_sum(setup, state, batch, y, step):
    """``sum_i |g_i|`` per parameter entry (seed axis first): ``g_i`` is example ``i``'s
    share of the gradient of the batch-mean loss, with the train step's dropout keys.

    Each example is a batch of one inside ``vmap``: the models' custom batching rules
    (gllora.ops) are differentiable under ``grad`` of ``vmap`` only.
    """
    import jax
    import jax.numpy as jnp

    from gllora import parallel
    from gllora.lora import batch_axes, seed_axes
    from gllora.train import steps, tasks

    host = (state["params"], state["consts"], state["key"], batch, y)
    params, consts, key_data, batch, y = jax.tree_util.tree_map(parallel.to_host, host)
    S, B = y.shape[:2]

    @jax.jit
    def grad_i(params, consts, key_data, x, y_i, i):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
        k = jax.random.split(key, B)[i][None]

        def loss_i(p):
            out = jax.vmap(
                lambda x, k: steps.apply(setup, p, consts, x, train=True, key=k),
                in_axes=(batch_axes(x, setup.layout), 0),
            )(x, k)
            return tasks.loss(setup.targets, out, y_i[None], jnp.ones((1,), y_i.dtype)) / B

        return jax.grad(loss_i)(params)

    def take(tree, axes, j):  # index j of the given axes, kept as an axis of size 1
        return jax.tree_util.tree_map(lambda a, ax: np.take(a, [j], axis=ax), tree, axes)

    per_seed = []
    for s in range(S):
        lora_s = jax.tree_util.tree_map(
            lambda a, ax: np.take(a, s, axis=ax), batch, seed_axes(batch, setup.layout)
        )
        p_s = jax.tree_util.tree_map(lambda a: a[s], (params, consts, key_data))
        acc = None
        for i in range(B):
            x = take(lora_s, batch_axes(lora_s, setup.layout), i)
            g = jax.tree_util.tree_map(lambda a: np.abs(np.asarray(a)), grad_i(*p_s, x, y[s, i], i))
            acc = g if acc is None else jax.tree_util.tree_map(np.add, acc, g)
        per_seed.append(acc)
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_seed)


def _worker_predict(out: str, root: str, workdir: str) -> None:
    import jax
    import jax.numpy as jnp

    from data_gen import common
    from gllora import parallel
    from gllora.train import Predictor, evaluation
    from gllora.train.predictor import predict_inputs

    data, adapters = write_data(root)  # written by the test already: reused
    report = {}
    for n in (1, 4):
        mesh = parallel.make_mesh(n)
        predictor = Predictor.from_workdir(workdir, mesh)
        for what, inputs in (("dataset", data), ("adapters", adapters)):
            rows, failures = predict_inputs(predictor, inputs, batch_size=30)
            entry = report.setdefault(what, {})
            key = "id" if what == "dataset" else "path"  # keyed as the labels are
            entry[str(n)] = [
                {k: np.asarray(v).tolist() for k, v in r.items() if k != key} for r in rows
            ]
            entry["keys"] = [r[key] for r in rows]
            entry["failures"] = [k for k, _ in failures]
        report.setdefault("evaluate", {})[str(n)] = evaluation.evaluate_workdir(
            workdir, "test", mesh=mesh
        )["per_seed"]

    @jax.jit
    def finetune(base, steps, x):
        # Per-item loops as long as the chunk's longest (a reduction across devices).
        def one(n, x0):
            body = lambda i, x: jnp.where(i < n, jnp.tanh(base @ x + 0.1 * i), x)
            return jax.lax.fori_loop(0, steps.max(), body, x0)

        return {"x": jax.vmap(one)(steps, x), "n": steps * 2}

    rng = np.random.default_rng(0)
    items = {
        "steps": rng.integers(1, 6, 11).astype(np.int32),
        "x": rng.normal(size=(11, 5)).astype(np.float32),
    }
    base = rng.normal(size=(5, 5)).astype(np.float32) / 3
    calls = []

    def fn(base, **kw):  # records the size and placement of every call
        spec = lambda a: str(getattr(getattr(a, "sharding", None), "spec", None))
        calls.append([kw["x"].shape[0], spec(kw["x"]), spec(base)])
        return finetune(base, **kw)

    for n in (1, 4):
        res, _ = common.run_chunked(
            fn,
            items,
            6,
            order=np.argsort(-items["steps"]),
            shared=(base,),
            mesh=parallel.make_mesh(n),
        )
        report.setdefault("chunked", {})[str(n)] = {k: v.tolist() for k, v in res.items()}
    report["chunked_calls"] = calls
    with open(os.path.join(out, "predict.json"), "w") as f:
        json.dump(report, f)


def _worker_train(out: str, root: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    from gllora.io import dataset
    from gllora.train import Predictor, train_and_evaluate

    data, _ = write_data(root)
    workdir = os.path.join(out, "run4")
    config = config_for(data, shard_params="fan_in", num_devices=4, dtype="float64")
    train_and_evaluate(config, workdir)
    predictor = Predictor.from_workdir(workdir)
    assert predictor.mesh.size == 4
    np.save(
        os.path.join(out, "outputs4.npy"),
        predictor.outputs(dataset.open(data).batch(np.arange(40))),
    )


def _worker_train_one(out: str, root: str) -> None:
    """One device: the same run, the 4-device checkpoint restored, and resumed."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from gllora.io import dataset
    from gllora.train import Predictor, train_and_evaluate

    data, _ = write_data(root)
    config = config_for(data, shard_params="fan_in", num_devices=1, dtype="float64")
    train_and_evaluate(config, os.path.join(out, "run1"))
    workdir4 = os.path.join(out, "run4")
    predictor = Predictor.from_workdir(workdir4)  # saved on 4 devices, restored on 1
    np.save(
        os.path.join(out, "outputs_restored.npy"),
        predictor.outputs(dataset.open(data).batch(np.arange(40))),
    )
    resumed = os.path.join(out, "resumed")
    shutil.copytree(workdir4, resumed)
    steps = sorted(int(p) for p in os.listdir(os.path.join(resumed, "checkpoints")) if p.isdigit())
    with open(os.path.join(out, "restored.json"), "w") as f:
        json.dump({"mesh_size": predictor.mesh.size, "checkpoints": len(steps)}, f)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(steps[-1])))
    os.remove(os.path.join(resumed, "results.json"))
    train_and_evaluate(config, resumed)


if __name__ == "__main__":
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    workers = {
        "steps": _worker_steps,
        "predict": _worker_predict,
        "train": _worker_train,
        "train_one": _worker_train_one,
    }
    workers[sys.argv[1]](*sys.argv[2:])
