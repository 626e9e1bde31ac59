"""Launch the decoder's final norm (``clusterlab.models.final_norm``) on a few shapes; run under compute-sanitizer.

    compute-sanitizer --tool memcheck python tests/sanitize_final_norm.py

Rows of 1 to 8 at the hidden sizes of Llama-3.2-1B, Qwen2.5-7B, Llama-3-8B and a 8192-wide model,
float16 and bfloat16, and a row shorter than the block. Exits non-zero if an output is more than two
ulps from PyTorch's chain or a buffer is left non-zero.
"""

import torch

from clusterlab.models.final_norm import final_norm
from clusterlab.models.llama import rms_norm

failures = 0
for dtype, ulps in ((torch.float16, 2 * 2.0**-10), (torch.bfloat16, 2 * 2.0**-7)):
    for rows, hidden in ((1, 2048), (3, 3584), (8, 4096), (2, 8192), (1, 100)):
        sums, clear = torch.randn(rows, hidden, device="cuda"), torch.randn(rows, hidden, device="cuda")
        residual = torch.randn(rows, hidden, device="cuda").to(dtype)
        norm = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
        want = rms_norm(sums.to(dtype) + residual, norm, 1e-5)
        out = torch.full_like(residual, float("nan"))
        final_norm(sums, clear, residual, norm, 1e-5, out=out)
        close = torch.allclose(out.float(), want.float(), rtol=ulps, atol=0)
        failures += not (close and not sums.any() and not clear.any())
print(f"{failures} mismatches")
raise SystemExit(1 if failures else 0)
