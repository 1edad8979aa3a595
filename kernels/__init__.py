"""Fused Triton kernels of staged, installed as ``staged.kernels``.

Each op lives in one file beside its autograd Function; its plain-PyTorch reference lives in
``staged.kernels.reference`` where tests and benchmarks import it.
"""
