"""Kernels for the optimizers' hot paths, one module per kernel.

Each module has a PyTorch reference (the CPU path and the test oracle) and a Triton kernel with
the same signature; the public function dispatches (``kernels.dispatch``): Triton for CUDA
tensors when triton is installed, the reference otherwise. Tests run every Triton kernel on CPU
under ``TRITON_INTERPRET=1`` and compare it with its reference.
"""
