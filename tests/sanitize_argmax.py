"""Launch the decoder's cluster argmax (``clusterlab.models.argmax``) on a few shapes; run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_argmax.py

Rows of 1 to 8, vocabularies from fewer logits than the cluster has blocks to Qwen2's, with ties and
NaN, through :func:`argmax_rows` and :func:`pick_and_record` (the decoder's record: one row's count
at its end, one row's winner an end-of-sequence id). Exits non-zero if any index differs from
``torch.argmax`` on the CPU (the reference runs there: PyTorch's own CUDA argmax is reported by
racecheck; the sanitizer reports hazards itself).
"""

import torch

from clusterlab.models.argmax import argmax_rows, pick_and_record

MAX_NEW = 4

failures = 0
for rows, vocab in ((1, 7), (3, 1000), (8, 32000), (1, 128256), (8, 152064)):
    logits = torch.randn(rows, vocab, device="cuda")
    logits[0, [vocab // 2, vocab - 1]] = 1e4
    logits[-1, vocab // 3] = float("nan")
    want = logits.cpu().argmax(-1)
    out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    failures += not torch.equal(argmax_rows(logits, out=out).cpu(), want)
    tokens = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    history = torch.full((rows, MAX_NEW), -1, dtype=torch.int64, device="cuda")
    counts = torch.arange(rows, dtype=torch.int64, device="cuda") % (MAX_NEW + 1)
    done = torch.zeros(rows, dtype=torch.bool, device="cuda")
    eos = want[:1].cuda()
    positions = torch.zeros(rows, dtype=torch.int32, device="cuda")
    pick_and_record(logits, tokens, history, counts, done, eos, positions, advance=1)
    failures += not (torch.equal(tokens.cpu(), want) and bool(done[0]) and bool((positions == 1).all()))
print(f"{failures} mismatches")
raise SystemExit(1 if failures else 0)
