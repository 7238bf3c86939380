"""The contenders and the GEMM floors: each builds its model and returns a Contender whose
``epoch()`` runs one synchronised training epoch, on the CPU or a GPU (torch_compile, CUDA
only, is the torch contender under torch.compile)."""

from __future__ import annotations

import numpy as np

import gpunet

from ..backend import manual_seed, to_device, to_numpy
from ..trainer import TrainConfig, Trainer
from .common import (
    _first_line, _import_torch, Contender, IN_FEATURES, LR, MOMENTUM, NUM_CLASSES, SEED,
    Unavailable, Workload)


def gpunet_trainer(w: Workload) -> Contender:
    config = TrainConfig(device=str(w.device), hidden=(w.hidden,), batch_size=w.batch_size, lr=LR,
                         optimizer="sgd", momentum=MOMENTUM, nesterov=False, schedule="constant",
                         label_smoothing=0.0, val_size=0, progress=False, epochs=1, seed=SEED)
    trainer = Trainer(config, w.data)  # prints only from fit(), which is not called

    def epoch():
        trainer.train_epoch()
        trainer.device.synchronize()

    return Contender("trainer", epoch, lambda x, y: trainer.evaluate(x, y)[1])


def gpunet_layer_api(w: Workload) -> Contender:
    """What a user writes with gpunet's public API (the README's loop), without the trainer."""
    xp = w.device.xp
    manual_seed(SEED)
    model = gpunet.mlp([IN_FEATURES, w.hidden, NUM_CLASSES]).to(w.device)
    loss_fn = gpunet.SoftmaxCrossEntropy()
    opt = gpunet.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    X, Y, bs = w.data.x_train, w.data.y_train, w.batch_size

    def epoch():
        perm = xp.random.permutation(len(X))
        for s in range(0, len(X), bs):
            idx = perm[s:s + bs]
            xb, yb = X[idx], Y[idx]
            loss_fn(model(xb), yb)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        w.synchronize()

    def accuracy(x, y):
        model.eval()
        correct = sum(int((model(x[s:s + 2000]).argmax(axis=1) == y[s:s + 2000]).sum())
                      for s in range(0, len(y), 2000))
        model.train()
        return correct / len(y)

    return Contender("layer_api", epoch, accuracy)


