"""Run the fused MLP block once per shape of interest; run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_mlp.py

Shapes: clusters of 1, 2 and 4 blocks of 4, 8 and 16 warps, batches of 1 to 8, float16 and bfloat16,
projections on the CUDA cores (``h * norm`` interleaved in shared memory, ``MLPSpec.interleave_inputs``;
the sixth shape in the plain order) and (the fourth, fifth and last two shapes) on the tensor cores, and
the rule's own shape at batch 1 on an H100 or H200 (the seventh: clusters of 2 x 16 warps, one block an
SM). The last two are presets at a batch of 4 in the rule's shapes: Qwen2.5-7B (clusters of 4 x 8 warps,
its 896-wide rows of W_gate / W_up in four parts of 7 spans, ``mma_tile``; ptxas spills there) and
Llama-3-8B (clusters of 2 x 16 warps on the tensor cores). Each step twice, so the second runs on the
workspace the first one's finish left; then once through the hand-off kernel (``DecodeMLP.handoff``:
float32 sums in, out and cleared). ``python tests/sanitize_mlp.py shapes`` runs the first seven alone,
``presets`` the last two, ``qwen2.5-7b`` or ``llama3-8b`` one of them, ``queue`` the work-queue kernel
(``kernel_options={"work_queue": True}``, one sequence) at a small shape and at Llama-3.2-1B's.
Exits non-zero if any step misses the float64 reference or leaves its buffer uncleared (the sanitizer
reports hazards itself).
"""

import torch

from sanitize_steps import TOLERANCE, chosen_group, exit_with

from clusterlab.fused import DecodeMLP, MLPConfig, MLPWeights, reference_mlp
from clusterlab.fused.reference import relative_error

SHAPES = [
    # (config, layer options, batch, dtype)
    (MLPConfig(hidden_size=512, intermediate_size=256), {"cluster_size": 2}, 3, torch.float16),
    (MLPConfig(hidden_size=512, intermediate_size=384), {"cluster_size": 4, "warps": 4}, 1, torch.bfloat16),
    (MLPConfig(hidden_size=256, intermediate_size=128), {"cluster_size": 1}, 2, torch.float16),
    (MLPConfig(hidden_size=512, intermediate_size=1024), {"cluster_size": 4}, 3, torch.float16),
    (MLPConfig(hidden_size=512, intermediate_size=1024), {"cluster_size": 2, "warps": 4}, 8, torch.bfloat16),
    (MLPConfig(hidden_size=1024, intermediate_size=512),
     {"cluster_size": 2, "kernel_options": {"interleave_inputs": False}}, 1, torch.float16),
    (MLPConfig(hidden_size=512, intermediate_size=1024), {}, 1, torch.float16),
]
PRESETS = {
    "qwen2.5-7b": (MLPConfig(hidden_size=3584, intermediate_size=18944, rms_eps=1e-6), {}, 4, torch.bfloat16),
    "llama3-8b": (MLPConfig(hidden_size=4096, intermediate_size=14336), {}, 4, torch.float16),
}
QUEUE = [
    (MLPConfig(hidden_size=512, intermediate_size=1024), {"kernel_options": {"work_queue": True}}, 1, torch.float16),
    (MLPConfig(hidden_size=2048, intermediate_size=8192), {"kernel_options": {"work_queue": True}}, 1, torch.bfloat16),
]
CHOICES = {"shapes": SHAPES, "presets": list(PRESETS.values()), "queue": QUEUE,
           **{name: [shape] for name, shape in PRESETS.items()}}

only = chosen_group(tuple(CHOICES))
failures = 0
for config, options, batch, dtype in SHAPES + CHOICES["presets"] + QUEUE if only is None else CHOICES[only]:
    weights = MLPWeights.random(config, dtype, "cuda")
    hidden, residual = torch.randn(2, batch, config.hidden_size, device="cuda").to(dtype)
    want, _ = reference_mlp(weights, hidden, residual, config.rms_eps)
    layer = DecodeMLP(config, weights, **options)
    for run in range(2):
        out = torch.full_like(hidden, float("nan"))
        layer(hidden, residual, out=out)
        torch.cuda.synchronize()
        error = relative_error(out, want)
        spec = layer.kernel_spec(dtype, batch)
        shape = (spec.cluster_size, spec.clusters, spec.warps)
        print(f"{options} batch {batch} {dtype} run {run}: clusters, warps {shape}, rel err {error:.1e}")
        failures += not error < TOLERANCE
    sums = torch.randn(3, batch, config.hidden_size, device="cuda")
    sums[1].zero_()
    sums[2].fill_(float("nan"))
    want, _ = reference_mlp(weights, sums[0].to(dtype), residual, config.rms_eps)
    layer.handoff(sums[0], residual, sums_out=sums[1], clear=sums[2])
    torch.cuda.synchronize()
    error, cleared = relative_error(sums[1], want), bool((sums[2] == 0).all())
    print(f"{options} batch {batch} {dtype} handoff: rel err {error:.1e}, cleared {cleared}")
    failures += not (error < TOLERANCE and cleared)
exit_with(failures)
