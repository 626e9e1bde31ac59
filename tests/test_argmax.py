"""The cluster argmax of the decoder's pick (``clusterlab.models.argmax``) against ``torch.argmax``.

- The simulator's twin (``argmax_simulated``, any machine): ``torch.argmax``'s index for random rows,
  ties, infinities and NaN at cluster sizes 1 to 16; without either cluster barrier, a hazard.
- ``ptx``: the kernel compiles for sm_90a and ptxas accepts it (no GPU needed).
- ``gpu``: on a Hopper GPU, into a poisoned ``out``, the same index as ``torch.argmax`` on the
  same device for random rows of vocabulary sizes from 1 to Qwen2's, ties, infinities and NaN, and
  replayed in a CUDA graph with new logits.
- Bad arguments raise before any launch (anywhere).
- ``pick_and_record``, the decoder's pick and its bookkeeping in one launch: on a Hopper GPU the
  same tokens, history, counts, done flags and positions as its PyTorch steps on the CPU, and in a
  CUDA graph replayed step after step; the PyTorch steps themselves against a plain loop.
"""

import numpy as np
import pytest
import torch
from program_variants import without_line

from clusterlab import simulator
from clusterlab.models import argmax_simulated
from clusterlab.models.argmax import (
    ArgmaxSpec,
    argmax_rows,
    argmax_signature,
    build_argmax_kernel,
    pick_and_record,
)

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
@pytest.mark.parametrize("records", [False, True])
def test_the_kernel_assembles_with_a_cluster_exchange_and_no_spill(records):
    from clusterlab.toolchain import assemble, kernel_ptx

    spec = ArgmaxSpec(records=records)
    ptx = kernel_ptx(build_argmax_kernel(spec), argmax_signature(spec), launch_bounds=(spec.threads, 1))
    assert "ld.shared::cluster.f32" in ptx and "ld.shared::cluster.s32" in ptx
    assert ptx.count("barrier.cluster.arrive") == 2
    assert assemble(ptx).spill_bytes == 0


def test_bad_logits_and_out_raise_naming_them():
    with pytest.raises(ValueError, match="logits must be a float32 CUDA tensor"):
        argmax_rows(torch.randn(2, 10))
    with pytest.raises(ValueError, match="logits must be a float32 CUDA tensor"):
        argmax_rows([[1.0, 2.0]])


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


# -- pick_and_record ------------------------------------------------------------------------------

MAX_NEW = 5


def _decoder_state(rng, rows, vocab, device="cpu"):
    """Scores whose winners are partly end-of-sequence ids, and the decoder's buffers mid-run:
    counts differ per row (one row at max_new, whose history the kernel must not touch), some rows
    already done, history poisoned."""
    scores = torch.from_numpy(rng.standard_normal((rows, vocab)).astype(np.float32))
    winners = scores.argmax(-1)
    eos = torch.tensor([int(winners[0]), vocab + 3], dtype=torch.int64)  # row 0 ends; an id never picked
    state = {
        "tokens": torch.full((rows,), POISON, dtype=torch.int64),
        "history": torch.full((rows, MAX_NEW), POISON, dtype=torch.int64),
        "counts": torch.from_numpy(rng.integers(0, MAX_NEW, rows)),
        "done": torch.from_numpy(rng.random(rows) < 0.3),
        "eos": eos,
        "positions": torch.from_numpy(rng.integers(0, 1000, rows).astype(np.int32)),
    }
    if rows > 1:
        state["counts"][-1] = MAX_NEW
    return scores.to(device), {k: v.to(device) for k, v in state.items()}


def _recorded_by_a_loop(scores, state, advance):
    """What the decoder's record means, one row at a time."""
    want = {k: v.clone() for k, v in state.items()}
    for b, w in enumerate(scores.argmax(-1).tolist()):
        want["tokens"][b] = w
        if want["counts"][b] < MAX_NEW:
            want["history"][b, want["counts"][b]] = w
        want["counts"][b] += 1
        want["done"][b] |= w in state["eos"].tolist()
        want["positions"][b] += advance
    return want


@pytest.mark.parametrize("advance", [0, 1])
def test_off_a_gpu_pick_and_record_does_what_a_plain_loop_does(advance):
    rng = np.random.default_rng()
    scores, state = _decoder_state(rng, 4, 50)
    state["counts"][-1] = MAX_NEW - 1  # PyTorch's scatter cannot skip a row: every count in range
    want = _recorded_by_a_loop(scores, state, advance)
    pick_and_record(scores, **state, advance=advance)
    for name in state:
        assert torch.equal(state[name], want[name]), name


def test_pick_and_record_rejects_bad_buffers_naming_them():
    rng = np.random.default_rng()
    scores, state = _decoder_state(rng, 3, 20)
    with pytest.raises(TypeError, match="positions has dtype torch.int64"):
        pick_and_record(scores, **(state | {"positions": state["positions"].long()}), advance=1)
    with pytest.raises(ValueError, match=r"done has shape \(2,\)"):
        pick_and_record(scores, **(state | {"done": state["done"][:2]}), advance=1)
    with pytest.raises(ValueError, match="eos must be an int64 tensor of at least one id"):
        pick_and_record(scores, **(state | {"eos": torch.zeros(0, dtype=torch.int64)}), advance=1)
    with pytest.raises(ValueError, match="scores must be a float32 tensor"):
        pick_and_record(scores.double(), **state, advance=1)


@pytest.mark.gpu
@pytest.mark.parametrize("advance", [0, 1])
@pytest.mark.parametrize("rows, vocab", [(1, 128256), (4, 32000), (8, 1000)])
def test_pick_and_record_on_the_gpu_records_what_a_plain_loop_does(rows, vocab, advance):
    rng = np.random.default_rng()
    scores, state = _decoder_state(rng, rows, vocab, "cuda")
    want = _recorded_by_a_loop(scores.cpu(), {k: v.cpu() for k, v in state.items()}, advance)
    pick_and_record(scores, **state, advance=advance)
    for name in state:
        assert torch.equal(state[name].cpu(), want[name]), (name, state[name].tolist(), want[name].tolist())


@pytest.mark.gpu
def test_pick_and_record_replays_in_a_cuda_graph_step_after_step():
    rng = np.random.default_rng()
    scores, state = _decoder_state(rng, 4, 128256, "cuda")
    state["counts"].zero_()
    state["done"].zero_()
    pick_and_record(scores, **state, advance=1)  # compile and load before the capture
    state["counts"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pick_and_record(scores, **state, advance=1)
    for _ in range(MAX_NEW):
        scores.copy_(torch.randn(4, 128256, device="cuda"))
        want = _recorded_by_a_loop(scores.cpu(), {k: v.cpu() for k, v in state.items()}, 1)
        graph.replay()
        for name in state:
            assert torch.equal(state[name].cpu(), want[name]), name
