"""The fused SwiGLU MLP block (:mod:`clusterlab.fused.mlp`): out = down(silu(gate(n)) * up(n)),
n = RMSNorm(hidden + residual) * norm.

- ``ptx``: the kernel for the presets' launch shapes assembles for sm_90a with the cluster
  instructions, wide loads, no spill, and fits the register file at its launch bound;
- CPU: the simulator twin (via :class:`DecodeMLP` on CPU tensors) against the float64
  :func:`reference_mlp`, PyTorch's op chain and transformers' ``LlamaMLP`` / ``LlamaRMSNorm``;
  its traces are hazard-free, and dropping either cluster barrier is caught; input checks;
  the :func:`mlp_shape` rule;
- ``gpu``: the kernel on a Hopper GPU (skipped elsewhere by conftest.py) into NaN-poisoned
  outputs, workspace left zero, back-to-back calls, CUDA-graph replays, explicit launch shapes.

Tolerance (the layer's contract, as for the attention block): ``‖out − ref‖/‖ref‖ ≤ 1e-2``.
Inputs and weights are 16-bit on every side (exact in float64); the kernel sums in float32
(~1e-7) but rounds gate, up, silu(gate) and a to the model dtype, as PyTorch's separate ops
do, and the output once more: 2^-11 (float16) or 2^-8 (bfloat16) per element and step. The
simulator measures about 5e-4 (float16) and 5e-3 (bfloat16) from float64; two independently
rounded 16-bit implementations (ours and PyTorch's / transformers') differ by up to ~7e-3 in
bfloat16. The new residual is a single rounding of a float32 sum, so it is checked bit for bit.
"""

import functools
import inspect

import numpy as np
import pytest
import torch
from program_variants import without_line
from rounding import assert_rounds_like

from clusterlab import simulator
from clusterlab.fused import mlp_simulated
from clusterlab.fused.mlp import DecodeMLP, MLPConfig, MLPWeights, mlp_shape, reference_mlp
from clusterlab.fused.kernel import MMA_BATCH, MmaTile
from clusterlab.fused.mlp_kernel import UNWRITTEN_INT32, MLPSpec, build_mlp_kernel, mlp_kernel_signature
from clusterlab.fused.mlp_simulated import simulated_mlp_step
from clusterlab.fused.reference import relative_error
from clusterlab.models.llama import mlp as torch_mlp
from clusterlab.models.llama import rms_norm

TOLERANCE = 1e-2
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}

#: The MLP blocks of released checkpoints (hidden_size, intermediate_size, rms_eps).
MODELS = {
    "llama3-8b": MLPConfig(4096, 14336, 1e-5),
    "llama3.2-1b": MLPConfig(2048, 8192, 1e-5),
    "qwen2.5-7b": MLPConfig(3584, 18944, 1e-6),
    "llama2-7b": MLPConfig(4096, 11008, 1e-5),
}
#: Tiny shapes for the simulator: 176 = 8 x 22 gives slices of 8 and 16 (odd cluster counts).
TINY = {"h64-i176": MLPConfig(64, 176), "h128-i256": MLPConfig(128, 256, 1e-6)}


