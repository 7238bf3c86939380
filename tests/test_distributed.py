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
