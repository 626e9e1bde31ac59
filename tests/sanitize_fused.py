"""Run the fused layer once per shape of interest; run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_fused.py

Shapes: a ragged batch (one sequence with an empty cache), QKV bias, GQA with a head split, and
the cluster of 8 x 4 warps that the presets run at batch 1; batches whose projections run on the
tensor cores, bfloat16 and float16 (its activations scaled); attention on the tensor cores
(several query heads a cluster) with 64 and 128 dims a head, the second in blocks of 4 warps
with the next step's keys in flight (``KernelSpec.pipelined_kv``), ragged lengths that end
inside a tile of 16 keys; and the Llama-3-8B preset at batch 8, whose shared regions at their
largest share words (``KernelSpec.overlay``: ``xs``/``partial``, then ``scratch``, then ``o``); and
one sequence with ``h * norm`` interleaved in shared memory (``KernelSpec.interleave_inputs``); and the
Llama-3.2-1B preset at a batch of 3 in the rule's short-cache shape (clusters of 8 x 8 warps, a head split of
2), and at a batch of 8 in the same shape, the rule's below ``plan.HALF_CLUSTERS_BELOW`` rows;
``python tests/sanitize_fused.py steps`` runs those alone.
Then the hand-off kernels (``DecodeAttention.handoff``: float32 sums in, out and cleared) of the
first three shapes; ``python tests/sanitize_fused.py handoff`` runs those alone. Then GQA with a KV
head's positions split over 2 and 4 clusters (``KernelSpec.split_positions``: the parts' states
in device memory, merged by the last to arrive; a sequence with an empty cache leaves whole parts
nothing to attend), plain and handed off; ``python tests/sanitize_fused.py split`` runs those alone.
Then the long-cache shape of a GQA preset at a batch of 1 to 4 (one cluster of 16 x 8 warps a KV
head, :func:`~clusterlab.fused.plan.launch_shape` from the batch's ``LONG_CACHE`` rows; Qwen2.5-7B, with its
QKV bias), and the one of an MHA batch of 5 to 8 (blocks of 16 warps in clusters of 2,
:func:`~clusterlab.fused.plan.wide_blocks`), plain and handed off; ``python tests/sanitize_fused.py long``
runs those alone.
Then a batch split over two and three sets of clusters (``KernelSpec.batch_parts``: each set its
share's slices of the arguments and counters of its own), once with the positions split too, and
twice with a last set of fewer sequences (``KernelSpec.uneven``: its phantoms touch no device
memory), plain and handed off; ``python tests/sanitize_fused.py parts`` runs those alone.
Then Qwen2.5-7B at a batch of 5 in the rule's shape (clusters of 4 x 8 warps, a head split of 7, its K/V
rows shared out), whose 896-wide rows of W_qkv and W_o step in four parts of 7 spans (``mma_tile``), plain
and handed off;
``python tests/sanitize_fused.py wide`` runs those alone.
Then GQA with a KV head's key and value heads shared out among its clusters (``KernelSpec.split_kv_rows``:
the first two append one each, and every cluster reads what it lacks back from the cache once its flag is
up): the rule's own at Qwen2.5-7B's split of 7 (clusters of 8 x 4 warps, QKV bias) at a ragged batch of
3, a split of 2 with QKV bias and of 4 in clusters of 4, and the Llama-3-8B preset at batch 1, plain and
handed off;
``python tests/sanitize_fused.py kv_rows`` runs those alone.
Then the positions split with the query projection shared out (``KernelSpec.shared_queries``: each part
projects its share of the query heads, hands them over through device memory and waits for the others',
then waits for every part's state and merges its own heads'): Qwen2.5-7B split in 7 in clusters of 4 x 8
warps (QKV bias) at a ragged batch of 3, its next keys in flight (``pipelined_kv``), and at one sequence
(bfloat16: the rule's step at batch 1 from 8K rows), GQA split in 2 with
each part projecting both K/V heads, and in 2 over two sets of clusters, the last with a phantom, plain
and handed off;
``python tests/sanitize_fused.py shared`` runs those alone.
Then the work queue (``KernelSpec.work_queue``: chunks of every KV head taken by whichever warp is free,
other clusters' states in device memory, the queue's words reset by the grid's last block): GQA on the
tensor cores in two sets of clusters with chunks of 64 rows and in one set, and MHA on the CUDA cores in
blocks of 16 warps, and a batch of 3 in sets of 2 and 1, ragged with empty caches, plain and handed off;
``python tests/sanitize_fused.py queue`` runs those alone, ``python tests/sanitize_fused.py uneven`` the uneven
splits of this group and the last.
Exits non-zero if any step misses the float64 reference (the sanitizer reports hazards itself).
"""

