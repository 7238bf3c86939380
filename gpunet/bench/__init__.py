"""Speed, side by side, in one run: ``python -m gpunet.bench [--device cpu|cuda|cuda:N]``.

One training epoch of the MNIST MLP (784-H-10, ReLU, batch 128, SGD with momentum 0.9, float32,
data already on the device) is timed for each contender:

    trainer           gpunet's Trainer.train_epoch, the loop behind train.py
    layer_api         gpunet's public layers, loss and optimizer in the loop a user writes
    textbook          the cs231n two-layer net in plain NumPy, float32 (CPU only)
    torch             PyTorch eager, same model, data and batch, on the same device
    torch_compile     torch.compile(mode="reduce-overhead") of model + loss (CUDA only)
    floor             the five matrix products of gpunet's step and nothing else
    floor_input_grad  the same plus the first layer's input gradient, the sixth product that a
                      layer-by-layer backward computes (gpunet's model.backward by default)

Every contender is warmed up once, then each runs once per round, the order rotating every round;
medians and ratios are printed as a markdown table (with each ratio also taken within every round,
whose samples are seconds apart) and every sample goes to a JSON file. The run
also times the default recipe to 98% test accuracy and, on a GPU, adds the launch-overhead floor
and a kernel benchmark of the fused cross-entropy. Benchmarks print and write numbers; nothing
here asserts on them.

The parts, one concern a file:

    common.py       the workload, the contenders' names, shared helpers
    contenders.py   the contenders and the GEMM floors (either device)
    gpu.py          the launch-overhead floor and the cross-entropy kernel table (GPU only)
    protocol.py     warm-up, rotating rounds, summaries, ratios, time to 98%
    machine.py      the machine and the versions
    report.py       the markdown report
    __main__.py     the command line
"""
