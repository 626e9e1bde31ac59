"""Small MLA shapes the MLA test modules share (CPU-sized; DeepSeek-V2-Lite's ratios, not its sizes)."""

from clusterlab.fused.mla import DEEPSEEK_V2_LITE

#: DeepSeek-V2-Lite's own YaRN scaling (x40 over 4096 positions, mscale = mscale_all_dim = 0.707).
V2_YARN = DEEPSEEK_V2_LITE.rope_scaling
#: Dimensions of a small MLA block: 4 heads, a latent of 64 + 16, 32-dim values.
SMALL = {"hidden_size": 256, "heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
         "v_head_dim": 32}
