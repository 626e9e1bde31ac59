"""How far 16-bit results may lie from what they stand for: a step against its float64 reference, and
float32 sums against the 16-bit tensors they stand for (the fused blocks' hand-off)."""

import torch

#: Largest ``relative_error`` (``‖got − want‖ / ‖want‖``) of a 16-bit decode step on the CPU (the
#: simulator's dataflow, or the unfused PyTorch block) against its float64 reference. Each output is
#: rounded once or twice to the activation dtype (unit roundoff 2^-11 for float16, 2^-8 for
#: bfloat16) on top of float32 arithmetic: measured worst over fresh draws of the tests' shapes,
#: simulator 2.9e-4 / 2.2e-3, unfused block 6.7e-4 / 6.3e-3. float16's bound, about four of its
#: units, fails a slip of half a percent (a softmax scale, a norm's epsilon: 6e-3); bfloat16's is
#: the layers' contract, 1e-2, where such a slip hides under the dtype's own rounding.
STEP_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their 16-bit dtype lie between ``a`` and ``b`` (+0 and -0 the
    same), elementwise, as int32: the bit patterns read as sign-magnitude integers."""

    def ordered(x):
        bits = x.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits + 32768), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_rounds_like(sums: torch.Tensor, out: torch.Tensor) -> None:
    """``sums`` (float32, ``[rows, n]``), rounded to ``out``'s dtype, is ``out`` up to the order of the
    float32 additions (``red.add`` from many blocks, an order no two launches share): few elements
    round differently, and none by more than one unit in the last place of its row's largest value.

    The bound is on the row's scale, not each element's own: the order moves a sum by an amount set
    by the terms added, so an element that nearly cancels can land several of its own (tiny) units
    away (Llama-3.2-1B's MLP block, bfloat16, batch 8 on the H200: 5 units, one element of 16,384).
    The count is what tells an order apart from a wrong input: on Llama-3.2-1B's MLP block in float64
    a relative wobble of 1e-6 in the sums moves 0.2% of the float16 outputs, an input read without
    its rounding about 43% (both dtypes): at most 10% may differ."""
    rounded = sums.to(out.dtype)
    largest = out.float().abs().amax(dim=-1, keepdim=True)
    unit = torch.finfo(out.dtype).eps * torch.exp2(torch.floor(torch.log2(largest)))
    gap = (rounded.float() - out.float()).abs()
    assert (gap <= unit).all(), f"{float((gap / unit).max()):.1f} units of the row's largest value apart"
    differ = ulps_apart(rounded, out) > 0
    assert differ.float().mean() <= 0.1, f"{int(differ.sum())} of {differ.numel()} elements differ"
