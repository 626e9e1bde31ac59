"""Compiled kernels kept on disk, so that a process does not compile what an earlier one did.

Compiling one fused kernel (numba's typing and lowering, NVVM, ptxas) takes 20-30 seconds, and
every launch shape, batch and dtype is a kernel of its own: a model's first step, a benchmark's
every row, each pytest worker paid it again in every process. :func:`jit` compiles as
``cuda.jit(launch_bounds=...)(build(spec))`` always did and has numba keep the result (PTX and
cubin) in its on-disk cache, found again under a key of

- the spec (its ``repr``: every shape, dtype and switch of the kernel) and the builder's name,
- the launch bounds,
- a digest of every ``.py`` file of the clusterlab package (the kernels' code spans several
  modules: the builders, their device functions, ``ptx``, ``plan``),

to which numba adds the signature, the numba-cuda and CUDA runtime versions and the device's
compute capability. Editing any clusterlab source, upgrading numba-cuda or changing GPUs makes
new keys, so a kernel found is the one that would have been compiled.

Where: ``$CLUSTERLAB_CACHE_DIR`` if set (an empty value turns the cache off), else
``$XDG_CACHE_HOME/clusterlab/kernels`` (``~/.cache/clusterlab/kernels``). Nothing is ever evicted:
an entry is about 3 MB (numba keeps the LLVM IR, the PTX and the cubin), and entries of older
sources stay until removed. :func:`entries` lists what is kept and :func:`clear` removes it
(``clusterlab cache [--clear]``); deleting the folder is always safe too. A folder that cannot be
written, or an entry that cannot be read back, costs a compilation and a warning, never a launch.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from . import _numba_private

#: Environment variable naming the cache folder (empty: no cache).
CACHE_DIR_ENV = "CLUSTERLAB_CACHE_DIR"


def cache_dir() -> Path | None:
    """The folder compiled kernels are kept in, or ``None`` where ``$CLUSTERLAB_CACHE_DIR`` is empty."""
    given = os.environ.get(CACHE_DIR_ENV)
    if given is not None:
        return Path(given).expanduser() if given else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clusterlab" / "kernels"


@functools.cache
def source_digest() -> str:
    """SHA-256 over the path and bytes of every ``.py`` file of the clusterlab package, in path order."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def kernel_key(build, spec, launch_bounds: tuple[int, int]) -> str:
    """The key the kernel ``build(spec)`` with ``launch_bounds`` is kept under (a hex digest)."""
    text = repr((f"{build.__module__}.{build.__qualname__}", spec, tuple(launch_bounds), source_digest()))
    return hashlib.sha256(text.encode()).hexdigest()


def jit(build, spec, launch_bounds: tuple[int, int]):
    """``cuda.jit(launch_bounds=launch_bounds)(build(spec))``, its compilations kept in :func:`cache_dir`.

    ``build``: a kernel builder (``build_kernel``, ``build_mlp_kernel``, one of the MLA
    launches' builders); ``spec``: its frozen spec dataclass. Returns numba's dispatcher; its
    first call for a signature (a launch, or ``compile``) loads the kernel from the cache where
    an earlier process left it, else compiles and stores it.
    """
    from numba import cuda

    kernel = cuda.jit(launch_bounds=tuple(launch_bounds))(build(spec))
    where = cache_dir()
    if where is not None:
        _numba_private.cache_on_disk(kernel, str(where), kernel_key(build, spec, launch_bounds))
    return kernel


def entries(directory: Path | None = None) -> list[Path]:
    """The files of the kernels kept in ``directory`` (default :func:`cache_dir`), sorted; none where
    the cache is off or the folder does not exist. Other files in the folder are not entries."""
    directory = cache_dir() if directory is None else Path(directory)
    if directory is None or not directory.is_dir():
        return []
    return sorted({path for pattern in _numba_private.CACHE_FILE_PATTERNS for path in directory.glob(pattern)})


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Remove the kept kernels' files from ``directory`` (default :func:`cache_dir`), leaving any
    other file; returns how many files and bytes were removed. A process compiles what it needs
    again (raises ``OSError`` where a file cannot be removed)."""
    removed = freed = 0
    for path in entries(directory):
        size = path.stat().st_size
        path.unlink()
        removed, freed = removed + 1, freed + size
    return removed, freed
