"""The small CNN (``gpunet.small_cnn``) beside PyTorch eager on the same network, and its floor.

Each contender runs the same ``steps`` batches of 128 MNIST images per sample: gpunet's layer
API, torch eager with gpunet's initial weights, and two floors, the matrix products alone at the
step's shapes (the convolutions' products, and all of the step's). An epoch is ``steps_per_epoch``
x the median time of a step. The share of gpunet's step spent in the convolution products (the
floor of a lowering to GEMM) says how far from it the rest of the step is.

FLOPs per step at batch 128 (multiply-adds x 2): conv1 forward and weight gradient 2 x 57.8 M
(M = 128 x 784, K = 9, O = 32; its input gradient is skipped, as for the first layer of any
network), conv2 forward, weight and input gradients 3 x 925 M (M = 128 x 196, K = 288, O = 64),
the Dense layers 309 M: 3.2 GFLOP in all, 2.89 G of it in the convolutions.
"""

from __future__ import annotations

import statistics

import numpy as np

from ..backend import get_array_module, to_device, to_numpy
from .common import SEED, SETTLE_SECONDS, Contender, Unavailable, _first_line, _import_torch
from .protocol import _ratios_within_rounds, time_rounds

NAMES = {
    "gpunet": "gpunet small_cnn",
    "torch": "torch eager",
    "conv_floor": "conv GEMM floor",
    "floor": "GEMM floor",
}

WHAT = {
    "gpunet": "gpunet.small_cnn(): Conv2d(1,32,3,p1)+ReLU, MaxPool2d(2), Conv2d(32,64,3,p1)+ReLU, "
              "MaxPool2d(2), Flatten, Dense(3136,128)+ReLU, Dropout(0.25), Dense(128,10); "
              "SoftmaxCrossEntropy; SGD(lr=0.01, momentum=0.9); per batch loss_fn(model(xb), yb); "
              "model.backward(loss_fn.backward(), input_grad=False); opt.step()",
    "torch": "the same nn.Sequential with gpunet's initial weights, F.cross_entropy, "
             "optim.SGD(lr=0.01, momentum=0.9), zero_grad(set_to_none=True), loss.backward(), "
             "opt.step()",
    "conv_floor": "the convolutions' products alone, into preallocated outputs: conv1 forward "
                  "and weight gradient, conv2 forward, weight and input gradients",
    "floor": "every product of the step: the convolutions' and the Dense layers' (forward, weight "
             "and input gradients)",
}

BATCH, LR, MOMENTUM = 128, 0.01, 0.9