def random_inputs(config, dtype, batch, seed, device="cpu"):
    """``hidden``, ``residual`` ``[batch, hidden_size]``: fresh N(0, 1) draws of a seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, residual = torch.randn(2, batch, config.hidden_size, generator=gen, device=device).to(dtype)
    return hidden, residual


def exact_residual(hidden, residual):
    """hidden + residual in float32, rounded once to their dtype: what the kernel stores."""
    return (hidden.float() + residual.float()).to(hidden.dtype)


def torch_chain(config, weights, hidden, residual):
    """The block as separate PyTorch ops in the model dtype (clusterlab.models.llama)."""
    return torch_mlp(weights, rms_norm(hidden + residual, weights.norm, config.rms_eps))


def spec_ptx(spec: MLPSpec) -> str:
    """PTX of the MLP kernel of ``spec`` with the launch bound the layer gives it."""
    from clusterlab.toolchain import kernel_ptx

    return kernel_ptx(build_mlp_kernel(spec), mlp_kernel_signature(spec),
                      launch_bounds=(spec.threads, spec.min_blocks_per_sm))


def bits(t):
    return t.view(torch.int16)


# ---------------------------------------------------------------------------------------------- ptx


def test_a_shape_no_cluster_can_split_names_both_sizes_and_the_rule():
    """200 = 8 x 25 splits only over clusters of 1, whose slices of intermediate_size 64 do not tile."""
    with pytest.raises(ValueError, match=r"hidden_size 200 and intermediate_size 64 have no split the fused MLP "
                       r"can tile: clusters of \[1\] blocks \(8 \* cluster_size must divide hidden_size"):
        mlp_shape(MLPConfig(200, 64), 1, 132)


# No shape spills at the launch bound's 128 registers with the test extra's ptxas (CUDA 13) since the
# thread and block numbers are unsigned (docs/fused-decode-notes.md, v54; Qwen2.5-7B's gate/up steps in
# parts of 7 spans spilled 280 bytes before, and ran 3-13% faster than 7 parts of 4 without, v27).
@pytest.mark.ptx
@pytest.mark.parametrize(
    "model, dtype, batch, shape",
    [("llama3-8b", "f16", 1, (2, 64, 16)), ("llama3-8b", "bf16", 8, (2, 64, 16)),
     ("llama3.2-1b", "bf16", 1, (2, 64, 16)), ("llama3.2-1b", "f16", 8, (2, 64, 16)),
     ("qwen2.5-7b", "f16", 8, (4, 37, 8)), ("llama2-7b", "bf16", 1, (4, 43, 8))],
    ids=["llama3-8b-f16-b1", "llama3-8b-bf16-b8", "llama3.2-1b-bf16-b1", "llama3.2-1b-f16-b8", "qwen2.5-7b-f16-b8",
         "llama2-7b-bf16-b1"],
)
def test_kernel_assembles_for_sm90a_with_cluster_exchanges_and_no_spill(model, dtype, batch, shape):
    from clusterlab.toolchain import assemble

    config = MODELS[model]
    assert mlp_shape(config, batch, 132) == shape  # what an H100 or H200 runs
    spec = MLPSpec.of(config, dtype == "bf16", batch, *shape)
    ptx = spec_ptx(spec)
    for instruction in ("mapa.shared::cluster.u32", "ld.shared::cluster.f32", "ld.shared::cluster.v4.f32",
                        "st.shared::cluster.v4.f32",
                        "ld.global.nc.L1::no_allocate.L2::256B.v4.b32", "atom.global.add.f32"):
        assert instruction in ptx, instruction
    # Exactly the two exchanges: B1 (partials complete) and B2 (a pushed to every block).
    assert ptx.count("barrier.cluster.arrive.release") == 2
    assert ptx.count("barrier.cluster.wait.acquire") == 2
    assert "st.local" not in ptx  # every register array was indexed by constants
    assert "st.shared::cluster.f32" not in ptx  # the exchanges push 16 bytes at a time
    assert ".f64" not in ptx  # no float64: numba types uint64 with int64 as float64, so unsigned indices stay uint32
    # Batches multiply on the tensor cores, both projections (mlp_shape picks such a split).
    assert ("mma.sync" in ptx) == (batch >= MMA_BATCH)
    assert isinstance(spec.down_tile(), MmaTile) == (batch >= MMA_BATCH)
    result = assemble(ptx)
    assert result.spill_bytes == 0
    # The register file (64K) holds the blocks the launch bound asks for: 16 warps an SM.
    assert result.registers * spec.threads * spec.min_blocks_per_sm <= 65536
    assert spec.min_blocks_per_sm * spec.warps == 16


@pytest.mark.ptx
@pytest.mark.parametrize("batch", [1, 4])
def test_interleaved_inputs_change_only_the_cuda_core_gate_up_steps(batch):
    """Interleaved inputs (the default) against the plain order: only batch 1's gate/up steps run on the
    CUDA cores, so only its kernel differs, without local arrays or spills the plain one lacks."""
    import dataclasses

    from clusterlab.toolchain import assemble, without_names

    on = MLPSpec.of(MODELS["llama3-8b"], False, batch, *mlp_shape(MODELS["llama3-8b"], batch, 132))
    spec = dataclasses.replace(on, interleave_inputs=False)
    assert on.interleave_inputs and on.inputs_interleaved == (batch == 1) and not spec.inputs_interleaved
    full, interleaved = spec_ptx(spec), spec_ptx(on)
    assert (without_names(full) != without_names(interleaved)) == (batch == 1)
    assert ("st.local" in interleaved) <= ("st.local" in full)  # no local arrays it did not have
    assert assemble(interleaved).spill_bytes <= assemble(full).spill_bytes


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_simulated_handoff_reads_rounded_sums_and_leaves_its_own_unconverted(dtype):
    """``DecodeMLP.handoff`` on the simulator backend: float32 sums in, read rounded; the output sums
    left unconverted (rounded, the plain step's ``out`` bit for bit), the residual as the plain
    step's, the third buffer cleared."""
    dtype = DTYPES[dtype]
    config = TINY["h128-i256"]
    layer = DecodeMLP(config, MLPWeights.random(config, dtype, seed=4))
    sums = torch.randn(3, 2, config.hidden_size)
    sums[1].zero_()
    _, residual = random_inputs(config, dtype, 2, seed=5)
    out, h = layer(sums[0].to(dtype), residual)
    got_h = layer.handoff(sums[0], residual, sums_out=sums[1], clear=sums[2])
    assert torch.equal(sums[1].to(dtype), out) and not torch.equal(sums[1], out.float())
    assert torch.equal(got_h, h) and not sums[2].any()


@pytest.mark.ptx
@pytest.mark.parametrize("model, batch", [("llama3-8b", 1), ("llama3.2-1b", 8)])
def test_the_handoff_kernel_drops_the_finish(model, batch):
    """``MLPSpec.handoff``: no arrival counter and no fence (nobody converts), the same two
    exchanges, no spill."""
    import dataclasses

    from clusterlab.toolchain import assemble

    spec = MLPSpec.of(MODELS[model], False, batch, *mlp_shape(MODELS[model], batch, 132))
    plain, handoff = spec_ptx(spec), spec_ptx(dataclasses.replace(spec, handoff=True))
    assert "atom.global.add.u32" in plain and "membar.gl" in plain
    assert "atom.global.add.u32" not in handoff and "membar.gl" not in handoff
    assert handoff.count("barrier.cluster.arrive.release") == 2 and "st.local" not in handoff
    assert assemble(handoff).spill_bytes == 0


# The work-queue kernel's units at the presets, on an H100 or H200 (132 SMs): a's elements a gate/up unit
# computes, the columns of a W_down tile and its rows.
QUEUE_UNITS = {"llama3-8b": (1, 512, 8), "llama3.2-1b": (2, 512, 8), "qwen2.5-7b": (1, 512, 8),
               "llama2-7b": (1, 256, 16)}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_work_queue_spec_runs_one_block_an_sm_for_one_sequence(model):
    config = MODELS[model]
    spec = MLPSpec.queue(config, False, 1)
    assert (spec.work_queue, spec.cluster_size, spec.clusters, spec.warps) == (True, 1, 132, 16)
    assert spec.min_blocks_per_sm == 1 and spec.inputs_interleaved
    assert (spec.gate_up_tile().step_rows, spec.queue_segment, spec.down_tile().step_rows) == QUEUE_UNITS[model]
    assert spec.intermediate_size % spec.queue_segment == 0 and spec.hidden_size % spec.down_tile().step_rows == 0
    with pytest.raises(ValueError, match="work_queue runs batch 1 only, got batch 2"):
        MLPSpec.queue(config, False, 2)


@pytest.mark.ptx
@pytest.mark.parametrize("model, dtype, handoff", [("llama3-8b", "f16", False), ("llama3-8b", "bf16", True),
                                                   ("llama3.2-1b", "f16", True), ("qwen2.5-7b", "bf16", False),
                                                   ("llama2-7b", "f16", False)])
def test_the_work_queue_kernel_assembles_without_clusters(model, dtype, handoff):
    """No cluster barrier or DSMEM access; a's words handed over by strong stores and relaxed loads,
    the units from an atomic counter, W_down's sums added in global memory; no local arrays, no
    spill (as above; Llama-2-7B's W_down tiles of 256 columns, 16 accumulators a lane, spilled 16
    bytes before v54), one block of 16 warps an SM's registers."""
    import dataclasses

    from clusterlab.toolchain import assemble

    spec = dataclasses.replace(MLPSpec.queue(MODELS[model], dtype == "bf16", 1), handoff=handoff)
    ptx = spec_ptx(spec)
    for instruction in ("ld.relaxed.gpu.global.v4.b32", "atom.global.exch.b32", "atom.global.add.u32",
                        "atom.global.add.f32", "ld.global.nc.L1::no_allocate.L2::256B.v4.b32", "membar.gl"):
        assert instruction in ptx, instruction
    assert "barrier.cluster" not in ptx and "shared::cluster" not in ptx and "st.local" not in ptx
    result = assemble(ptx)
    assert result.spill_bytes == 0
    assert result.registers * spec.threads <= 65536


def test_kernel_options_are_checked_when_the_layer_is_built():
    weights = MLPWeights.random(TINY["h128-i256"], torch.float16, seed=0)
    for options, words in (({"registers": 128}, "unknown name 'registers'; allowed: interleave_inputs"),
                           ({"interleave_inputs": None}, "interleave_inputs=None; allowed: True or False")):
        with pytest.raises(ValueError, match=words):
            DecodeMLP(TINY["h128-i256"], weights, kernel_options=options)
    layer = DecodeMLP(TINY["h128-i256"], weights, kernel_options={"interleave_inputs": False})
    assert not layer.kernel_spec(torch.float16, 1).interleave_inputs
    with pytest.raises(ValueError, match="work_queue=1; allowed: True or False"):
        DecodeMLP(TINY["h128-i256"], weights, kernel_options={"work_queue": 1})
    wide = MLPConfig(5120, 256)  # a hidden row of 640 chunks: 20 loads a lane
    with pytest.raises(ValueError, match="gate/up projection: a row of 640 16-byte chunks needs 20 loads a lane"):
        DecodeMLP(wide, MLPWeights.random(wide, torch.float16, seed=0), kernel_options={"work_queue": True})


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_work_queue_layer_runs_the_queue_for_one_sequence_and_the_simulator_its_dataflow(dtype):
    """``work_queue`` takes the work-queue spec at batch 1 only; on the CPU the simulator runs the
    cluster dataflow either way, with the same outputs."""
    config, dtype = TINY["h128-i256"], DTYPES[dtype]
    weights = MLPWeights.random(config, dtype, seed=2)
    queued, plain = (DecodeMLP(config, weights, kernel_options={"work_queue": on}) for on in (True, False))
    assert queued.queued(1) and not queued.queued(3) and not plain.queued(1)
    assert queued.kernel_spec(dtype, 1) == MLPSpec.queue(config, dtype == torch.bfloat16, 1)
    assert queued.kernel_spec(dtype, 3) == plain.kernel_spec(dtype, 3)
    for batch in (1, 3):
        hidden, residual = random_inputs(config, dtype, batch, seed=batch)
        for got, want in zip(queued(hidden, residual), plain(hidden, residual)):
            assert torch.equal(bits(got), bits(want))


@pytest.mark.ptx
def test_the_timeline_adds_its_stamps_and_two_arguments_only_when_set():
    import dataclasses

    from clusterlab.toolchain import without_names

    def ptx_of(spec):
        return without_names(spec_ptx(spec))

    spec = MLPSpec.of(MODELS["llama3.2-1b"], False, 1, *mlp_shape(MODELS["llama3.2-1b"], 1, 132))
    full, timeline = ptx_of(spec), ptx_of(dataclasses.replace(spec, timeline=True))
    for register in ("%clock64", "%globaltimer", "%smid"):
        assert register not in full and register in timeline
    assert timeline.count(".param .") == full.count(".param .") + 14  # two arrays of 7 fields each
    assert timeline.count("%globaltimer") == 8  # the block's start and the end of each of its 7 phases


# ----------------------------------------------------------------------------------- simulator (CPU)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cluster_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(TINY))
def test_simulated_layer_matches_float64_reference_and_torch_chain(name, dtype, cluster_size, batch):
    config, dtype = TINY[name], DTYPES[dtype]
    seed = 1000 * cluster_size + batch
    weights = MLPWeights.random(config, dtype, seed=seed)
    layer = DecodeMLP(config, weights, cluster_size=cluster_size)
    assert layer.backend == "simulator" and layer.shape(batch)[0] == cluster_size
    hidden, residual = random_inputs(config, dtype, batch, seed + 1)
    out = torch.full_like(hidden, float("nan"))
    new_residual = torch.full_like(hidden, float("nan"))
    got, got_residual = layer(hidden, residual, out=out, residual_out=new_residual)
    assert got is out and got_residual is new_residual
    want, want_residual = reference_mlp(weights, hidden, residual, config.rms_eps)
    assert relative_error(out, want) <= TOLERANCE  # inf if any NaN was left
    assert relative_error(out, torch_chain(config, weights, hidden, residual)) <= TOLERANCE
    assert relative_error(new_residual, want_residual) <= TOLERANCE
    assert torch.equal(bits(new_residual), bits(exact_residual(hidden, residual)))


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_simulated_layer_matches_transformers_llama_mlp(dtype, batch):
    """An independent implementation: transformers' own modules, the code released checkpoints run."""
    transformers = pytest.importorskip("transformers", reason="the cross-check needs transformers (the test extra)")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config, dtype = TINY["h128-i256"], DTYPES[dtype]
    weights = MLPWeights.random(config, dtype, seed=batch)
    hf_config = transformers.LlamaConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                         hidden_act="silu", rms_norm_eps=config.rms_eps, mlp_bias=False)
    hf_mlp = llama.LlamaMLP(hf_config).to(dtype)
    hf_mlp.load_state_dict({"gate_proj.weight": weights.gate, "up_proj.weight": weights.up,
                            "down_proj.weight": weights.down})
    hf_norm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_eps).to(dtype)
    hf_norm.load_state_dict({"weight": weights.norm})
    hidden, residual = random_inputs(config, dtype, batch, seed=50 + batch)
    with torch.no_grad():
        want = hf_mlp(hf_norm(residual + hidden))  # LlamaDecoderLayer: residual add, norm, mlp
    assert want.dtype == dtype
    out, new_residual = DecodeMLP(config, weights)(hidden, residual)
    assert relative_error(out, want) <= TOLERANCE
    assert torch.equal(bits(new_residual), bits(exact_residual(hidden, residual)))