import torch

from sanitize_steps import TOLERANCE, chosen_group, exit_with, run_steps

from clusterlab.fused import PRESETS, AttentionConfig, AttentionWeights, DecodeAttention, KVCache
from clusterlab.fused.reference import reference_step, relative_error

SHAPES = [
    # (config, layer options, positions, dtype)
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 2}, [0, 37, 300], torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 1}, [1000, 0, 333], torch.float16),
    (AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128), {"cluster_size": 8, "warps": 4},
     [130, 5, 64], torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128), {"cluster_size": 8, "warps": 8},
     [300, 0, 77, 12, 5], torch.float16),
    (PRESETS["llama3-8b"], {}, [300, 0, 77, 12, 5, 640, 33, 129], torch.float16),
    (AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128),
     {"cluster_size": 8, "warps": 4, "kernel_options": {"interleave_inputs": True}}, [333], torch.float16),
    (PRESETS["llama3.2-1b"], {}, [300, 0, 77], torch.bfloat16),
    (PRESETS["llama3.2-1b"], {"cluster_size": 8, "head_split": 2}, [300, 0, 77, 12, 5, 640, 33, 1500], torch.float16),
]

HANDOFF_SHAPES = SHAPES[:3]
SPLIT_SHAPES = [
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 2, "kernel_options": {"split_positions": True}}, [0, 37, 300], torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 4, "kernel_options": {"split_positions": True}}, [1000, 0, 333],
     torch.float16),
]
PARTS_SHAPES = [
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 1, "kernel_options": {"batch_parts": 2}}, [0, 37, 300, 5], torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 2, "kernel_options": {"batch_parts": 3, "split_positions": True}},
     [1000, 0, 333], torch.float16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 1, "kernel_options": {"batch_parts": 2}}, [700, 0], torch.float16),
]
# A last set of fewer sequences (its phantoms: sets of 2, 2, 1; of 2, 1 with the positions split; the work
# queue's 2, 1), in the groups "parts" and "queue" and alone as "uneven"
UNEVEN_PARTS_SHAPES = [
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 1, "kernel_options": {"batch_parts": 3}}, [0, 37, 300, 5, 129], torch.float16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 2, "kernel_options": {"batch_parts": 2, "split_positions": True}},
     [1000, 0, 333], torch.bfloat16),
]
PARTS_SHAPES += UNEVEN_PARTS_SHAPES
LONG_SHAPES = [
    (PRESETS["qwen2.5-7b"], {"cluster_size": 16, "warps": 8, "head_split": 1}, [300, 0, 77], torch.float16),
    (AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128), {"cluster_size": 2, "warps": 16},
     [300, 0, 77, 12, 5, 41], torch.bfloat16),
]
WIDE_SHAPES = [(PRESETS["qwen2.5-7b"], {}, [300, 0, 77, 12, 5], torch.bfloat16)]
KV_ROWS_SHAPES = [
    (PRESETS["qwen2.5-7b"], {}, [0, 300, 41], torch.float16),
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 2, "kernel_options": {"split_kv_rows": True}}, [0, 37, 300], torch.bfloat16),
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64),
     {"cluster_size": 4, "head_split": 4, "kernel_options": {"split_kv_rows": True}}, [300, 0], torch.float16),
    (PRESETS["llama3-8b"], {"kernel_options": {"split_kv_rows": True}}, [700], torch.float16),
]
SHARED = {"split_positions": True, "shared_queries": True}
SHARED_SHAPES = [
    (PRESETS["qwen2.5-7b"], {"cluster_size": 4, "warps": 8, "head_split": 7, "kernel_options": SHARED}, [0, 300, 41],
     torch.float16),
    (PRESETS["qwen2.5-7b"], {"cluster_size": 4, "warps": 8, "head_split": 7, "kernel_options": SHARED}, [2000],
     torch.bfloat16),
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 2, "kernel_options": {**SHARED, "split_kv_rows": False}}, [0, 37, 300],
     torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 2, "kernel_options": {**SHARED, "batch_parts": 2}}, [1000, 0, 333],
     torch.float16),
]

