"""The kernels: the fast paths of gpunet's formulas, one module per engine.

    cpu.py     compiled CPU kernels (_cpu_kernels.c), optional, with NumPy as the fallback
    blas.py    numpy's own OpenBLAS, called directly (axpy, axpby, gemm)
    cuda.py    CUDA kernels on CuPy arrays, and their launch configurations
    cublas.py  gpunet's own cuBLAS binding, for products a CUDA graph can capture

They sit just above ``backend`` and import nothing else of gpunet: they take arrays and
numbers, and the layers above decide when to call them.
"""