@pytest.mark.parametrize("cluster_size", [2, 4])
def test_simulated_traces_have_two_barriers_and_dsmem_only_in_the_act_phase(cluster_size):
    """simulator.launch raises on the first hazard, so a step that returns is hazard-free; its
    traces show the exchange the kernel does: one cluster per slice, two cluster barriers, DSMEM
    only in phase 2, and every block receiving the cluster's whole ``a``."""
    config, batch, clusters = TINY["h64-i176"], 3, 11
    weights = MLPWeights.random(config, torch.bfloat16, seed=5)
    hidden, residual = random_inputs(config, torch.bfloat16, batch, seed=6)
    traces = []
    out, _ = simulated_mlp_step(config, weights, hidden, residual, cluster_size, clusters, traces=traces)
    assert relative_error(out, reference_mlp(weights, hidden, residual, config.rms_eps)[0]) <= TOLERANCE
    assert len(traces) == clusters
    inter_slice = config.intermediate_size // clusters
    for trace in traces:
        table = trace.phase_table()
        for step in ("1 gate_up", "2 act", "3 down"):
            assert step in table
        assert "2 cluster barriers" in table
        rows = [line for line in table.splitlines() if "shared::cluster" in line]
        assert len(rows) == 1 and "2 act" in rows[0]
        pushed = sum(e.nbytes for e in trace.events if e.kind == "st.shared::cluster")
        assert pushed == cluster_size * batch * inter_slice * 4  # float32 a, to every block


