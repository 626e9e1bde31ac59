"""Launch the decoder's cluster argmax (``clusterlab.models.argmax``) on a few shapes; run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_argmax.py

Rows of 1 to 8, vocabularies from fewer logits than the cluster has blocks to Qwen2's, with ties and
NaN. Exits non-zero if any index differs from ``torch.argmax`` on the CPU (the reference runs there:
PyTorch's own CUDA argmax is reported by racecheck; the sanitizer reports hazards itself).
"""

import torch

from clusterlab.models.argmax import argmax_rows

failures = 0
for rows, vocab in ((1, 7), (3, 1000), (8, 32000), (1, 128256), (8, 152064)):
    logits = torch.randn(rows, vocab, device="cuda")
    logits[0, [vocab // 2, vocab - 1]] = 1e4
    logits[-1, vocab // 3] = float("nan")
    out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    failures += not torch.equal(argmax_rows(logits, out=out).cpu(), logits.cpu().argmax(-1))
print(f"{failures} mismatches")
raise SystemExit(1 if failures else 0)
