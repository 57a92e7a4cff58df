"""Old name of ``cpu_sparse_gemv`` (the C++ CPU kernel's module), kept while importers move to
``wisparse_compile.kernels`` (``cpu_compile_patches``, ``input_major_gemm_is_slow``) or the new module."""

from .cpu_sparse_gemv import (  # noqa: F401
    CPU_KERNEL_DTYPES,
    CPU_KERNEL_MAX_ROWS,
    cpu_compile_patches,
    cpu_kernel_available,
    cpu_sparse_gemv,
    input_major_gemm_is_slow,
    uses_cpu_kernel,
)
