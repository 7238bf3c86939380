"""NCCL collectives on CuPy arrays, for ``gpunet.distributed`` (CuPy's binding, ``cupy.cuda.nccl``).

The communicator is created once per process, on the GPU that is current, from a unique id
that rank 0 made and every rank received over MPI. The collectives are queued on the current
stream, so a CUDA graph that captures the training step captures the allreduce with it.
"""

from __future__ import annotations

import numpy as np

_DATA_TYPES = {np.dtype(np.float32): "NCCL_FLOAT32", np.dtype(np.float64): "NCCL_FLOAT64"}


def _nccl():
    from cupy.cuda import nccl
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy cannot load NCCL; install it (pip install nvidia-nccl-cu13, or "
                           "-cu12 for CUDA 12)")
    return nccl


def unique_id() -> bytes:
    """A new NCCL unique id: CuPy 14's bytes (a tuple of ints before), which MPI broadcasts as
    any object and ``communicator`` takes back as they are."""
    return _nccl().get_unique_id()


def communicator(size: int, uid: bytes, rank: int):
    """This rank's NCCL communicator on the current GPU (collective: every rank calls it)."""
    return _nccl().NcclCommunicator(size, uid, rank)


def _call(comm, flat, what: str):
    import cupy
    nccl = _nccl()
    if not flat.flags.c_contiguous:
        raise ValueError(f"{what} takes a contiguous buffer, got a strided one")
    name = _DATA_TYPES.get(np.dtype(flat.dtype))
    if name is None:
        raise TypeError(f"{what} takes float32 or float64 buffers, got {flat.dtype}")
    return nccl, getattr(nccl, name), cupy.cuda.get_current_stream().ptr


def allreduce_mean_(comm, flat, size: int):
    """flat = the mean of every rank's flat, in place; NCCL's average where it has one (2.10+)."""
    nccl, data_type, stream = _call(comm, flat, "allreduce_mean_")
    average = getattr(nccl, "NCCL_AVG", None)
    if average is not None and nccl.get_version() >= 21000:
        comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, data_type, average, stream)
    else:
        comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, data_type, nccl.NCCL_SUM, stream)
        flat *= 1.0 / size
    return flat


def allreduce_sum_(comm, flat):
    nccl, data_type, stream = _call(comm, flat, "allreduce_sum_")
    comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, data_type, nccl.NCCL_SUM, stream)
    return flat


def broadcast_(comm, flat, root: int):
    _, data_type, stream = _call(comm, flat, "broadcast_")
    comm.bcast(flat.data.ptr, flat.size, data_type, root, stream)
    return flat
