"""The cluster argmax of the decoder's pick (``clusterlab.models.argmax``) against ``torch.argmax``.

- ``ptx``: the kernel compiles for sm_90a and ptxas accepts it (no GPU needed).
- ``gpu``: on a Hopper GPU, into a poisoned ``out``, the same index as ``torch.argmax`` on the
  same device for random rows of vocabulary sizes from 1 to Qwen2's, ties, infinities and NaN, and
  replayed in a CUDA graph with new logits.
- Bad arguments raise before any launch (anywhere).
"""

import pytest
import torch

from clusterlab.models.argmax import ArgmaxSpec, argmax_last, argmax_rows, argmax_signature, build_argmax_kernel

#: Vocabulary sizes: fewer logits than blocks, one warp's worth, a slice a thread or less, Llama-2's,
#: Llama-3's, Qwen2's.
VOCABS = (1, 7, 33, 1000, 32000, 128256, 152064)
POISON = -7


@pytest.mark.ptx
def test_the_kernel_assembles_with_a_cluster_exchange_and_no_spill():
    from clusterlab.toolchain import assemble, kernel_ptx

    spec = ArgmaxSpec()
    ptx = kernel_ptx(build_argmax_kernel(spec), argmax_signature(), launch_bounds=(spec.threads, 1))
    assert "ld.shared::cluster.f32" in ptx and "ld.shared::cluster.s32" in ptx
    assert ptx.count("barrier.cluster.arrive") == 2
    assert assemble(ptx).spill_bytes == 0


def test_bad_logits_and_out_raise_naming_them():
    with pytest.raises(ValueError, match="logits must be a float32 CUDA tensor"):
        argmax_rows(torch.randn(2, 10))
    with pytest.raises(ValueError, match="logits must be a float32 CUDA tensor"):
        argmax_rows([[1.0, 2.0]])


def test_off_a_gpu_the_pick_is_torchs_own():
    logits = torch.randn(3, 1000)
    logits[1, 10] = logits[1, 20] = 1e4
    assert torch.equal(argmax_last(logits), logits.argmax(-1))


def _poisoned(rows):
    return torch.full((rows,), POISON, dtype=torch.int64, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_random_rows_give_torchs_index(rows, vocab):
    logits = torch.randn(rows, vocab, device="cuda") * torch.rand(rows, 1, device="cuda") * 20
    out = _poisoned(rows)
    got = argmax_rows(logits, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, logits.argmax(-1)), (got.tolist(), logits.argmax(-1).tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [33, 32000, 128256])
def test_ties_infinities_and_nan_give_torchs_index(vocab):
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    rows = []
    for _ in range(4):  # equal maxima in different blocks' slices, and within one slice
        row = torch.randn(vocab, device="cuda", generator=g)
        at = torch.randint(0, vocab, (3,), device="cuda", generator=g)
        row[at] = 50.0
        rows.append(row)
    rows.append(torch.full((vocab,), float("-inf"), device="cuda"))  # all -inf: index 0
    row = torch.randn(vocab, device="cuda", generator=g)
    row[vocab // 2:] = float("inf")  # +inf from the middle on: the first of them
    rows.append(row)
    row = torch.randn(vocab, device="cuda", generator=g)
    row[[vocab - 1, vocab // 3]] = float("nan")  # NaN wins, the first NaN
    rows.append(row)
    row = torch.randn(vocab, device="cuda", generator=g)
    row[-1] = float("nan")  # in the last block's slice
    rows.append(row)
    logits = torch.stack(rows)
    got = argmax_rows(logits, out=_poisoned(len(rows)))
    assert torch.equal(got, logits.argmax(-1)), (got.tolist(), logits.argmax(-1).tolist())


@pytest.mark.gpu
def test_a_cuda_graph_replays_it_on_new_logits():
    logits = torch.randn(4, 128256, device="cuda")
    out = _poisoned(4)
    argmax_rows(logits, out=out)  # compile and load before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax_rows(logits, out=out)
    for _ in range(3):
        logits.copy_(torch.randn(4, 128256, device="cuda"))
        out.fill_(POISON)
        graph.replay()
        assert torch.equal(out, logits.argmax(-1))


@pytest.mark.gpu
def test_a_wrong_out_raises_before_the_launch():
    logits = torch.randn(2, 100, device="cuda")
    with pytest.raises(ValueError, match=r"out must be a contiguous int64 tensor of shape \(2,\)"):
        argmax_rows(logits, out=torch.empty(3, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="out must be"):
        argmax_rows(logits, out=torch.empty(2, dtype=torch.int32, device="cuda"))
