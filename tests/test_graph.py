"""gpunet.graph: the training step captured as a CUDA graph must equal the eager step."""

import numpy as np
import pytest

from gpunet import optim
from gpunet.backend import to_numpy
from gpunet.graph import GraphStep, epoch_learning_rates
from gpunet.layers import mlp
from gpunet.trainer import DeviceData, TrainConfig, Trainer, make_scheduler


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_learning_rate_table_is_what_the_eager_loop_uses(schedule):
    config = TrainConfig(epochs=3, schedule=schedule, warmup_epochs=0.5, lr=0.3)
    opt = optim.SGD(mlp([3, 2]).parameters(), lr=config.lr)
    scheduler = make_scheduler(config, opt, steps_per_epoch=10)
    for _ in range(3):  # three epochs
        table = epoch_learning_rates(scheduler, 10)
        used = []
        for _ in range(10):
            used.append(opt.lr)  # what optimizer.step() would read
            scheduler.step()
        np.testing.assert_array_equal(table, used)


def synthetic(cp, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    parts = [cp.asarray(a) for a in (x, y, x[:100], y[:100], x[:300], y[:300])]
    return DeviceData(*parts)


def config(**overrides):
    settings = dict(device="cuda", hidden=(32,), epochs=2, batch_size=64, progress=False, lr=0.05,
                    val_size=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_replay_equals_eager(optimizer, dtype):
    import cupy as cp
    data = synthetic(cp)
    if dtype != "float32":
        data = DeviceData(*(a.astype(dtype) if a.dtype.kind == "f" else a
                            for a in (data.x_train, data.y_train, data.x_val, data.y_val,
                                      data.x_test, data.y_test)))
    runs = []
    for graph in (True, False):
        trainer = Trainer(config(cuda_graph=graph, optimizer=optimizer, dtype=dtype,
                                 schedule="cosine"), data, quiet=True)
        metrics = trainer.fit()
        assert (trainer.graph is not None and trainer.graph.graph is not None) == graph
        runs.append((metrics, to_numpy(trainer.optimizer.data), trainer.optimizer.step_count,
                     trainer.scheduler.last_step))
    (m_graph, p_graph, steps_graph, sched_graph), (m_eager, p_eager, steps_eager, sched_eager) = runs
    assert steps_graph == steps_eager and sched_graph == sched_eager
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(p_graph, p_eager, rtol=tol, atol=tol)
    for a, b in zip(m_graph["history"], m_eager["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol)
    assert m_graph["test_accuracy"] == pytest.approx(m_eager["test_accuracy"], abs=0.01)


@pytest.mark.cuda
def test_capture_failure_falls_back_to_eager(monkeypatch, capsys):
    import cupy as cp

    def broken(self):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(GraphStep, "_capture", broken)
    data = synthetic(cp)
    trainer = Trainer(config(epochs=1), data)
    fell_back = trainer.fit()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: CUDA graph capture failed (RuntimeError: capture refused); "
                     "continuing with eager kernel launches"]
    eager = Trainer(config(epochs=1, cuda_graph=False), data, quiet=True).fit()
    assert fell_back["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)


@pytest.mark.cuda
def test_graph_resume_equals_straight_run(tmp_path):
    import cupy as cp
    data = synthetic(cp)
    straight = Trainer(config(epochs=4), data, quiet=True)
    straight.fit()
    path = tmp_path / "c.npz"
    Trainer(config(epochs=2, save=str(path), schedule="constant"), data, quiet=True).fit()
    resumed = Trainer(config(epochs=4, resume=str(path), schedule="constant"), data, quiet=True)
    resumed.fit()
    again = Trainer(config(epochs=4, schedule="constant"), data, quiet=True)
    again.fit()
    np.testing.assert_allclose(to_numpy(resumed.optimizer.data), to_numpy(again.optimizer.data),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_the_graph_holds_its_memory():
    """Every block the capture allocated stays held: no later allocation or out-of-memory
    retry can take an address the graph writes to."""
    import cupy as cp
    trainer = Trainer(config(epochs=1), synthetic(cp), quiet=True)
    trainer.fit()
    step = trainer.graph
    assert step.graph is not None and step.graph_memory
    assert step.pool.used_bytes() >= sum(block.mem.size for block in step.graph_memory) > 0
    step.pool.free_all_blocks()  # what an out-of-memory retry does: held blocks survive it
    assert step.pool.used_bytes() > 0
