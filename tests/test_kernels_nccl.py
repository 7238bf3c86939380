"""gpunet.kernels.nccl without NCCL or a GPU: what it hands CuPy's binding.

NCCL itself runs only on a GPU (tests/test_distributed.py's cuda test). What can be checked here
is the contract with CuPy 14's ``cupy.cuda.nccl``: ``get_unique_id()`` returns bytes and
``NcclCommunicator(ndev, commId, rank)`` declares ``bytes commId`` of NCCL_UNIQUE_ID_BYTES
(cupy_backends/cuda/libs/nccl.pyx; before CuPy 14 the id was a tuple of ints). The fake below
keeps that contract, so an id reshaped on its way (a tuple, say) fails here as it would there.
"""

import pickle

import pytest

from gpunet.kernels import nccl

ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


class FakeNccl:
    """CuPy 14's NCCL binding as far as a communicator's creation goes."""

    available = True

    @staticmethod
    def get_unique_id():
        return bytes(range(ID_BYTES))

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):
            if not isinstance(commId, bytes):  # Cython's check of a `bytes commId` argument
                raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got "
                                f"{type(commId).__name__})")
            if len(commId) != ID_BYTES:
                raise ValueError(f"an NCCL id has {ID_BYTES} bytes, got {len(commId)}")
            self.args = ndev, commId, rank


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(nccl, "_nccl", lambda: FakeNccl)


def test_the_unique_id_reaches_the_communicator_as_cupy_gave_it(fake):
    uid = nccl.unique_id()
    sent = pickle.loads(pickle.dumps(uid))  # what mpi4py's comm.bcast does to it
    comm = nccl.communicator(2, sent, 1)
    assert comm.args == (2, FakeNccl.get_unique_id(), 1)
