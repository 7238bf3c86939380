"""gpunet.distributed: the single-process communicator, and MPI collectives on 2 real ranks.

The 2-rank tests launch ``mpiexec -n 2 python -m mpi4py`` (the mpich wheel of the ``mpi``
extra brings mpiexec); without mpi4py they skip, unless GPUNET_REQUIRE_MPI=1 (as in CI).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpunet import distributed

ROOT = Path(__file__).resolve().parents[1]


def mpiexec():
    """The mpiexec beside this Python (the mpich wheel's), else the one on PATH."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        if os.environ.get("GPUNET_REQUIRE_MPI") == "1":
            raise
        pytest.skip(f'mpi4py is not installed (pip install -e ".[mpi]"): {exc}')
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        if os.environ.get("GPUNET_REQUIRE_MPI") == "1":
            raise RuntimeError("mpiexec not found")
        pytest.skip("mpiexec not found")
    return found


def run_ranks(code: str, n: int = 2, timeout: float = 60) -> list[str]:
    """Run ``code`` on n ranks; returns each rank's stdout (lines prefixed 'RANK r: ')."""
    script = textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPUNET_CPU_KERNELS=os.environ.get("GPUNET_CPU_KERNELS", "1"))
    proc = subprocess.run([mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", "-c", script],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_one_process_is_the_identity():
    comm = distributed.init(False)
    x = np.arange(5.0)
    assert comm.allreduce_mean_(x) is x and comm.broadcast_(x) is x and comm.allreduce_sum_(x) is x
    np.testing.assert_array_equal(x, np.arange(5.0))
    assert (comm.rank, comm.size, comm.local_rank, comm.is_root) == (0, 1, 0, True)
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    distributed.check_same_everywhere(comm, {"lr": 0.1})  # nothing to disagree with


@pytest.mark.parametrize("rows,size", [(10, 2), (7, 2), (1, 2), (0, 3), (128, 3), (5, 8)])
def test_shards_cover_the_rows_once(rows, size):
    shards = []
    for rank in range(size):
        comm = distributed.Communicator()
        comm.rank, comm.size = rank, size
        shards.append(distributed.shard(rows, comm))
    assert shards[0][0] == 0 and shards[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    lengths = [stop - start for start, stop in shards]
    assert max(lengths) - min(lengths) <= 1


def test_distributed_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.DistributedError, match=r'pip install -e "\.\[mpi\]"'):
        distributed.init(True)


def test_collectives_on_two_ranks():
    out = run_ranks("""
        import numpy as np
        from gpunet import distributed
        comm = distributed.init(True)
        r = comm.rank
        for dtype in (np.float32, np.float64):
            x = np.arange(6, dtype=dtype) * (r + 1)         # rank 0: 0..5, rank 1: 0..10
            comm.allreduce_mean_(x)
            assert x.dtype == dtype and np.allclose(x, np.arange(6) * 1.5), x
            s = np.full(3, r + 1.0, dtype)
            comm.allreduce_sum_(s)
            assert np.array_equal(s, np.full(3, 3.0)), s
            b = np.full(4, float(r), dtype)
            comm.broadcast_(b, root=1)
            assert np.array_equal(b, np.ones(4)), b
        assert comm.broadcast_object({"seed": r}) == {"seed": 0}
        comm.barrier()
        print(f"RANK {r}: ok size={comm.size} local_rank={comm.local_rank}")
    """)
    assert "RANK 0: ok size=2 local_rank=0" in out and "RANK 1: ok size=2 local_rank=1" in out


def test_a_rank_with_other_flags_is_named():
    out = run_ranks("""
        from gpunet import distributed
        comm = distributed.init(True)
        settings = {"lr": 0.1, "batch_size": 128 if comm.rank == 0 else 64}
        try:
            distributed.check_same_everywhere(comm, settings, "flags")
            print(f"RANK {comm.rank}: agreed")
        except distributed.DistributedError as exc:
            print(f"RANK {comm.rank}: {exc}")
    """)
    assert "RANK 0: agreed" in out
    assert ("RANK 1: rank 1 was launched with other flags than rank 0 (batch_size: 64 here, 128 "
            "on rank 0); give every rank the same flags") in out


def test_a_strided_buffer_is_refused():
    out = run_ranks("""
        import numpy as np
        from gpunet import distributed
        comm = distributed.init(True)
        try:
            comm.allreduce_mean_(np.zeros((4, 4))[:, ::2])
        except ValueError as exc:
            print(f"RANK {comm.rank}: {exc}")
    """)
    assert out.count("MPI collectives take a contiguous numpy buffer") == 2


@pytest.mark.cuda
def test_nccl_collectives_on_one_gpu_also_under_capture():
    """The NCCL path with one rank (all one GPU can show): the collectives run, on cupy buffers,
    and a CUDA graph captures the allreduce, as the training step's graph will."""
    import cupy as cp

    from gpunet.kernels import nccl
    comm = nccl.communicator(1, nccl.unique_id(), 0)
    for dtype in (cp.float32, cp.float64):
        x = cp.arange(6, dtype=dtype)
        assert nccl.allreduce_mean_(comm, x, 1) is x
        assert nccl.allreduce_sum_(comm, x) is x and nccl.broadcast_(comm, x, 0) is x
        np.testing.assert_array_equal(cp.asnumpy(x), np.arange(6))
    x = cp.ones(1000, cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        nccl.allreduce_mean_(comm, x, 1)
        x *= 2  # proves the replay ran the captured work
        graph = stream.end_capture()
        graph.launch(stream=stream)
        graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(x), np.full(1000, 4.0, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        nccl.allreduce_mean_(comm, cp.ones(3, cp.int32), 1)


# --- data-parallel training on 2 ranks ------------------------------------------------------------

TRAIN = """
    import json, sys
    import numpy as np
    from gpunet import distributed
    from gpunet.trainer import DeviceData, TrainConfig, Trainer

    def synthetic(n):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, 20)).astype(np.float32)
        y = x[:, :10].argmax(axis=1).astype(np.int64)
        return DeviceData(x, y, x[:50], y[:50], x[:77], y[:77])

    def run(n, batch, ranks_comm, **settings):
        config = TrainConfig(device="cpu", hidden=(16,), batch_size=batch, progress=False,
                             val_size=0, label_smoothing=0.0, schedule="cosine", **settings)
        trainer = Trainer(config, synthetic(n), quiet=True, comm=ranks_comm)
        metrics = trainer.fit()
        return trainer, metrics
"""


def test_two_ranks_at_batch_b_train_as_one_rank_at_batch_2b(tmp_path):
    """The same permutation, the same steps: after 20 steps (and an epoch whose last global
    batch has 1 row, which one rank takes alone) the parameters agree to float32 rounding."""
    out = tmp_path / "two.npz"
    run_ranks(TRAIN + f"""
    comm = distributed.init(True)
    saved = {{}}
    for optimizer in ("sgd", "adam"):
        for n in (640, 641):  # 20 steps of 32; then one more step of a single row
            trainer, metrics = run(n, 16, comm, optimizer=optimizer, epochs=1, distributed=True)
            saved[f"{{optimizer}}-{{n}}"] = trainer.optimizer.data
            saved[f"{{optimizer}}-{{n}}-loss"] = np.array([metrics["history"][0]["train_loss"],
                                                        metrics["test_loss"], metrics["test_accuracy"]])
    if comm.rank == 0:
        np.savez({str(out)!r}, **saved)
    """)
    two = np.load(out)
    ns = {}
    exec(textwrap.dedent(TRAIN), ns)
    for optimizer in ("sgd", "adam"):
        for n in (640, 641):
            one, metrics = ns["run"](n, 32, distributed.Communicator(), optimizer=optimizer, epochs=1)
            key = f"{optimizer}-{n}"
            np.testing.assert_allclose(two[key], one.optimizer.data, rtol=1e-5, atol=2e-6)
            expected = [metrics["history"][0]["train_loss"], metrics["test_loss"], metrics["test_accuracy"]]
            np.testing.assert_allclose(two[key + "-loss"], expected, rtol=1e-5)


CNN = """
    import numpy as np
    from gpunet import distributed
    from gpunet.trainer import DeviceData, TrainConfig, Trainer

    def images(n):
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (n, 784)).astype(np.float32)
        y = (x[:, :392].sum(axis=1) > x[:, 392:].sum(axis=1)).astype(np.int64)
        return DeviceData(x, y, x[:20], y[:20], x[:20], y[:20])

    def run(batch, ranks_comm, **settings):
        config = TrainConfig(**{**dict(device="cpu", model="cnn", batch_size=batch, epochs=1,
                                       progress=False, val_size=0, lr=0.05, distributed=True),
                                **settings})
        trainer = Trainer(config, images(99), quiet=True, comm=ranks_comm)
        trainer.fit()
        return trainer
"""


def test_two_ranks_draw_the_dropout_masks_of_one_rank_at_the_global_batch(tmp_path):
    """The small CNN (dropout 0.25) on 2 ranks at batch 16 and on one at batch 32: each rank
    draws its rows' part of the global batch's mask, so the runs agree to float32 rounding,
    also over the last global batch of 3 rows (2 on rank 0, 1 on rank 1). Ranks that drew the
    same mask each, as they once did, end elsewhere."""
    out = tmp_path / "two.npy"
    run_ranks(CNN + f"""
    trainer = run(16, distributed.init(True))
    counters = [int(d.counter) for d in trainer._dropout_layers()]
    assert counters == [4], counters  # 4 steps: 3 of 32 rows, one of 3
    if trainer.comm.rank == 0:
        np.save({str(out)!r}, trainer.optimizer.data)
    """, timeout=120)
    ns = {}
    exec(textwrap.dedent(CNN), ns)
    one = ns["run"](32, distributed.Communicator())
    np.testing.assert_allclose(np.load(out), one.optimizer.data, rtol=1e-4, atol=1e-6)


def test_a_resumed_two_rank_cnn_draws_the_masks_of_the_straight_run(tmp_path):
    """The dropout counters of a 2-rank CNN run go into its checkpoint and come back on both
    ranks: stopped after an epoch and resumed, it ends bit for bit where the straight run does."""
    straight, part = tmp_path / "straight.npz", tmp_path / "part.npz"
    run_ranks(CNN + f"""
    comm = distributed.init(True)
    run(16, comm, epochs=2, save={str(straight)!r})
    run(16, comm, epochs=1, schedule_epochs=2, save={str(part)!r})
    resumed = run(16, comm, epochs=2, schedule_epochs=2, resume={str(part)!r}, save={str(part)!r})
    assert [int(d.counter) for d in resumed._dropout_layers()] == [8]
    """, timeout=120)
    a, b = np.load(straight), np.load(part)
    weights = [k for k in a.files if not k.startswith("meta")]
    assert weights and all(np.array_equal(a[k], b[k]) for k in weights)


def test_a_resumed_two_rank_run_equals_the_straight_one(tmp_path):
    straight, part = tmp_path / "straight.npz", tmp_path / "part.npz"
    run_ranks(TRAIN + f"""
    comm = distributed.init(True)
    run(300, 16, comm, epochs=4, save={str(straight)!r}, distributed=True)
    run(300, 16, comm, epochs=2, schedule_epochs=4, save={str(part)!r}, distributed=True)
    run(300, 16, comm, epochs=4, schedule_epochs=4, resume={str(part)!r}, save={str(part)!r},
        distributed=True)
    """)
    a, b = np.load(straight), np.load(part)
    weights = [k for k in a.files if not k.startswith("meta")]
    assert weights and all(np.array_equal(a[k], b[k]) for k in weights)  # bit for bit


def test_only_rank_0_writes_files(tmp_path):
    run_ranks(TRAIN + f"""
    from gpunet import checkpoint
    comm = distributed.init(True)
    log = open({str(tmp_path)!r} + f"/writes-{{comm.rank}}.txt", "w")
    real = checkpoint.atomic_write
    def recording(path, write):
        log.write(str(path) + "\\n"); log.flush()
        return real(path, write)
    checkpoint.atomic_write = recording
    run(200, 16, comm, epochs=2, save={str(tmp_path / "c.npz")!r},
        metrics_json={str(tmp_path / "m.json")!r}, distributed=True)
    """)
    assert (tmp_path / "c.npz").exists() and (tmp_path / "m.json").exists()
    assert (tmp_path / "writes-1.txt").read_text() == ""
    assert (tmp_path / "writes-0.txt").read_text().count("\n") >= 3  # 2 checkpoints + metrics


def run_train_py(args, n=2, timeout=120, env_per_rank=None):
    """train.py on n ranks (MPMD when ranks need different environments); returns the process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [mpiexec()]
    for rank in range(n):
        if rank:
            command.append(":")
        command += ["-n", "1"]
        for key, value in (env_per_rank or {}).get(rank, {}).items():
            command += ["-env", key, value]
        command += [sys.executable, "-m", "mpi4py", "train.py", "--distributed", *args(rank)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_a_mismatched_launch_is_refused_at_start():
    proc = run_train_py(lambda rank: ["--lr", "0.1" if rank == 0 else "0.2", "--epochs", "1"])
    assert proc.returncode != 0
    assert ("train.py: error: rank 1: rank 1 was launched with other flags than rank 0 (lr: 0.2 "
            "here, 0.1 on rank 0); give every rank the same flags") in proc.stderr


def test_an_error_on_rank_1_ends_both_ranks(tmp_path, mnist_dir):
    """Rank 1 cannot find its data while rank 0 goes on: rank 1 says so in one line and the
    launch ends, within seconds, instead of rank 0 waiting in an allreduce for ever."""
    import time
    started = time.perf_counter()
    proc = run_train_py(lambda rank: ["--epochs", "1", "--no-progress"], timeout=60,
                        env_per_rank={0: {"GPUNET_DATA": str(mnist_dir)},
                                      1: {"GPUNET_DATA": str(tmp_path / "missing")}})
    assert proc.returncode != 0 and time.perf_counter() - started < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: rank 1: ")
    assert "missing" in errors[0]