class TextbookNet:
    """The two-layer net as cs231n's assignment writes it, in float32 NumPy, He-initialised."""

    def __init__(self, d_in: int, hidden: int, n_classes: int, *, lr: float, mu: float,
                 rng: np.random.Generator):
        def he(fan_in, fan_out):
            w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            return w.astype(np.float32)

        self.params = {"W1": he(d_in, hidden), "b1": np.zeros(hidden, np.float32),
                       "W2": he(hidden, n_classes), "b2": np.zeros(n_classes, np.float32)}
        self.velocity = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.lr, self.mu = lr, mu

    def scores(self, X):
        p = self.params
        return np.maximum(0, X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def loss(self, X, y):
        """(mean softmax loss, gradients) for one batch."""
        p, n = self.params, X.shape[0]
        z1 = X @ p["W1"] + p["b1"]
        a1 = np.maximum(0, z1)
        scores = a1 @ p["W2"] + p["b2"]
        exp_scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = exp_scores / exp_scores.sum(axis=1, keepdims=True)
        loss = -np.log(probs[range(n), y]).sum() / n

        dscores = probs
        dscores[range(n), y] -= 1
        dscores /= n
        grads = {"W2": a1.T @ dscores, "b2": dscores.sum(axis=0)}
        da1 = dscores @ p["W2"].T
        da1[z1 <= 0] = 0
        grads["W1"] = X.T @ da1
        grads["b1"] = da1.sum(axis=0)
        return loss, grads

    def step(self, X, y) -> float:
        loss, grads = self.loss(X, y)
        for k, dW in grads.items():
            v = self.mu * self.velocity[k] - self.lr * dW
            self.velocity[k] = v
            self.params[k] += v
        return loss


def numpy_textbook(w: Workload) -> Contender:
    if w.device.type != "cpu":
        raise Unavailable("the NumPy textbook runs on the CPU only")
    rng = np.random.default_rng(SEED)
    net = TextbookNet(IN_FEATURES, w.hidden, NUM_CLASSES, lr=LR, mu=MOMENTUM, rng=rng)
    X, Y, bs = w.data.x_train, w.data.y_train, w.batch_size

    def epoch():
        perm = rng.permutation(len(X))
        for s in range(0, len(X), bs):
            idx = perm[s:s + bs]
            net.step(X[idx], Y[idx])

    def accuracy(x, y):
        return float((net.scores(x).argmax(axis=1) == y).mean())

    return Contender("textbook", epoch, accuracy)


def torch_eager(w: Workload, compiled: bool = False) -> Contender:
    torch = _import_torch()
    if compiled and w.device.type != "cuda":
        raise Unavailable("torch.compile is benchmarked on CUDA only")
    from torch import nn

    dev = torch.device("cpu" if w.device.type == "cpu" else f"cuda:{w.device.index}")
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(IN_FEATURES, w.hidden), nn.ReLU(),
                          nn.Linear(w.hidden, NUM_CLASSES)).to(dev)
    for layer in (model[0], model[2]):  # He init, zero bias: gpunet's initialisation
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    X = torch.as_tensor(to_numpy(w.data.x_train)).to(dev)
    Y = torch.as_tensor(to_numpy(w.data.y_train)).to(dev)
    n, bs = len(Y), w.batch_size

    def forward(xb, yb):
        return loss_fn(model(xb), yb)

    def mark_step():
        pass

    if compiled:
        forward = torch.compile(forward, mode="reduce-overhead", dynamic=False)
        mark_step = torch.compiler.cudagraph_mark_step_begin

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(xb, yb):
        mark_step()
        loss = forward(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch():
        perm = torch.randperm(n, device=dev)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            step(X[idx], Y[idx])
        sync()

    if compiled:  # compile and record the graphs for both batch shapes outside the timing
        try:
            for size in sorted({bs, n % bs or bs}):
                for _ in range(3):
                    step(X[:size], Y[:size])
            sync()
        except Exception as exc:
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc

    def accuracy(x, y):
        with torch.no_grad():
            xt = torch.as_tensor(to_numpy(x)).to(dev)
            yt = torch.as_tensor(to_numpy(y)).to(dev)
            return float((model(xt).argmax(dim=1) == yt).float().mean())

    return Contender("torch_compile" if compiled else "torch", epoch, accuracy)


def gemm_floor(w: Workload, input_grad: bool = False) -> Contender:
    """The matrix products of one step on contiguous batches, with preallocated outputs."""
    xp, X, bs, h_dim = w.device.xp, w.data.x_train, w.batch_size, w.hidden
    rng = np.random.default_rng(SEED)

    def array(*shape, scale=1.0):
        return to_device((rng.standard_normal(shape) * scale).astype(np.float32), w.device)

    W1, W2 = array(IN_FEATURES, h_dim, scale=(2 / IN_FEATURES) ** 0.5), array(h_dim, NUM_CLASSES)
    g = array(bs, NUM_CLASSES, scale=1 / bs)  # stands in for the loss gradient
    h, logits, dh = xp.empty((bs, h_dim), np.float32), xp.empty((bs, NUM_CLASSES), np.float32), \
        xp.empty((bs, h_dim), np.float32)
    dW1, dW2, dx = xp.empty_like(W1), xp.empty_like(W2), xp.empty((bs, IN_FEATURES), np.float32)

    def epoch():
        for s in range(0, len(X), bs):
            x = X[s:s + bs]
            m = len(x)
            xp.matmul(x, W1, out=h[:m])
            xp.matmul(h[:m], W2, out=logits[:m])
            xp.matmul(h[:m].T, g[:m], out=dW2)
            xp.matmul(g[:m], W2.T, out=dh[:m])
            xp.matmul(x.T, dh[:m], out=dW1)
            if input_grad:
                xp.matmul(dh[:m], W1.T, out=dx[:m])
        w.synchronize()

    return Contender("floor_input_grad" if input_grad else "floor", epoch)


FACTORIES = {
    "trainer": gpunet_trainer,
    "layer_api": gpunet_layer_api,
    "textbook": numpy_textbook,
    "torch": torch_eager,
    "torch_compile": lambda w: torch_eager(w, compiled=True),
    "floor": gemm_floor,
    "floor_input_grad": lambda w: gemm_floor(w, input_grad=True),
}