def benchmark_cnn(device, data, steps: int, repeats: int, say, settle: float = SETTLE_SECONDS,
                  steps_per_epoch: int | None = None) -> dict:
    """Time ``repeats`` rotating rounds of ``steps`` training steps of each contender."""
    with device.scope():
        xp = get_array_module(data.x_train)
        rng = np.random.default_rng(SEED)
        rows = [rng.choice(len(data.y_train), BATCH, replace=False) for _ in range(steps)]
        images = data.x_train.reshape(-1, 1, 28, 28)
        batches = [(xp.ascontiguousarray(images[to_device(r, device)]),
                    data.y_train[to_device(r, device)]) for r in rows]
        contenders, unavailable = {}, {}
        for key, make in (("gpunet", _gpunet), ("torch", _torch), ("conv_floor", _floor),
                          ("floor", _floor)):
            try:
                contenders[key] = make(key, device, batches, contenders.get("gpunet"))
            except Unavailable as exc:
                unavailable[key] = str(exc)
            except Exception as exc:
                unavailable[key] = f"setup failed: {type(exc).__name__}: {_first_line(exc)}"
            if key in unavailable:
                say(f"cnn: {NAMES[key]} unavailable: {unavailable[key]}")
        order = time_rounds(contenders, repeats, settle, lambda line: say(f"cnn {line}"),
                            names=NAMES)

    per_epoch = steps_per_epoch or -(-len(data.y_train) // BATCH)
    results = {}
    for key in NAMES:
        entry = {"name": NAMES[key], "what": WHAT[key]}
        if key in unavailable:
            results[key] = {**entry, "status": f"unavailable: {unavailable[key]}", "samples": []}
            continue
        c = contenders[key]
        step = [s / steps for s in c.samples]
        med = statistics.median(step) if step else None
        entry.update({"status": "ok" if c.error is None else f"failed: {c.error}",
                      "samples": c.samples, "cpu_seconds": c.cpu_seconds,
                      "median_ms_per_step": None if med is None else 1e3 * med,
                      "epoch_seconds": None if med is None else med * per_epoch})
        results[key] = entry
    out = {"batch_size": BATCH, "steps_per_sample": steps, "steps_per_epoch": per_epoch,
           "order_per_round": order, "contenders": results,
           "flops_per_step": {"conv": 2 * (2 * 128 * 784 * 9 * 32) + 3 * (2 * 128 * 196 * 288 * 64),
                              "dense": 3 * 2 * 128 * 3136 * 128 + 3 * 2 * 128 * 128 * 10}}
    ms = {k: v.get("median_ms_per_step") for k, v in results.items()}
    if ms.get("gpunet") and ms.get("torch"):
        out["gpunet/torch"] = ms["gpunet"] / ms["torch"]
        out["gpunet/torch_within_rounds"] = _ratios_within_rounds(
            results["gpunet"]["samples"], results["torch"]["samples"])
    if ms.get("gpunet") and ms.get("conv_floor"):
        out["conv_gemm_share"] = ms["conv_floor"] / ms["gpunet"]
    if ms.get("gpunet") and ms.get("floor"):
        out["gpunet/floor"] = ms["gpunet"] / ms["floor"]
    return out


def _gpunet(key, device, batches, _):
    from .. import conv, losses, optim
    from ..backend import manual_seed

    manual_seed(SEED)
    model = conv.small_cnn().to(device)
    loss_fn = losses.SoftmaxCrossEntropy()
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def run():
        for xb, yb in batches:
            loss_fn(model(xb), yb)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        device.synchronize()

    c = Contender(key, run)
    c.model = model
    return c


def torch_twin(torch, model):
    """``gpunet.small_cnn`` ``model`` as a torch ``nn.Sequential`` (on the CPU) with its weights."""
    from torch import nn

    ref = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3136, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))
    with torch.no_grad():
        for mine, theirs in [(model[0], ref[0]), (model[2], ref[3]), (model[5], ref[7]),
                             (model[7], ref[10])]:
            w = to_numpy(mine.weight.data)
            w = w if w.ndim == 4 else w.T  # Dense keeps (in, out), Linear (out, in)
            theirs.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            theirs.bias.copy_(torch.from_numpy(to_numpy(mine.bias.data)))
    return ref


def _torch(key, device, batches, ours):
    torch = _import_torch()
    if ours is None:
        raise Unavailable("gpunet's model is needed for the initial weights")
    dev = torch.device("cpu" if device.type == "cpu" else f"cuda:{device.index}")
    ref = torch_twin(torch, ours.model).to(dev)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    tb = [(torch.as_tensor(to_numpy(x)).to(dev), torch.as_tensor(to_numpy(y)).to(dev))
          for x, y in batches]

    def run():
        for xb, yb in tb:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ref(xb), yb).backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return Contender(key, run)


def _floor(key, device, batches, _):
    """The products of a step at its shapes, into preallocated outputs, ``len(batches)`` times."""
    from ..functional import matmul

    xp = get_array_module(batches[0][0])
    rng = np.random.default_rng(SEED)
    shapes = [(BATCH * 784, 9, 32, False), (BATCH * 196, 288, 64, True)]  # M, K, O, input grad
    if key == "floor":
        shapes += [(BATCH, 3136, 128, True), (BATCH, 128, 10, True)]
    work = []
    for m, k, o, dx in shapes:
        a, w, g = (to_device(rng.random(s, np.float32), device) for s in ((m, k), (k, o), (m, o)))
        outs = (xp.empty((m, o), np.float32), xp.empty((k, o), np.float32),
                xp.empty((m, k), np.float32) if dx else None)
        work.append((a, w, g, outs))

    def run():
        for _ in batches:
            for a, w, g, (y, dw, da) in work:
                matmul(a, w, out=y)
                matmul(a.T, g, out=dw)
                if da is not None:
                    matmul(g, w.T, out=da)
        device.synchronize()

    return Contender(key, run)