@pytest.mark.parametrize("cluster_size", [2, 4])
@pytest.mark.parametrize(
    "barrier, hazards",
    [("B1", (simulator.DataRace,)), ("B2", (simulator.DataRace, simulator.ExitedBlockAccess))],
)
def test_a_missing_cluster_barrier_is_caught(barrier, hazards, cluster_size):
    """Without B1 an owner reads peers' partials before they are written (a race); without B2 a
    block leaves (or reads its ``a``) while peers still push into or read from it."""
    program = without_line(mlp_simulated.mlp_block, f"yield b.cluster_sync()  # {barrier}:")
    config, batch = TINY["h64-i176"], 2
    weights = MLPWeights.random(config, torch.float16, seed=8)
    hidden, residual = random_inputs(config, torch.float16, batch, seed=9)

    def f32(t):
        return t.float().numpy()

    gm = {"hidden": f32(hidden), "residual": f32(residual), "norm": f32(weights.norm), "gate": f32(weights.gate),
          "up": f32(weights.up), "down": f32(weights.down),
          "residual_out": np.zeros((batch, config.hidden_size), np.float32),
          "out_acc": np.zeros((batch, config.hidden_size), np.float32)}
    with pytest.raises(hazards):
        simulator.launch(program, cluster_size, 0, config, batch, 11, gm, lambda x: x)


