"""The final RMSNorm of a fused decode step (``clusterlab.models.final_norm``) against PyTorch's.

- Any machine: off a Hopper GPU it is :func:`clusterlab.models.llama.rms_norm` (transformers'
  ``LlamaRMSNorm`` bit for bit) of the rounded sums plus the residual, and it zeroes both float32
  buffers; bad arguments raise naming them.
- ``ptx``: the kernel compiles for sm_90a and ptxas accepts it without a spill.
- ``gpu``: on a Hopper GPU, into a NaN-poisoned ``out``, within two ulps of the model dtype of the
  same PyTorch chain on the same device (only the order of the sum of squares differs, which moves
  ``rsqrt`` by an ulp of float32 and so an element of ``n`` by at most one rounding step, then the
  gain's product by another), the buffers zeroed, and replayed in a CUDA graph on new inputs.
"""

import pytest
import torch

from clusterlab.models.final_norm import (
    FinalNormSpec,
    build_final_norm_kernel,
    final_norm,
    final_norm_signature,
)
from clusterlab.models.llama import rms_norm

#: Two ulps of each dtype at 1.0, relative: the tolerance the module docstring justifies.
TWO_ULPS = {torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
EPS = 1e-5


def _inputs(rows, hidden, dtype, device):
    sums = torch.randn(rows, hidden, device=device) * 3
    clear = torch.randn(rows, hidden, device=device)
    residual = (torch.randn(rows, hidden, device=device) * 2).to(dtype)
    norm = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    return sums, clear, residual, norm


def _expected(sums, residual, norm):
    return rms_norm(sums.to(residual.dtype) + residual, norm, EPS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_pytorch_chain_is_transformers_llama_rms_norm_bit_for_bit(dtype):
    """:func:`rms_norm`, what the kernel and the CPU path are held to, rounds where transformers'
    ``LlamaRMSNorm`` does (normalized in float32, cast to the dtype, then times the gain in it)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama", reason="transformers (the test extra)")
    _, _, residual, norm = _inputs(5, 96, dtype, "cpu")
    theirs = llama.LlamaRMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(norm)
        assert torch.equal(rms_norm(residual, norm, EPS), theirs(residual))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_off_a_gpu_it_is_the_pytorch_chain_and_it_zeroes_both_buffers(dtype):
    sums, clear, residual, norm = _inputs(3, 96, dtype, "cpu")
    want = _expected(sums, residual, norm)
    out = torch.full_like(residual, float("nan"))
    assert final_norm(sums, clear, residual, norm, EPS, out=out) is out
    assert torch.equal(out, want)
    assert not sums.any() and not clear.any()


def test_bad_arguments_raise_naming_them():
    sums, clear, residual, norm = _inputs(2, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="residual must be a float16 or bfloat16 tensor"):
        final_norm(sums, clear, residual.float(), norm, EPS)
    with pytest.raises(TypeError, match="sums has dtype torch.float16"):
        final_norm(sums.half(), clear, residual, norm, EPS)
    with pytest.raises(ValueError, match=r"clear has shape \(2, 32\)"):
        final_norm(sums, clear[:, :32].contiguous(), residual, norm, EPS)
    with pytest.raises(ValueError, match=r"norm has shape \(63,\)"):
        final_norm(sums, clear, residual, norm[:63], EPS)
    with pytest.raises(TypeError, match="out has dtype torch.bfloat16"):
        final_norm(sums, clear, residual, norm, EPS, out=torch.empty(2, 64, dtype=torch.bfloat16))


@pytest.mark.ptx
@pytest.mark.parametrize("hidden", [2048, 3584, 4096, 8192])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_kernel_assembles_without_a_spill(hidden, bf16):
    from clusterlab.models.final_norm import THREADS
    from clusterlab.toolchain import assemble, kernel_ptx

    ptx = kernel_ptx(build_final_norm_kernel(FinalNormSpec(hidden, bf16, EPS)), final_norm_signature(),
                     launch_bounds=(THREADS, 1))
    assert "rsqrt" in ptx or "sqrt" in ptx
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (1, 2048), (3, 3584), (8, 4096), (2, 8192), (5, 100)])
def test_the_kernel_matches_pytorch_within_two_ulps(rows, hidden, dtype):
    sums, clear, residual, norm = _inputs(rows, hidden, dtype, "cuda")
    want = _expected(sums, residual, norm)
    out = torch.full_like(residual, float("nan"))
    final_norm(sums, clear, residual, norm, EPS, out=out)
    torch.testing.assert_close(out, want, rtol=TWO_ULPS[dtype], atol=0)
    assert not sums.any() and not clear.any()


@pytest.mark.gpu
def test_a_cuda_graph_replays_it_on_new_inputs():
    sums, clear, residual, norm = _inputs(4, 4096, torch.float16, "cuda")
    out = torch.empty_like(residual)
    final_norm(sums, clear, residual, norm, EPS, out=out)  # compile and load before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        final_norm(sums, clear, residual, norm, EPS, out=out)
    for _ in range(3):
        new_sums, new_clear, new_residual, _ = _inputs(4, 4096, torch.float16, "cuda")
        sums.copy_(new_sums)
        clear.copy_(new_clear)
        residual.copy_(new_residual)
        want = _expected(sums, residual, norm)
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out, want, rtol=TWO_ULPS[torch.float16], atol=0)
        assert not sums.any() and not clear.any()
