"""Small MLA shapes the MLA test modules share (CPU-sized; DeepSeek-V2-Lite's ratios, not its sizes)."""

import dataclasses

from clusterlab.fused.mla import DEEPSEEK_V2_LITE, MLAWeights

#: DeepSeek-V2-Lite's own YaRN scaling (x40 over 4096 positions, mscale = mscale_all_dim = 0.707).
V2_YARN = DEEPSEEK_V2_LITE.rope_scaling
#: Dimensions of a small MLA block: 4 heads, a latent of 64 + 16, 32-dim values.
SMALL = {"hidden_size": 256, "heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
         "v_head_dim": 32}


def shrunk(weights: MLAWeights, hidden, residual, scale: float):
    """``weights`` with its down-projections (``kv_a_proj_with_mqa``; ``q_a_proj`` with the query LoRA),
    and ``hidden`` and ``residual``, times ``scale`` (in the dtype's own rounding). At 1e-3 each RMSNorm of
    the step sees a mean square near its epsilon: the input's (about 2e-6) and the latents' (about 1e-6)."""
    down = {"kv_a_proj_with_mqa": weights.kv_a_proj_with_mqa * scale}
    if weights.q_a_proj is not None:
        down["q_a_proj"] = weights.q_a_proj * scale
    return dataclasses.replace(weights, **down), hidden * scale, residual * scale
