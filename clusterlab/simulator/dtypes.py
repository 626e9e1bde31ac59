"""Element types and reduction operators shared by the simulator and the GPU kernels.

Names, not NumPy objects, are the public currency (the CLI takes ``--dtype bfloat16``), so this
module maps names to NumPy dtypes and fixes the arithmetic every ClusterReduce uses:

================  ===================  =====================================================
input dtype       accumulation dtype   note
================  ===================  =====================================================
``float16``       ``float32``          widened exactly when a block stages its row
``bfloat16``      ``float32``          ``ml_dtypes.bfloat16`` stands in (NumPy has no bf16)
``float32``       ``float32``
``float64``       ``float64``
``int32``         ``int32``            sums wrap modulo 2**32, as ``add.s32`` does
================  ===================  =====================================================

Operators are binary NumPy ufuncs applied in the accumulation dtype, ``acc = op(left, right)``:

- ``sum`` is ``np.add`` (IEEE round to nearest even, no fused or pairwise sums);
- ``max`` is ``np.maximum``: NaN if either operand is NaN, else ``left if left > right else right``
  (so on a tie between ``-0.0`` and ``+0.0`` the *right* operand's bits win);
- ``min`` is ``np.minimum``: NaN if either operand is NaN, else ``left if left < right else right``.

The result is rounded once, at the very end, with ``astype(input dtype)`` (round to nearest even,
PTX ``cvt.rn``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .inputs import check_choice

#: Element types every ClusterReduce / ClusterGather accepts, by name.
DTYPES = ("float32", "float16", "float64", "int32", "bfloat16")

#: Reduction operators of ClusterReduce, by name.
OPS = ("sum", "max", "min")

_NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
    "int32": np.dtype(np.int32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

_ACCUMULATION_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float32),
    "bfloat16": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int32": np.dtype(np.int32),
}

_OP_UFUNCS = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for one of :data:`DTYPES` (``"bfloat16"`` gives ``ml_dtypes.bfloat16``)."""
    check_choice("dtype", name, DTYPES)
    return _NUMPY_DTYPES[name]


def dtype_name(dtype) -> str:
    """The :data:`DTYPES` name of a NumPy dtype (or of a name, ``"float16"``).

    TypeError naming ``x.dtype`` and listing :data:`DTYPES` if it is none of them, including
    ``None`` (which NumPy would read as float64) and what NumPy does not know as a dtype.
    """
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except (TypeError, ValueError):
        name = None
    if name not in _NUMPY_DTYPES:
        raise TypeError(f"x.dtype must be one of {DTYPES}; got {name or dtype!r}")
    return name


def accumulation_dtype(dtype) -> np.dtype:
    """The dtype partials are kept and exchanged in, for an input dtype (see the module table)."""
    return _ACCUMULATION_DTYPES[dtype_name(dtype)]


def op_ufunc(op: str) -> np.ufunc:
    """The NumPy ufunc of one of :data:`OPS`, applied as ``op(left, right)``."""
    check_choice("op", op, OPS)
    return _OP_UFUNCS[op]

