"""Data-parallel training on the engines the field trusts: MPI between processes, NCCL between GPUs.

    mpiexec -n 2 python -m mpi4py train.py --distributed

gpunet keeps a model's parameters and gradients in one flat buffer each, so one allreduce per
step averages a whole model's gradients. A communicator has the rank, the number of ranks, the
rank within its machine (which picks the GPU), and four collectives on flat buffers and small
objects. Three of them:

    Communicator      one process: every collective is the identity (ordinary runs)
    MPICommunicator   mpi4py (MPI_COMM_WORLD) for numpy buffers; for cupy buffers an NCCL
                      communicator set up over MPI, as ChainerMN and Horovod do
    init(distributed) the one a run asks for

``python -m mpi4py`` matters: an exception that escapes on one rank then aborts every rank
instead of leaving the others waiting in a collective. gpunet's command line also aborts the
world after printing its one-line error, for errors it catches itself.
"""

from __future__ import annotations

import numpy as np

from .backend import is_cuda_array


class DistributedError(RuntimeError):
    """The run cannot start as launched (no MPI, ranks that disagree); the message says why."""


class Communicator:
    """A single process: rank 0 of 1, and every collective leaves its argument as it is."""

    rank, size, local_rank = 0, 1, 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_mean_(self, flat):
        """flat = the mean over ranks of flat, in place (a flat numpy or cupy buffer)."""
        return flat

    def allreduce_sum_(self, flat):
        """flat = the sum over ranks of flat, in place."""
        return flat

    def broadcast_(self, flat, root: int = 0):
        """flat = root's flat, in place."""
        return flat

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj, root: int = 0):
        """root's ``obj`` (any picklable value) on every rank."""
        return obj

    def abort(self, code: int = 1) -> None:
        """End every rank now (after an error on this one)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


class MPICommunicator(Communicator):
    """MPI_COMM_WORLD through mpi4py; cupy buffers go through NCCL, set up on first use."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # The rank among the processes of this machine: which GPU this rank takes.
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = local.Get_rank()
        local.Free()
        self._nccl = None

    def _host(self, flat) -> np.ndarray:
        if not isinstance(flat, np.ndarray) or not flat.flags.c_contiguous:
            raise ValueError("MPI collectives take a contiguous numpy buffer, got "
                             f"{type(flat).__name__}")
        return flat

    def _nccl_comm(self):
        """The NCCL communicator on the current GPU: rank 0's unique id, sent over MPI."""
        if self._nccl is None:
            from .kernels import nccl
            uid = nccl.unique_id() if self.rank == 0 else None
            uid = self.comm.bcast(uid, root=0)
            self._nccl = nccl.communicator(self.size, uid, self.rank)
        return self._nccl

    def allreduce_mean_(self, flat):
        if is_cuda_array(flat):
            from .kernels import nccl
            return nccl.allreduce_mean_(self._nccl_comm(), flat, self.size)
        self.comm.Allreduce(self._mpi.IN_PLACE, self._host(flat), op=self._mpi.SUM)
        flat *= flat.dtype.type(1.0 / self.size)
        return flat

    def allreduce_sum_(self, flat):
        if is_cuda_array(flat):
            from .kernels import nccl
            return nccl.allreduce_sum_(self._nccl_comm(), flat)
        self.comm.Allreduce(self._mpi.IN_PLACE, self._host(flat), op=self._mpi.SUM)
        return flat

    def broadcast_(self, flat, root: int = 0):
        if is_cuda_array(flat):
            from .kernels import nccl
            return nccl.broadcast_(self._nccl_comm(), flat, root)
        self.comm.Bcast(self._host(flat), root=root)
        return flat

    def barrier(self) -> None:
        self.comm.Barrier()

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def init(distributed: bool = False) -> Communicator:
    """The communicator of this process: MPI_COMM_WORLD for a distributed run, else one rank."""
    if not distributed:
        return Communicator()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise DistributedError('--distributed needs mpi4py and an MPI: pip install -e ".[mpi]", '
                               "then launch with mpiexec -n N python -m mpi4py train.py "
                               "--distributed") from None
    return MPICommunicator()


def check_same_everywhere(comm: Communicator, settings: dict, what: str = "settings") -> None:
    """Raise DistributedError on every rank whose ``settings`` differ from rank 0's: a launch
    with different flags on different ranks would train a different model on each."""
    theirs = comm.broadcast_object(settings, root=0)
    differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    if differ:
        detail = ", ".join(f"{k}: {settings.get(k)!r} here, {theirs.get(k)!r} on rank 0"
                           for k in differ)
        raise DistributedError(f"rank {comm.rank} was launched with other {what} than rank 0 "
                               f"({detail}); give every rank the same flags")


def shard(rows: int, comm: Communicator) -> tuple[int, int]:
    """(start, stop) of this rank's share of ``rows`` consecutive rows: the rows split as
    evenly as they go, the first ranks taking one more where they do not divide."""
    base, extra = divmod(rows, comm.size)
    start = comm.rank * base + min(comm.rank, extra)
    return start, start + base + (comm.rank < extra)