def test_kernel_and_simulator_head_their_phases_alike():
    """Kernel and simulator mark each phase with the same ``# -- N name: what`` line, in order."""
    from clusterlab.fused import mlp_kernel

    def headers(*functions):
        lines = "".join(inspect.getsource(f) for f in functions).splitlines()
        return [line.strip().rstrip("- ") for line in lines if line.strip().startswith("# -- ")]

    steps = ["1 gate_up", "2 act", "3 down", "4 finish"]
    in_kernel = headers(mlp_kernel.build_mlp_kernel)
    assert [header.removeprefix("# -- ")[: len(step)] for header, step in zip(in_kernel, steps)] == steps
    assert len(in_kernel) == len(steps)
    assert headers(mlp_simulated.mlp_block, mlp_simulated.simulated_mlp_step) == in_kernel


# ---------------------------------------------------------------------------------------- validation


@pytest.fixture
def tiny_layer():
    config = TINY["h64-i176"]
    return DecodeMLP(config, MLPWeights.random(config, torch.float16, seed=3))


@pytest.mark.parametrize("options, error, match", [
    ({"cluster_size": 3}, ValueError, r"cluster_size must be one of \[1, 2, 4, 8\] .*, got 3"),
    ({"cluster_size": 16}, ValueError, r"cluster_size must be one of \[1, 2, 4, 8\] \(8 \* cluster_size must divide "
                                       r"hidden_size 64\), got 16"),
    ({"warps": 5}, ValueError, r"warps must be one of \(4, 8, 16\), got 5"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"backend": "gpu"}, ValueError, "backend 'gpu' needs the weights on a CUDA device"),
])
def test_layer_rejects_bad_launch_options(tiny_layer, options, error, match):
    with pytest.raises(error, match=match):
        DecodeMLP(tiny_layer.config, tiny_layer.weights, **options)


def test_layer_rejects_bad_steps_before_running(tiny_layer):
    config = tiny_layer.config
    hidden, residual = random_inputs(config, torch.float16, 2, seed=4)
    with pytest.raises(TypeError, match=r"hidden has dtype torch.float32; expected torch.float16"):
        tiny_layer(hidden.float(), residual)
    with pytest.raises(TypeError, match=r"residual has dtype torch.bfloat16; expected torch.float16"):
        tiny_layer(hidden, residual.bfloat16())
    with pytest.raises(ValueError, match=r"residual has shape \(2, 63\); expected \(2, 64\)"):
        tiny_layer(hidden, residual[:, :63].contiguous())
    with pytest.raises(ValueError, match=r"hidden has shape \(64, 2\); expected \(batch, 64\)"):
        tiny_layer(hidden.T.contiguous(), residual)
    nine = torch.randn(9, config.hidden_size).half()
    with pytest.raises(ValueError, match=r"hidden has batch 9; allowed 1\.\.8"):
        tiny_layer(nine, nine)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        tiny_layer(hidden, torch.randn(config.hidden_size, 2).half().T)
    with pytest.raises(ValueError, match=r"out has shape \(2, 32\); expected \(2, 64\)"):
        tiny_layer(hidden, residual, out=torch.empty(2, 32).half())
    with pytest.raises(TypeError, match=r"residual_out has dtype torch.bfloat16; expected torch.float16"):
        tiny_layer(hidden, residual, residual_out=torch.empty(2, 64).bfloat16())


