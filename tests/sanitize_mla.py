"""Run the MLA layer's kernels once per shape of interest; run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_mla.py

Shapes: DeepSeek-V2-Lite (clusters of 8, interleaved RoPE) on a ragged batch with an empty cache,
float16 and bfloat16, and in launch 2's wider grid of long caches (28 clusters of 8 a sequence, two
blocks on most SMs); launch 2 in clusters of 4 under launches 1 and 3 of 8; a small rotate-half shape with
clusters of 4 and 3 attention clusters a sequence; and one launch a step (``kernel_options={"one_launch":
True}``) at DeepSeek-V2-Lite's and the small shape. Exits non-zero if any step misses the float64 reference
(the sanitizer reports hazards itself).
"""

import torch

from sanitize_steps import exit_with, run_steps

from clusterlab.fused import DEEPSEEK_V2_LITE, DecodeMLA, LatentCache, MLAConfig, MLAWeights, mla_reference_step

SMALL = MLAConfig(hidden_size=512, heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, rope_interleaved=False)
SHAPES = [
    # (config, layer options, positions, dtype)
    (DEEPSEEK_V2_LITE, {}, [0, 300, 37], torch.bfloat16),
    (DEEPSEEK_V2_LITE, {"warps": 4}, [200], torch.float16),
    (DEEPSEEK_V2_LITE, {"attention_clusters": 28}, [2500], torch.float16),
    # 12 blocks: the new row's tile with 11 cached rows (187), the new row in a refill (763)
    (SMALL, {"cluster_size": 4, "attention_clusters": 3}, [187, 763, 0, 13], torch.float16),
    # launch 2 in clusters of its own size: 4 under launches of 8
    (DEEPSEEK_V2_LITE, {"kernel_options": {"attention_cluster_size": 4}}, [0, 3000, 37], torch.float16),
    # one launch a step: the roles' tickets, the waits on device memory and the words' reset
    (DEEPSEEK_V2_LITE, {"kernel_options": {"one_launch": True}}, [0, 300, 37], torch.bfloat16),
    (SMALL, {"cluster_size": 4, "attention_clusters": 3, "warps": 4, "kernel_options": {"one_launch": True}},
     [5, 0, 90, 13], torch.float16),
]

exit_with(run_steps(SHAPES, MLAWeights, LatentCache, DecodeMLA, mla_reference_step))
