"""Which implementation a kernel call runs: Triton on CUDA, the PyTorch reference elsewhere.

BRANCHMERGE_KERNELS=reference|triton|auto (unset = auto) forces one for every module in kernels/. Triton is
optional (the `dev` and `gpu` extras install it): without it `jit` leaves the kernel functions undecorated and
only the references run. With TRITON_INTERPRET=1 set before import, Triton runs kernels on CPU tensors (tests).
"""
from __future__ import annotations

import os
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references are all there is
    triton = tl = None

Backend = Literal["reference", "triton"]
ENV = "BRANCHMERGE_KERNELS"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def triton_available() -> bool:
    return triton is not None


def _probe():
    pass


_PROBE = jit(_probe)


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return triton is not None and type(_PROBE).__name__ == "InterpretedFunction"


def backend(*tensors: torch.Tensor) -> Backend:
    """The implementation for these tensors: auto picks Triton for CUDA tensors of a Triton dtype."""
    choice = os.environ.get(ENV, "auto") or "auto"
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"{ENV}={choice!r}: expected reference, triton or auto (unset = auto)")
    if choice == "reference":
        return "reference"
    dtype_ok = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if triton is not None and on_cuda and dtype_ok else "reference"
    if triton is None:
        raise RuntimeError(f"{ENV}=triton but triton is not installed: pip install -e '.[dev]' (or '.[gpu]')")
    if not dtype_ok:
        dtypes = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
        raise ValueError(f"{ENV}=triton: the kernels take float32, bfloat16 or float16 tensors; got {dtypes}")
    if not on_cuda and not interpreted():
        raise RuntimeError(f"{ENV}=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "kernels are imported (or move the tensors to CUDA)")
    return "triton"
