"""NCCL through CuPy (cupy.cuda.nccl), for tinygpt.distributed's GPU backend.

    rt = Runtime()                    # CuPy and its NCCL bindings; one-line DeviceError when either is missing
    rt.use_device(local_rank % rt.device_count())
    comm = rt.communicator(world_size, unique_id, rank)    # the id from rank 0, broadcast over MPI

This is the only place that imports cupy.cuda.nccl, and only when a Runtime is made (under `mpiexec` with
--device cuda). Everything tinygpt.distributed needs from CuPy goes through these few methods, so its tests
can hand it a stand-in without a GPU. CuPy's wheels do not bundle NCCL: `pip install nvidia-nccl-cu12`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Runtime"]


class Runtime:
    """CuPy's NCCL bindings and the bits of the CUDA runtime a collective needs."""

    def __init__(self) -> None:
        from tinygpt import backend
        self.cp = backend.get_device("cuda").xp          # CudaUnavailableError without CuPy or a GPU
        try:
            import cupy.cuda.nccl as nccl                 # noqa: the only NCCL import in tinygpt
        except Exception as e:                            # ImportError, or libnccl failing to load
            nccl, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "CuPy found no NCCL library"
        if nccl is None or not getattr(nccl, "available", True):
            raise backend.DeviceError(f"training on several GPUs needs NCCL ({why}); install it with: "
                                      f"pip install nvidia-nccl-cu12")
        self.nccl = nccl
        self.SUM = nccl.NCCL_SUM
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}

    def device_count(self) -> int:
        return int(self.cp.cuda.runtime.getDeviceCount())

    def use_device(self, index: int) -> None:
        """Make GPU `index` this process's (call before anything is allocated)."""
        self.cp.cuda.Device(index).use()

    def unique_id(self) -> tuple:
        """A new NCCL unique id: 128 signed bytes, made on rank 0 and sent to the others."""
        return tuple(self.nccl.get_unique_id())

    def communicator(self, size: int, unique_id: tuple, rank: int) -> Any:
        """ncclCommInitRank: blocks until all `size` ranks have called it with the same id."""
        return self.nccl.NcclCommunicator(size, unique_id, rank)

    def nccl_type(self, dtype: Any) -> int:
        return self._types[np.dtype(dtype)]

    def pointer(self, array: Any) -> int:
        return array.data.ptr

    def stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def record_event(self) -> Any:
        """An event recorded on the current stream; its `.done` says whether the work before it finished."""
        event = self.cp.cuda.Event(block=False, disable_timing=True)
        event.record()
        return event