QUEUE_SHAPES = [
    (AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, qkv_bias=True),
     {"cluster_size": 4, "head_split": 1, "kernel_options": {"work_queue": True, "queue_rows": 64, "batch_parts": 2}},
     [0, 700, 65, 1], torch.bfloat16),
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 1, "kernel_options": {"work_queue": True}}, [1000, 0, 333],
     torch.float16),
    (AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128),
     {"cluster_size": 2, "warps": 16, "kernel_options": {"work_queue": True}}, [300, 0, 77, 12, 5, 2000],
     torch.bfloat16),
]
UNEVEN_QUEUE_SHAPES = [
    (AttentionConfig(hidden_size=1024, heads=16, kv_heads=4, head_dim=128),
     {"cluster_size": 4, "warps": 4, "head_split": 1, "kernel_options": {"work_queue": True, "batch_parts": 2,
                                                                          "queue_rows": 64}},
     [1000, 0, 333], torch.float16),
]
QUEUE_SHAPES += UNEVEN_QUEUE_SHAPES


def handoff_steps(shapes) -> int:
    """One ``handoff`` step a shape: the float32 input sums fresh draws, the output buffer zero, the
    one to clear poisoned with NaN. Returns how many miss the reference or leave NaN uncleared."""
    failures = 0
    for config, options, positions, dtype in shapes:
        weights = AttentionWeights.random(config, dtype, "cuda")
        batch = len(positions)
        cache = KVCache.random(config, batch, max(positions) + 2, dtype, "cuda")
        sums = torch.randn(3, batch, config.hidden_size, device="cuda")
        sums[1].zero_()
        sums[2].fill_(float("nan"))
        residual = torch.randn(batch, config.hidden_size, device="cuda").to(dtype)
        want = reference_step(config, weights, sums[0].to(dtype), residual, cache, positions)
        DecodeAttention(config, weights, **options).handoff(
            sums[0], residual, cache, torch.tensor(positions, dtype=torch.int32, device="cuda"), sums_out=sums[1],
            clear=sums[2])
        torch.cuda.synchronize()
        error, cleared = relative_error(sums[1], want.out), bool((sums[2] == 0).all())
        print(f"handoff {options} positions {positions} {dtype}: rel err {error:.1e}, cleared {cleared}")
        failures += not (error < TOLERANCE and cleared)
    return failures


only = chosen_group(("steps", "handoff", "split", "long", "parts", "wide", "kv_rows", "shared", "queue", "uneven"))
failures = 0
if only in (None, "steps"):
    failures += run_steps(SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
if only in (None, "handoff"):
    failures += handoff_steps(HANDOFF_SHAPES)
if only in (None, "split"):
    failures += run_steps(SPLIT_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(SPLIT_SHAPES)
if only in (None, "long"):
    failures += run_steps(LONG_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(LONG_SHAPES)
if only in (None, "parts"):
    failures += run_steps(PARTS_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(PARTS_SHAPES)
if only in (None, "wide"):
    failures += run_steps(WIDE_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(WIDE_SHAPES)
if only in (None, "kv_rows"):
    failures += run_steps(KV_ROWS_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(KV_ROWS_SHAPES)
if only in (None, "shared"):
    failures += run_steps(SHARED_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(SHARED_SHAPES)
if only in (None, "queue"):
    failures += run_steps(QUEUE_SHAPES, AttentionWeights, KVCache, DecodeAttention, reference_step)
    failures += handoff_steps(QUEUE_SHAPES)
if only == "uneven":
    failures += run_steps(UNEVEN_PARTS_SHAPES + UNEVEN_QUEUE_SHAPES, AttentionWeights, KVCache, DecodeAttention,
                          reference_step)
    failures += handoff_steps(UNEVEN_PARTS_SHAPES + UNEVEN_QUEUE_SHAPES)
exit_with(failures)
