"""The step loop of the attention layers' sanitizer scripts (``sanitize_fused.py``, ``sanitize_mla.py``), and the
group of shapes a script's command line names (``sanitize_fused.py``, ``sanitize_mlp.py``)."""

import sys

import torch

from clusterlab.fused.reference import relative_error

#: Relative error against the float64 reference a float16 / bfloat16 step may have.
TOLERANCE = 1e-2


def run_steps(shapes, weights_type, cache_type, layer_type, reference, device="cuda") -> int:
    """One step of ``layer_type`` for each ``(config, layer options, positions, dtype)`` of ``shapes``:
    fresh random weights (``weights_type``), cache (``cache_type``) and inputs on ``device``, the
    output poisoned with NaN, positions as an int32 tensor; each error against ``reference`` (a
    float64 reference step) printed. Returns how many steps miss :data:`TOLERANCE`."""
    failures = 0
    for config, options, positions, dtype in shapes:
        weights = weights_type.random(config, dtype, device)
        batch = len(positions)
        cache = cache_type.random(config, batch, max(positions) + 2, dtype, device)
        hidden, residual = torch.randn(2, batch, config.hidden_size, device=device).to(dtype)
        want = reference(config, weights, hidden, residual, cache, positions)
        out = torch.full_like(hidden, float("nan"))
        layer = layer_type(config, weights, **options)
        layer(hidden, residual, cache, torch.tensor(positions, dtype=torch.int32, device=device), out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        error = relative_error(out, want.out)
        print(f"{options} positions {positions} {dtype}: rel err {error:.1e}")
        failures += not error < TOLERANCE
    return failures


def chosen_group(choices, argv=None):
    """The group of shapes named by the script's one optional argument (``argv``: ``sys.argv``), or
    None where there is none (every group); anything else leaves with the usage and the groups."""
    argv = sys.argv if argv is None else argv
    if len(argv) > 2 or argv[1:] and argv[1] not in choices:
        raise SystemExit(f"usage: python {argv[0]} [{' | '.join(choices)}], got {argv[1:]}")
    return argv[1] if len(argv) > 1 else None


def exit_with(failures: int):
    """Print the count and leave the script non-zero where any step missed."""
    print(f"{failures} mismatches")
    raise SystemExit(1 if failures else 0)
