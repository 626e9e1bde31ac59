"""Where the fused decode step's time goes: the kernel with one part switched off at a time.

    python -m clusterlab.bench.fused_ablation [--preset llama2-7b] [--kv 1024 16384] [--batch 1] [--jobs 8]

Each variant is the layer's own kernel for the KV length, the launch shape and sets of clusters that
a step of that many rows takes (:func:`ablation_specs`), built from its
:class:`~clusterlab.fused.kernel.KernelSpec` with measurement switches turned off (compile-time constants of
:func:`~clusterlab.fused.kernel.build_kernel`): no W_qkv stream, no KV stream, no W_o stream, none
of the three (what is left is launch, the four cluster barriers and exchanges, and the finish), and
no finish (the conversion of ``out_acc`` by the last block of each rank). Outputs of the ablated
variants are wrong by construction and are not checked; the full kernel is checked against the
reference first. Times are medians of CUDA-graph replays, the floor is printed beside them.
``--jobs N`` first compiles every kernel the run times in N processes into the kernel cache
(:func:`clusterlab.bench.fused.precompile`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import torch

from ..argtypes import Distinct, integer
from ..fused import (
    PRESETS,
    AttentionWeights,
    DecodeAttention,
    KVCache,
    reference_step,
    relative_error,
)
from ..fused.config import MAX_BATCH, MAX_POSITIONS
from ..fused.layer import kernel_launcher
from ..gpu import require_hopper
from ..kernel_cache import CACHE_DIR_ENV, cache_dir
from .fused import graph_time_us, precompile
from .timing import copy_bandwidth

#: variant -> the KernelSpec switches it turns off
ABLATIONS = {
    "no W_qkv stream": {"qkv_stream": False},
    "no KV stream": {"kv_stream": False},
    "no W_o stream": {"o_stream": False},
    "no streams at all": {"qkv_stream": False, "kv_stream": False, "o_stream": False},
    "no finish": {"finish": False},
}


def ablation_specs(layer: DecodeAttention, dtype: torch.dtype, batch: int, kv_len: int) -> dict:
    """``{"full kernel": spec, variant: spec with its switches off, ..}`` for a step of ``batch``
    sequences attending to ``kv_len`` rows: the kernel the layer runs for that step (its launch
    shape and sets of clusters depend on the longest cache, see
    :meth:`~clusterlab.fused.DecodeAttention.shape`), then one variant of it per :data:`ABLATIONS`."""
    spec = layer.kernel_spec(dtype, batch, longest=kv_len)
    return {"full kernel": spec, **{name: dataclasses.replace(spec, **switches) for name, switches in ABLATIONS.items()}}


def _step_inputs(preset: str, dtype: torch.dtype, batch: int, capacity: int):
    """The layer (random weights), a cache of ``capacity`` rows a sequence and the step's inputs
    and outputs that a run and its compile workers use."""
    config = PRESETS[preset]
    layer = DecodeAttention(config, AttentionWeights.random(config, dtype, "cuda", seed=0))
    cache = KVCache.random(config, batch, capacity, dtype, "cuda", seed=1)
    hidden, residual = torch.randn(2, batch, config.hidden_size, device="cuda").to(dtype)
    return layer, cache, hidden, residual, torch.empty_like(hidden), torch.empty_like(hidden)


def compile_variant(task) -> float:
    """Launch one kernel of a run once, so that it lands in the kernel cache: a worker of
    :func:`~clusterlab.bench.fused.precompile`. ``task``: ``(preset, dtype name, batch, kv length,
    variant)``, ``variant`` ``"full kernel"`` or a name of :data:`ABLATIONS`. Returns the seconds it took."""
    start = time.perf_counter()
    preset, dtype_name, batch, kv_len, variant = task
    dtype = getattr(torch, dtype_name)
    layer, cache, hidden, residual, out, new_residual = _step_inputs(preset, dtype, batch, kv_len)
    spec = ablation_specs(layer, dtype, batch, kv_len)[variant]
    kernel_launcher(spec)(*layer.launch_args(hidden, residual, cache, kv_len - 1, out, new_residual))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama2-7b", choices=list(PRESETS))
    parser.add_argument("--kv", nargs="+", action=Distinct, type=integer(1, MAX_POSITIONS), default=[1024, 16384])
    parser.add_argument("--batch", type=integer(1, MAX_BATCH), default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--jobs", type=integer(1, 64), default=1,
                        help="processes that compile the run's kernels ahead (into the kernel cache)")
    args = parser.parse_args(argv)
    if args.jobs > 1 and cache_dir() is None:
        parser.error(f"--jobs {args.jobs} compiles ahead into the kernel cache, which ${CACHE_DIR_ENV} turns off")
    require_hopper()  # before any compile worker starts
    dtype = getattr(torch, args.dtype)
    config = PRESETS[args.preset]
    if args.jobs > 1:
        precompile([(args.preset, args.dtype, args.batch, kv_len, variant) for kv_len in args.kv
                    for variant in ("full kernel", *ABLATIONS)], args.jobs, worker=compile_variant)
    bandwidth = copy_bandwidth().median
    layer, cache, hidden, residual, out, new_residual = _step_inputs(args.preset, dtype, args.batch, max(args.kv))
    weights = layer.weights
    print(f"{args.preset} {args.dtype} batch {args.batch}, copy {bandwidth / 1e12:.2f} TB/s")
    for kv_len in args.kv:
        position = kv_len - 1  # an int position: the layer takes the shape of kv_len rows
        specs = ablation_specs(layer, dtype, args.batch, kv_len)
        spec = specs.pop("full kernel")
        want = reference_step(config, weights, hidden, residual, cache, position)
        layer(hidden, residual, cache, position, out=out, residual_out=new_residual)
        err = relative_error(out, want.out)
        floor = config.step_bytes(args.batch, kv_len) / bandwidth * 1e6
        full = graph_time_us(functools.partial(layer, hidden, residual, cache, position, out=out,
                                               residual_out=new_residual))
        print(f"kv {kv_len:6d}: cluster {spec.cluster_size} x {spec.warps} warps, head split {spec.head_split}, "
              f"{spec.batch_parts} set(s) of clusters; floor {floor:6.1f} us; full kernel {full:6.1f} us "
              f"(rel err {err:.1e})")
        launch_args = layer.launch_args(hidden, residual, cache, position, out, new_residual)
        for name, variant in specs.items():
            t = graph_time_us(functools.partial(kernel_launcher(variant), *launch_args))
            print(f"           {name:18s} {t:6.1f} us  ({full - t:+6.1f} us for it)", flush=True)
            layer._out_acc.zero_()  # ablated kernels leave the workspace dirty
            layer._arrivals.zero_()
    return 0


if __name__ == "__main__":
    sys.exit(main())
