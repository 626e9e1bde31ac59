"""Checks of float32 sums against the 16-bit tensors they stand for (the fused blocks' hand-off)."""

import torch


def assert_rounds_like(sums: torch.Tensor, out: torch.Tensor) -> None:
    """``sums`` (float32), rounded to ``out``'s dtype, is ``out`` up to the order of the float32
    additions (``red.add`` from many blocks, an order no two launches share): an element may
    round one unit of the dtype apart, and only a rare one does (an input read without its
    rounding moves many more)."""
    got, want = sums.to(out.dtype).float(), out.float()
    unit = 2.0 ** -10 if out.dtype == torch.float16 else 2.0 ** -7  # a unit in the last place, at most, relative
    differ = got != want
    assert ((got - want).abs() <= unit * want.abs()).all()
    assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {differ.numel()} elements differ"