def test_layer_rejects_weights_that_do_not_match_the_config(tiny_layer):
    config, w = tiny_layer.config, tiny_layer.weights
    with pytest.raises(ValueError, match=r"weights.gate has shape \(176, 32\); expected \(176, 64\)"):
        DecodeMLP(config, MLPWeights(w.norm, w.gate[:, :32].contiguous(), w.up, w.down))
    with pytest.raises(ValueError, match=r"weights.down has shape \(176, 64\); expected \(64, 176\)"):
        DecodeMLP(config, MLPWeights(w.norm, w.gate, w.up, w.down.T.contiguous()))
    with pytest.raises(ValueError, match=r"weights.norm has shape \(32,\); expected \(64,\)"):
        DecodeMLP(config, MLPWeights(w.norm[:32].contiguous(), w.gate, w.up, w.down))
    with pytest.raises(TypeError, match=r"weights.up has dtype torch.bfloat16; expected torch.float16"):
        DecodeMLP(config, MLPWeights(w.norm, w.gate, w.up.bfloat16(), w.down))
    with pytest.raises(TypeError, match=r"weights.gate has dtype torch.float32; allowed: "):
        DecodeMLP(config, MLPWeights(w.norm.float(), w.gate.float(), w.up.float(), w.down.float()))
    with pytest.raises(ValueError, match=r"weights.gate has shape \(128, 64\); expected \(256, 128\)"):
        DecodeMLP(TINY["h128-i256"], MLPWeights.random(MLPConfig(64, 128), torch.float16, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 100, "intermediate_size": 176}, r"hidden_size \(100\) and intermediate_size \(176\) must be "
                                                     "multiples of 8"),
    ({"hidden_size": 64, "intermediate_size": 100}, r"intermediate_size \(100\) must be multiples of 8"),
    ({"hidden_size": 0, "intermediate_size": 176}, "hidden_size must be a positive int, got 0"),
    ({"hidden_size": 64, "intermediate_size": 176, "rms_eps": 0.0}, r"MLPConfig.rms_eps must be in \(0, 1\), got 0.0"),
    ({"hidden_size": 64, "intermediate_size": 176, "rms_eps": -1e-5}, r"rms_eps must be in \(0, 1\), got -1e-05"),
    ({"hidden_size": 64, "intermediate_size": 176, "rms_eps": 5}, r"rms_eps must be in \(0, 1\), got 5"),
    ({"hidden_size": 64, "intermediate_size": 176, "rms_eps": float("inf")}, r"rms_eps must be in \(0, 1\), got inf"),
    ({"hidden_size": 64, "intermediate_size": 176, "rms_eps": float("nan")}, r"rms_eps must be in \(0, 1\), got nan"),
])
def test_config_rejects_bad_sizes_and_eps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPConfig(**kwargs)


@pytest.mark.parametrize("eps", [True, None, "1e-5"])
def test_config_eps_must_be_a_number(eps):
    with pytest.raises(TypeError, match=f"MLPConfig.rms_eps must be a number, got {eps!r}"):
        MLPConfig(64, 176, rms_eps=eps)


# --------------------------------------------------------------------------------------- launch shape


