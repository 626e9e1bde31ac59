"""Where the fused decode step's time goes: the kernel with one part switched off at a time.

    python -m clusterlab.bench.fused_ablation [--preset llama2-7b] [--kv 1024 16384] [--batch 1]

Each variant is the layer's own kernel built from its :class:`~clusterlab.fused.kernel.KernelSpec`
with measurement switches turned off (compile-time constants of
:func:`~clusterlab.fused.kernel.build_kernel`): no W_qkv stream, no KV stream, no W_o stream, none
of the three (what is left is launch, the four cluster barriers and exchanges, and the finish), and
no finish (the conversion of ``out_acc`` by the last block of each rank). Outputs of the ablated
variants are wrong by construction and are not checked; the full kernel is checked against the
reference first. Times are medians of CUDA-graph replays, the floor is printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import torch

from ..argtypes import integer
from ..fused import (
    PRESETS,
    AttentionWeights,
    DecodeAttention,
    KVCache,
    reference_step,
    relative_error,
)
from ..fused.config import MAX_BATCH
from ..fused.layer import kernel_launcher
from .fused import graph_time_us
from .timing import copy_bandwidth

#: variant -> the KernelSpec switches it turns off
ABLATIONS = {
    "no W_qkv stream": {"qkv_stream": False},
    "no KV stream": {"kv_stream": False},
    "no W_o stream": {"o_stream": False},
    "no streams at all": {"qkv_stream": False, "kv_stream": False, "o_stream": False},
    "no finish": {"finish": False},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama2-7b", choices=list(PRESETS))
    parser.add_argument("--kv", nargs="+", type=integer(1), default=[1024, 16384])
    parser.add_argument("--batch", type=integer(1, MAX_BATCH), default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = PRESETS[args.preset]
    bandwidth = copy_bandwidth().median
    weights = AttentionWeights.random(config, dtype, "cuda", seed=0)
    layer = DecodeAttention(config, weights)
    cache = KVCache.random(config, args.batch, max(args.kv), dtype, "cuda", seed=1)
    hidden, residual = torch.randn(2, args.batch, config.hidden_size, device="cuda").to(dtype)
    out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
    spec = layer.kernel_spec(dtype, args.batch)
    print(f"{args.preset} {args.dtype} batch {args.batch}, cluster {spec.cluster_size} x {spec.warps} warps, "
          f"head split {spec.head_split}, "
          f"copy {bandwidth / 1e12:.2f} TB/s")
    variants = {name: kernel_launcher(dataclasses.replace(spec, **switches)) for name, switches in ABLATIONS.items()}
    for kv_len in args.kv:
        position = kv_len - 1
        want = reference_step(config, weights, hidden, residual, cache, position)
        layer(hidden, residual, cache, position, out=out, residual_out=new_residual)
        err = relative_error(out, want.out)
        floor = config.step_bytes(args.batch, kv_len) / bandwidth * 1e6
        full = graph_time_us(functools.partial(layer, hidden, residual, cache, position, out=out,
                                               residual_out=new_residual))
        print(f"kv {kv_len:6d}: floor {floor:6.1f} us; full kernel {full:6.1f} us (rel err {err:.1e})")
        launch_args = layer.launch_args(hidden, residual, cache, position, out, new_residual)
        for name, step in variants.items():
            t = graph_time_us(functools.partial(step, *launch_args))
            print(f"           {name:18s} {t:6.1f} us  ({full - t:+6.1f} us for it)", flush=True)
            layer._out_acc.zero_()  # ablated kernels leave the workspace dirty
            layer._arrivals.zero_()
    return 0


if __name__ == "__main__":
    sys.exit(main())
