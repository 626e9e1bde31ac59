"""Launch every primitive kernel once per algorithm for a few cluster sizes (the steady reduce for three
operations back to back, short and long rows); run under compute-sanitizer.

    compute-sanitizer --tool racecheck python tests/sanitize_primitives.py

Exits non-zero if any result differs from the simulator (the sanitizer reports hazards itself).
"""

import numpy as np

from clusterlab import primitives, simulator
from clusterlab.tour import random_rows

rng = np.random.default_rng()
failures = 0
for size in (1, 2, 3, 4, 8, 16):
    for dtype in primitives.GPU_DTYPES:
        x = random_rows(rng, size, 67, dtype)
        for algorithm in simulator.REDUCE_ALGORITHMS:
            expected, _ = simulator.cluster_reduce(x, op="sum", algorithm=algorithm)
            got = primitives.to_numpy(primitives.cluster_reduce(x, op="sum", algorithm=algorithm))
            failures += not np.array_equal(got.view(np.uint8), expected.view(np.uint8))
        # float32: an element a thread; a pair a thread, then a tail; quads, then a tail (so 777); 16-bit rows
        # of the steady direct, packed: a word a thread (67, 301), two words a thread and a tail, quads of words
        for n in (67, 301, 777, 1030):
            xs = np.stack([random_rows(rng, size, n, dtype) for _ in range(3)])
            for algorithm in simulator.STEADY_BUFFERS:
                expected, _ = simulator.cluster_reduce_steady(xs, op="sum", algorithm=algorithm)
                got = primitives.to_numpy(primitives.cluster_reduce_steady(xs, op="sum", algorithm=algorithm))
                failures += not np.array_equal(got.view(np.uint8), expected.view(np.uint8))
        for algorithm in simulator.GATHER_ALGORITHMS:
            expected, _ = simulator.cluster_gather(x, algorithm=algorithm)
            got = primitives.to_numpy(primitives.cluster_gather(x, algorithm=algorithm))
            failures += not np.array_equal(got.view(np.uint8), expected.view(np.uint8))
print(f"{failures} mismatches")
raise SystemExit(1 if failures else 0)
