"""The cluster argmax of the decoder's pick (``clusterlab.models.argmax``) against ``torch.argmax``.

- The simulator's twin (``argmax_simulated``, any machine): ``torch.argmax``'s index for random rows,
  ties, infinities and NaN at cluster sizes 1 to 16; without either cluster barrier, a hazard.
- ``ptx``: the kernel compiles for sm_90a and ptxas accepts it (no GPU needed).
- ``gpu``: on a Hopper GPU, into a poisoned ``out``, the same index as ``torch.argmax`` on the
  same device for random rows of vocabulary sizes from 1 to Qwen2's, ties, infinities and NaN, and
  replayed in a CUDA graph with new logits.
- Bad arguments raise before any launch (anywhere).
"""

import numpy as np
import pytest
import torch
from program_variants import without_line

from clusterlab import simulator
from clusterlab.models import argmax_simulated
from clusterlab.models.argmax import ArgmaxSpec, argmax_last, argmax_rows, argmax_signature, build_argmax_kernel

#: Vocabulary sizes: fewer logits than blocks, one warp's worth, a slice a thread or less, Llama-2's,
#: Llama-3's, Qwen2's.
VOCABS = (1, 7, 33, 1000, 32000, 128256, 152064)
POISON = -7


def _hard_rows(rng, vocab):
    """Rows whose winner is decided by the order's rules: ties (in one slice and across slices), all
    -inf, +inf from the middle on, NaN (two, and one in the last slice), and plain random."""
    rows = rng.standard_normal((8, vocab)).astype(np.float32)
    rows[0, rng.integers(0, vocab, 3)] = 50.0
    rows[1, [vocab - 1, 0]] = 50.0
    rows[2] = -np.inf
    rows[3, vocab // 2:] = np.inf
    rows[4, [vocab - 1, vocab // 3]] = np.nan
    rows[5, -1] = np.nan
    return rows


@pytest.mark.parametrize("cluster_size", [1, 2, 5, 16])
@pytest.mark.parametrize("vocab", [1, 7, 33, 1000])
def test_the_simulated_cluster_gives_torchs_index(cluster_size, vocab):
    rng = np.random.default_rng()
    logits = _hard_rows(rng, vocab)
    expected = torch.from_numpy(logits).argmax(-1).numpy()
    np.testing.assert_array_equal(argmax_simulated.argmax_rows(logits, cluster_size), expected)


@pytest.mark.parametrize("barrier, hazard", [("1", simulator.DataRace), ("3", simulator.ExitedBlockAccess)])
def test_a_missing_cluster_barrier_is_caught(barrier, hazard):
    """Without barrier 1 block 0 reads a winner before it is written; without barrier 3 a block exits
    while block 0 still reads its winner."""
    program = without_line(argmax_simulated.argmax_block, f"yield b.cluster_sync()  # {barrier}:")
    row = np.random.default_rng().standard_normal(100).astype(np.float32)
    with pytest.raises(hazard):
        simulator.launch(program, 4, row, np.zeros(1, np.int64), 0)


def test_the_simulated_cluster_rejects_what_is_not_a_float32_matrix():
    with pytest.raises(ValueError, match="logits must be a float32 array"):
        argmax_simulated.argmax_rows(np.zeros((2, 3)))


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
