"""The jitted hot paths issue no LAPACK custom call.

jaxlib 0.10.2's CPU LAPACK kernels split a large batch into tasks on the thread pool that
runs them and block on them; two such calls at once (the QRs of ``u`` and of ``v``, two
trainings in one process) took every worker and stalled for ever. The models now solve
their small ``r x r`` problems in plain ``jnp`` (:mod:`gllora.linalg`); this test reads
the lowered program of every registered model's training step (with and without GL
augmentation) and prediction, and fails on any LAPACK call, batched or not, so that the
next change cannot bring one back unseen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gllora import models, testing
from gllora.lora import split_seeds, to_layout
from gllora.train import steps, tasks

SHAPES = {"a.q": (12, 10), "a.v": (12, 10), "b": (6, 10)}
S, B = 2, 4


def _lapack_calls(text: str) -> list[str]:
    return [
        line.strip() for line in text.splitlines() if "custom_call" in line and "lapack" in line
    ]


def _programs(name: str, augment: str) -> list[str]:
    target = tasks.Target(name="y", task="regression", columns=("y",), mean=(0.0,), std=(1.0,))
    setup = steps.Setup(
        model=models.build(name, num_outputs=1),
        tx=optax.adamw(1e-3),
        targets=(target,),
        layout=models.layout(name),
        augment=augment,
    )
    templates = testing.random_lora(jax.random.key(0), SHAPES, rank=3, batch_shape=(S,))
    keys = np.zeros((S, 2), np.uint32)
    scales = tuple(np.ones(2, np.float32) for _ in templates.spec.groups)
    state = jax.eval_shape(
        functools.partial(steps.create_train_state, setup), keys, templates, scales
    )
    batch = testing.random_lora(jax.random.key(1), SHAPES, rank=3, batch_shape=(S * B,))
    batch = split_seeds(to_layout(batch, "leading", setup.layout), S, setup.layout)
    y, w = jnp.zeros((S, B, 1)), jnp.ones((S, B))
    train = jax.jit(functools.partial(steps.train_step, setup)).lower(state, batch, y, w)
    one = to_layout(
        testing.random_lora(jax.random.key(2), SHAPES, rank=3, batch_shape=(B,)),
        "leading",
        setup.layout,
    )
    predict = jax.jit(functools.partial(steps.predict, setup, layout=setup.layout)).lower(
        state["params"], state["consts"], one
    )
    return [train.as_text(), predict.as_text()]


@pytest.mark.parametrize("augment", ("none", "gl"))
@pytest.mark.parametrize("name", models.names())
def test_training_step_and_prediction_issue_no_lapack_call(name, augment):
    for text in _programs(name, augment):
        assert _lapack_calls(text) == [], name


def test_the_scan_finds_a_lapack_call_where_there_is_one():
    # Negative control: the featurizer of before (thin QRs and an SVD, batched).
    def old_singular_values(u, v):
        _, r1 = jnp.linalg.qr(u)
        _, r2 = jnp.linalg.qr(v)
        return jnp.linalg.svd(r1 @ jnp.swapaxes(r2, -1, -2), compute_uv=False)

    u = jnp.ones((8, 3, 12, 4))
    text = jax.jit(old_singular_values).lower(u, u).as_text()
    assert len(_lapack_calls(text)) >= 3


@pytest.mark.slow
def test_concurrent_unpinned_svd_and_oalign_trainings_never_stall(tmp_path):
    """Two trainings at a time, unpinned, of the two models that decompose per module,
    on LoRAs with [128, 4] factors (the persona family's shapes), under a watchdog: a
    run whose metrics stop growing for 30 s while it uses under 5% of a core fails, with
    its threads' stacks printed.
    Before gllora.linalg, mlp_svd stalled in 8 of 11 such tries on this machine."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.stress_hot_paths",
            "--num=600",
            "--runs=2",
            "--parallel=2",
            "--epochs=3",
            "--stall_seconds=30",
            f"--workdir={tmp_path}",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "mlp_svd: 2/2 finished" in proc.stdout and "mlp_oalign: 2/2 finished" in proc.stdout
