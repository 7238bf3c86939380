"""The whole training step as one CUDA graph, replayed for every full batch.

For a model this small a GPU step is bounded by kernel launches and Python, not arithmetic. So
the Trainer captures one step (batch gather, forward, fused loss, backward, optimizer update,
loss bookkeeping) into a CUDA graph once and replays it: one launch per batch, no Python per
kernel. Everything that changes between steps lives on the device and is read by the kernels:

    counters   [optimizer steps taken, batch index in this epoch], advanced by the last kernel
    order      this epoch's permutation (refilled before each epoch)
    lr_table   this epoch's learning rate per batch, from the closed-form schedule
    losses     each batch's loss, read once per epoch

The first batch of the first epoch runs eagerly (it compiles the kernels and creates the cuBLAS
handle), the graph is captured right after it, and the last partial batch of each epoch runs
eagerly through the same step function: graph and eager steps issue the same kernels. If capture
fails, training carries on eagerly with a one-line notice.

Two rules keep replays correct:

- Memory. The temporaries of the captured step are allocated from a private memory pool, and
  every block the capture took is held by this object for as long as the graph lives: their
  addresses are baked into the graph, so no later allocation may be given them, and no
  out-of-memory retry (which frees a pool's unused blocks) may return them to the driver. The
  eager steps allocate from CuPy's default pool as usual.
- Order. Everything runs on one stream of this object's. The data, the parameters and the
  optimizer state were written on whichever stream was current before (the legacy default
  stream, usually), so each epoch first makes this stream wait for that one, and ends with a
  synchronisation before the host reads the losses or the parameters.
"""

from __future__ import annotations

import numpy as np

from .kernels import cuda as cuda_kernels


class GraphStep:
    def __init__(self, trainer):
        self.trainer = trainer
        cupy = trainer.device.xp
        self.cupy = cupy
        t = trainer
        with t.device.scope():
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.pool = cupy.cuda.MemoryPool()
            self.graph_memory = []  # every block the captured graph uses, held while it lives
            self.counters = cupy.zeros(2, dtype=cupy.int64)
            self.order = cupy.empty(t.n_train, dtype=cupy.int64)
            self.lr_table = cupy.empty(t.steps_per_epoch, dtype=t.optimizer.data.dtype)
            self.losses = cupy.zeros(t.steps_per_epoch, dtype=cupy.float64)
            self.x_batch = cupy.empty_like(t._x_batch)
            self.y_batch = cupy.empty_like(t._y_batch)
            # The cuBLAS workspace of this stream exists before any capture, outside the pool.
            cuda_kernels.cublas_on_stream(t.device.index, self.stream.ptr)
        self.graph = None
        self.failed = None  # why capture failed, once it has

    def _step(self, rows: int, global_rows: int) -> None:
        """One training step on the first ``rows`` rows of the batch buffers (of ``global_rows``
        over all ranks); capturable, the gradients' allreduce included."""
        t = self.trainer
        x, y = self.x_batch[:rows], self.y_batch[:rows]
        cuda_kernels.gather_batch(t.data.x_train, t.data.y_train, self.order, self.counters, x, y,
                                  t.config.batch_size)
        t.place_dropout(global_rows)
        loss = t.forward_backward(x, y)
        t.average_gradients(rows, global_rows)
        t.optimizer.device_update(self.lr_table, self.counters)
        cuda_kernels.finish_step(loss, self.losses, self.counters)

    def _capture(self) -> None:
        cupy = self.cupy
        memory = []

        def malloc(size):
            block = self.pool.malloc(size)
            memory.append(block)
            return block

        # Relaxed: the first capture may allocate (cudaMalloc) for the pool, which the global
        # mode forbids while any stream captures.
        mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2)
        with cupy.cuda.using_allocator(malloc):
            self.stream.begin_capture(mode=mode)
            try:
                self._step(self.trainer.config.batch_size, self.trainer.global_batch)
            except BaseException:
                # End the capture, but report what broke it, not the invalidated capture.
                try:
                    self.stream.end_capture()
                except Exception:
                    pass
                raise
            graph = self.stream.end_capture()
        self.graph, self.graph_memory = graph, memory

    def run_epoch(self, order_host: np.ndarray, meter, progress=None) -> None:
        """Train one epoch: graph replays for the full batches, eager steps for the rest.
        ``order_host`` is this rank's rows, step after step (Trainer.local_order)."""
        t, cupy = self.trainer, self.cupy
        bs, full = t.config.batch_size, t.global_batch
        lrs = epoch_learning_rates(t.scheduler, t.steps_per_epoch)
        with t.device.scope():
            written = cupy.cuda.get_current_stream().record()  # the data and parameters
        with t.device.scope(), self.stream:
            self.stream.wait_event(written)
            self.order[:len(order_host)].set(order_host, stream=self.stream)
            self.lr_table.set(lrs.astype(self.lr_table.dtype), stream=self.stream)
            self.counters.set(np.array([t.optimizer.step_count, 0], np.int64), stream=self.stream)
            meter.losses = self.losses
            for step in range(t.steps_per_epoch):
                rows, global_rows = int(t.batch_sizes[step]), int(t.global_batch_sizes[step])
                whole = rows == bs and global_rows == full  # the step the graph holds
                if whole and self.graph is not None:
                    self.graph.launch(stream=self.stream)
                else:
                    self._step(rows, global_rows)
                    if step == 0 and whole and self.failed is None:
                        self._try_capture()
                meter.steps = step + 1
                t._tick(progress, meter, global_rows)
        self.stream.synchronize()
        # The host-side counts catch up with what the device did.
        t.optimizer.step_count += t.steps_per_epoch
        t.scheduler.last_step += t.steps_per_epoch
        t.optimizer.lr = t.scheduler.lr_at(t.scheduler.last_step)

    def _try_capture(self) -> None:
        try:
            self._capture()
        except Exception as exc:  # any failure: the eager path computes the same step
            self.graph, self.failed = None, f"{type(exc).__name__}: {exc}"
            self.trainer._say(f"note: CUDA graph capture failed ({self.failed}); "
                              "continuing with eager kernel launches")


def epoch_learning_rates(scheduler, steps: int) -> np.ndarray:
    """The learning rate of each of the next ``steps`` optimizer steps, as the eager loop would
    set them (the schedule is closed-form, so the table is exact)."""
    return np.array([scheduler.lr_at(scheduler.last_step + i) for i in range(steps)])
