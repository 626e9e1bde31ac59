"""Compile-side tools that need no GPU: a kernel's PTX for Hopper, and ``ptxas`` to assemble it.

NVVM copies inline-asm text into the PTX unread, so a typo in a PTX string only shows up when
``ptxas`` assembles the module. The ``ptx`` tests of every kernel module therefore do::

    from clusterlab.toolchain import assemble, kernel_ptx

    ptx = kernel_ptx(my_kernel, (float32[::1], float32[::1]))   # PTX text for cc 9.0
    assert "mapa.shared::cluster.u32" in ptx
    result = assemble(ptx)                                      # raises PtxasError on a typo
    assert result.spill_bytes == 0

``ptxas`` is looked up in this order: the ``nvidia-cuda-nvcc`` wheel (``pip install
nvidia-cuda-nvcc``, part of clusterlab's ``test`` extra; its ptxas matches the PTX ISA of the
``nvidia-nvvm`` wheel numba compiles with), ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, then
``/usr/local/cuda/bin``.
A missing ptxas raises :class:`PtxasNotFound`: a check that was meant to run must not pass silently.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Distributions that ship ptxas (the CUDA 13 wheel, then the CUDA 12 ones).
_NVCC_WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-nvcc-cu13", "nvidia-cuda-nvcc-cu12")
#: Where a CUDA toolkit installs ptxas when nothing else says where it is.
_DEFAULT_TOOLKIT_PTXAS = Path("/usr/local/cuda/bin/ptxas")


class PtxasNotFound(RuntimeError):
    """No ``ptxas`` executable was found; the message says where clusterlab looked."""


class PtxasError(RuntimeError):
    """``ptxas`` rejected a PTX module; the message carries its diagnostics."""


def _wheel_ptxas() -> Path | None:
    for name in _NVCC_WHEELS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            if file.name == "ptxas" and file.parent.name == "bin":
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return path
    return None


@functools.cache
def find_ptxas() -> str:
    """Path of the ``ptxas`` to use (see the module docstring for the search order)."""
    candidates = [_wheel_ptxas()]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]) / "bin" / "ptxas")
    on_path = shutil.which("ptxas")
    candidates += [Path(on_path) if on_path else None, _DEFAULT_TOOLKIT_PTXAS]
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise PtxasNotFound(
        "ptxas not found: install the nvidia-cuda-nvcc wheel (`pip install nvidia-cuda-nvcc`, in "
        "clusterlab's `test` extra), or set CUDA_HOME to a CUDA toolkit, or put ptxas on PATH"
    )


@dataclass(frozen=True)
class Assembly:
    """A module that ``ptxas`` accepted: the cubin bytes and its ``-v`` resource report."""

    cubin: bytes
    log: str

    @property
    def registers(self) -> int:
        """Most registers any kernel of the module uses (``Used N registers``)."""
        return max((int(n) for n in re.findall(r"Used (\d+) registers", self.log)), default=0)

    @property
    def spill_bytes(self) -> int:
        """Bytes of register spill stores plus loads over all kernels (0 for healthy kernels)."""
        return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", self.log))

    @property
    def code_bytes(self) -> int:
        """Bytes of machine code over all kernels: the cubin's ``.text`` sections, read with
        ``pyelftools`` (on Hopper 16 bytes an instruction). What the SM's instruction cache must hold;
        code that runs once a launch is fetched from memory each time it runs."""
        from elftools.elf.elffile import ELFFile

        elf = ELFFile(io.BytesIO(self.cubin))
        return sum(section.data_size for section in elf.iter_sections() if section.name.startswith(".text"))


def assemble(ptx: str, arch: str = "sm_90a") -> Assembly:
    """Assemble PTX text with ``ptxas -arch=<arch> -v``; raise :class:`PtxasError` if it is rejected.

    ``sm_90a`` (the default) accepts everything Hopper offers, including PTX whose ``.target`` is
    plain ``sm_90`` as numba emits it.
    """
    ptxas = find_ptxas()
    with tempfile.TemporaryDirectory(prefix="clusterlab-ptxas-") as tmp:
        source = Path(tmp) / "module.ptx"
        output = Path(tmp) / "module.cubin"
        source.write_text(ptx)
        done = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", "-o", str(output), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise PtxasError(f"{ptxas} -arch={arch} rejected the PTX:\n{done.stderr.strip()}")
        return Assembly(cubin=output.read_bytes(), log=done.stdout + done.stderr)


def kernel_ptx(kernel, signature, *, cc=(9, 0), **options) -> str:
    """PTX text of ``kernel`` compiled for ``signature`` at compute capability ``cc``; no GPU needed.

    ``kernel`` is a Python function or a ``@cuda.jit`` dispatcher (its Python function is used;
    pass compile options such as ``lineinfo=True`` or ``launch_bounds`` in ``options``, they are
    forwarded to ``numba.cuda.compile_ptx``). ``signature`` is a tuple of numba argument types.
    Device functions the kernel calls are compiled for ``cc`` too, so this works without a GPU.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise RuntimeError("kernel_ptx cannot compile while NUMBA_ENABLE_CUDASIM is set; unset it for PTX checks")
    from numba import cuda

    from ._numba_private import compiler_problem, copy_inlined_callees_whole, device_functions_compiled_for

    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(f"kernel_ptx cannot compile: {problem}")
    copy_inlined_callees_whole()
    with device_functions_compiled_for(cc):
        ptx, _ = cuda.compile_ptx(getattr(kernel, "py_func", kernel), signature, cc=cc, **options)
    return ptx


def without_names(ptx: str) -> str:
    """``ptx`` with the names that differ between two compilations of the same code (numba's mangled
    function names, its shared-array symbols) replaced by ``NAME``: equal for equal code."""
    return re.sub(r"_ZN\w+|_cudapy_smem_\d+", "NAME", ptx)