def best_split(config, batch, sm_count, cluster_size, warps):
    """mlp_shape's documented rule by brute force: over every split with every block resident at
    once, from batch 2 on one whose projections both run on the tensor cores, then the most even
    load of the SMs, then the most blocks; None where no split fits."""
    best = None
    for clusters in range(1, config.intermediate_size // 8 + 1):
        try:
            spec = MLPSpec.of(config, False, batch, cluster_size, clusters, warps)
        except ValueError:
            continue
        blocks = clusters * cluster_size
        if blocks <= spec.min_blocks_per_sm * sm_count:
            tensor_cores = isinstance(spec.gate_up_tile(), MmaTile) and isinstance(spec.down_tile(), MmaTile)
            score = (tensor_cores, blocks / (sm_count * -(-blocks // sm_count)), blocks)
            best = max(best or (score, clusters), (score, clusters))
    return None if best is None else (cluster_size, best[1], warps)


def test_mlp_shape_of_llama3_8b_on_an_h100_or_h200():
    # 64 clusters of 2 blocks of 16 warps, one on all but 4 of the 132 SMs. Of 8 warps: at batch 1 128
    # clusters, two blocks on those SMs; at batches 64 clusters of 2 x 8 warps, slices of 224 (W_down's
    # 112-wide ones cannot run on the tensor cores), one block an SM.
    assert mlp_shape(MODELS["llama3-8b"], 1, 132, warps=8) == (2, 128, 8)
    for batch in range(1, 9):
        assert mlp_shape(MODELS["llama3-8b"], batch, 132) == (2, 64, 16)
        assert mlp_shape(MODELS["llama3-8b"], batch, 132, warps=8) == ((2, 128, 8) if batch == 1 else (2, 64, 8))
    assert mlp_shape(MODELS["llama3-8b"], 1, 132, cluster_size=4, warps=4) == (4, 128, 4)


@pytest.mark.parametrize("sm_count", [132, 114, 78])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_mlp_shape_keeps_every_block_resident_and_follows_its_rule(model, sm_count):
    config = MODELS[model]
    for batch in range(1, 9):
        # The default: clusters of 2 where their best split fills >= 90% of the block slots, else of 4
        # (of 2 where no split of 4 keeps every block resident); first clusters of 2 x 16 warps (one
        # block an SM) where they fill >= 90% of the SMs.
        pair, quad = (best_split(config, batch, sm_count, c, 8) for c in (2, 4))
        balance = 2 * pair[1] / (sm_count * -(-2 * pair[1] // sm_count))
        rule = pair if balance >= 0.9 else quad or pair
        assert mlp_shape(config, batch, sm_count, warps=8) == rule, f"batch {batch}"
        one_an_sm = best_split(config, batch, sm_count, 2, 16)
        if one_an_sm is not None and 2 * one_an_sm[1] >= 0.9 * sm_count:
            rule = one_an_sm
        assert mlp_shape(config, batch, sm_count) == rule, f"batch {batch}"
        for options in ({"cluster_size": c, "warps": w} for c in (1, 2, 4, 8) for w in (4, 8, 16)):
            where = f"batch {batch}, {options}"
            want = best_split(config, batch, sm_count, options["cluster_size"], options["warps"])
            if want is None:  # e.g. Qwen2.5-7B in clusters of 8: its smallest split, 37 x 8 blocks, is too many
                no_split = (f"hidden_size {config.hidden_size} and intermediate_size {config.intermediate_size} "
                            "have no split")
                with pytest.raises(ValueError, match=no_split):
                    mlp_shape(config, batch, sm_count, **options)
                continue
            cluster_size, clusters, warps = shape = mlp_shape(config, batch, sm_count, **options)
            spec = MLPSpec.of(config, False, batch, cluster_size, clusters, warps)
            assert clusters * cluster_size <= spec.min_blocks_per_sm * sm_count, where
            assert shape == want, where


def test_mlp_shape_finds_the_best_split_past_a_shared_memory_limited_one():
    # Llama-3-8B, batch 8, clusters of 16 x 4 warps: 28 clusters (448 blocks) exceed 3 blocks an SM,
    # but 32 clusters (512 blocks, 4 an SM) balance as well as 16 clusters with twice the blocks.
    config = MODELS["llama3-8b"]
    assert best_split(config, 8, 132, 16, 4) == (16, 32, 4)
    assert mlp_shape(config, 8, 132, 16, 4) == (16, 32, 4)


# ------------------------------------------------------------------------------------------------ gpu

# Every shape a model runs the kernel at batches for (``fused_mlp_max_batch``), each with gate/up rows in
# parts of its own (Qwen2.5-7B: 4 of 7 spans, Llama-2-7B: 4 of 8), and a tiny one.
GPU_MODELS = {**MODELS, "tiny": TINY["h128-i256"]}


@functools.cache
def gpu_weights(name, dtype):
    return MLPWeights.random(GPU_MODELS[name], dtype, "cuda", seed=17)


def check_gpu_step(layer, hidden, residual):
    """One step into NaN-poisoned outputs; returns ``out``. Checks both outputs and the workspace."""
    config, weights = layer.config, layer.weights
    out = torch.full_like(hidden, float("nan"))
    new_residual = torch.full_like(hidden, float("nan"))
    got, got_residual = layer(hidden, residual, out=out, residual_out=new_residual)
    torch.cuda.synchronize()
    assert got is out and got_residual is new_residual
    want, _ = reference_mlp(weights, hidden, residual, config.rms_eps)
    assert relative_error(out, want) <= TOLERANCE  # inf if any NaN was left
    assert relative_error(out, torch_chain(config, weights, hidden, residual)) <= TOLERANCE
    assert torch.equal(bits(new_residual), bits(exact_residual(hidden, residual)))
    assert not layer._out_acc.any() and not layer._arrivals.any(), "workspace not left zero"
    assert layer._act is None or (layer._act == UNWRITTEN_INT32).all(), "act not left unwritten"
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(GPU_MODELS))
def test_gpu_step_matches_reference_and_torch_and_leaves_the_workspace_zero(name, dtype, batch):
    dtype = DTYPES[dtype]
    layer = DecodeMLP(GPU_MODELS[name], gpu_weights(name, dtype))
    assert layer.backend == "gpu"
    hidden, residual = random_inputs(layer.config, dtype, batch, seed=batch, device="cuda")
    first = check_gpu_step(layer, hidden, residual)
    second = check_gpu_step(layer, hidden, residual)
    # The down projection's float32 atomics add in any order, so a rare element may round to the
    # neighbouring 16-bit value; a workspace left dirty would double the output instead.
    assert relative_error(second, first) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted({**GPU_MODELS, **TINY}))
def test_gpu_work_queue_step_matches_reference_and_leaves_its_words_unwritten(name, dtype):
    """The work-queue kernel (batch 1) at every preset and the tiny shapes (units of 16 and 32 of a's
    elements, tiles 2 lanes wide), twice on the workspace it leaves; a batch of 3 through the same
    layer runs the cluster kernel."""
    dtype = DTYPES[dtype]
    config = {**GPU_MODELS, **TINY}[name]
    weights = gpu_weights(name, dtype) if name in GPU_MODELS else MLPWeights.random(config, dtype, "cuda", seed=18)
    layer = DecodeMLP(config, weights, kernel_options={"work_queue": True})
    assert layer.kernel_spec(dtype, 1).work_queue and not layer.kernel_spec(dtype, 3).work_queue
    hidden, residual = random_inputs(config, dtype, 1, seed=60, device="cuda")
    first = check_gpu_step(layer, hidden, residual)
    second = check_gpu_step(layer, hidden, residual)
    assert relative_error(second, first) <= 1e-3  # the sums' order differs, a dirty workspace would not
    check_gpu_step(layer, *random_inputs(config, dtype, 3, seed=61, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("name, dtype, batch, options", [("llama3-8b", "f16", 1, {}), ("llama3.2-1b", "bf16", 8, {}),
                                                         ("tiny", "f16", 3, {}),
                                                         ("llama3-8b", "bf16", 1, {"work_queue": True})])
def test_a_handoff_step_computes_what_the_plain_step_does(name, dtype, batch, options):
    """``DecodeMLP.handoff`` against ``__call__`` on the same inputs: ``hidden`` as float32 sums
    (values no 16-bit type holds), the output's sums rounded as the plain step's ``out``, the same
    residual, the third buffer cleared, and the layer's own workspace untouched."""
    dtype = DTYPES[dtype]
    layer = DecodeMLP(GPU_MODELS[name], gpu_weights(name, dtype), kernel_options=options)
    gen = torch.Generator(device="cuda").manual_seed(batch)
    sums = torch.randn(3, batch, layer.config.hidden_size, generator=gen, device="cuda")
    sums[1].zero_()
    sums[2].fill_(float("nan"))
    _, residual = random_inputs(layer.config, dtype, batch, seed=batch + 40, device="cuda")
    out = check_gpu_step(layer, sums[0].to(dtype), residual)
    got_residual = layer.handoff(sums[0], residual, sums_out=sums[1], clear=sums[2])
    torch.cuda.synchronize()
    assert_rounds_like(sums[1], out)
    assert torch.equal(bits(got_residual), bits(exact_residual(sums[0].to(dtype), residual)))
    assert (sums[2] == 0).all() and not layer._out_acc.any() and not layer._arrivals.any()
    assert layer._act is None or (layer._act == UNWRITTEN_INT32).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, batch, options", [("f16", 3, {}), ("bf16", 3, {}), ("f16", 1, {"work_queue": True})])
def test_gpu_step_replays_in_a_cuda_graph_with_new_inputs(dtype, batch, options):
    dtype = DTYPES[dtype]
    layer = DecodeMLP(GPU_MODELS["llama3.2-1b"], gpu_weights("llama3.2-1b", dtype), kernel_options=options)
    config = layer.config
    hidden, residual = random_inputs(config, dtype, batch, seed=30, device="cuda")
    out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
    layer(hidden, residual, out=out, residual_out=new_residual)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(hidden, residual, out=out, residual_out=new_residual)
    for replay in range(3):
        fresh_hidden, fresh_residual = random_inputs(config, dtype, batch, seed=31 + replay, device="cuda")
        hidden.copy_(fresh_hidden)
        residual.copy_(fresh_residual)
        out.fill_(float("nan"))
        new_residual.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want, _ = reference_mlp(layer.weights, fresh_hidden, fresh_residual, config.rms_eps)
        assert relative_error(out, want) <= TOLERANCE, f"replay {replay}"
        assert torch.equal(bits(new_residual), bits(exact_residual(fresh_hidden, fresh_residual))), f"replay {replay}"
        assert not layer._out_acc.any() and not layer._arrivals.any(), f"replay {replay}"
        assert layer._act is None or (layer._act == UNWRITTEN_INT32).all(), f"replay {replay}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_gpu_plain_input_order_matches_reference(dtype):
    """``interleave_inputs=False`` at batch 1 (gate/up steps on the CUDA cores): the other order of
    ``h * norm`` in shared memory, which the default kernels no longer use."""
    dtype = DTYPES[dtype]
    layer = DecodeMLP(GPU_MODELS["llama3.2-1b"], gpu_weights("llama3.2-1b", dtype),
                      kernel_options={"interleave_inputs": False})
    assert not layer.kernel_spec(dtype, 1).inputs_interleaved
    hidden, residual = random_inputs(layer.config, dtype, 1, seed=50, device="cuda")
    check_gpu_step(layer, hidden, residual)


@pytest.mark.gpu
def test_gpu_timeline_records_every_block_and_phase_of_a_correct_step():
    """``python -m clusterlab.bench.fused_timeline --layer mlp`` in small: the instrumented kernel
    matches the reference, and every block has its SM and 7 phases that add up to about the step."""
    from clusterlab.bench.fused_timeline import record_mlp_shape
    from clusterlab.fused.mlp_kernel import TIMELINE_PHASES

    config = GPU_MODELS["llama3.2-1b"]
    shape = record_mlp_shape(config, gpu_weights("llama3.2-1b", torch.float16), torch.float16, 3, 2, 8)
    assert shape["rel_err"] < 1e-2 and shape["blocks"] == 2 * shape["clusters"] == len(shape["block"])
    for block in shape["block"]:
        assert 0 <= block["sm"] < torch.cuda.get_device_properties(0).multi_processor_count
        assert len(block["phase_us"]) == len(TIMELINE_PHASES) and min(block["phase_us"]) >= 0
        assert sum(block["phase_us"]) < 5 * shape["instrumented_us"]


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("cluster_size", [1, 2, 4])
def test_gpu_explicit_cluster_sizes_and_warps(cluster_size, warps):
    layer = DecodeMLP(GPU_MODELS["llama3.2-1b"], gpu_weights("llama3.2-1b", torch.bfloat16),
                      cluster_size=cluster_size, warps=warps)
    for batch in (1, 3, 8):
        shape = layer.shape(batch)
        assert (shape[0], shape[2]) == (cluster_size, warps)
        hidden, residual = random_inputs(layer.config, torch.bfloat16, batch, seed=40 + batch, device="cuda")
        check_gpu_step(layer, hidden, residual)
