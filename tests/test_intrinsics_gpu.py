"""Every intrinsic of clusterlab.ptx on a Hopper GPU, with fresh random data, for cluster sizes
1, 2, 3, 4, 8 and 16 (16 through the non-portable opt-in).

Conventions: each launch has ``CLUSTERS`` clusters of ``size`` blocks of ``N`` threads (the
copy-engine tests, whose destination must be another block, start at 2). Block ``b``
has rank ``r = b % size`` in the cluster starting at block ``b - r``. Exchanges pair block r with
``(r + shift) % size`` for a random shift, and use reversed indices inside the peer, so a wrong
rank, a wrong offset or a missed element each give a wrong answer. Outputs are poisoned (NaN or
a sentinel) before each launch. The same file runs clean under compute-sanitizer:
``compute-sanitizer --tool memcheck python -m pytest -m gpu tests/test_intrinsics_gpu.py`` (and
``--tool racecheck``).
"""

import secrets
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda, types, uint32

from clusterlab import launch, ptx

pytestmark = pytest.mark.gpu

CLUSTER_SIZES = [1, 2, 3, 4, 8, 16]
#: The copy engine sends to *another* block: a cluster of one has no peer to send to.
PEER_CLUSTER_SIZES = CLUSTER_SIZES[1:]
CLUSTERS = 2
N = 128  # threads per block
N2, N4 = 2 * N, 4 * N  # shared array lengths must be compile-time constants
SENTINEL = 0xA5  # byte repeated to poison integer outputs


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def run(kernel, size, *args, block=N, clusters=CLUSTERS):
    """Launch ``clusters`` clusters of ``size`` blocks of ``block`` threads and wait for them."""
    launch(kernel, grid=clusters * size, cluster=size, block=block, non_portable=size > 8)(*args)
    cuda.synchronize()


def clusters_for(count, size=4, block=N):
    """Clusters of ``size`` blocks needed for one thread per element."""
    return -(-count // (size * block))


def sentinel(shape, dtype):
    """An integer array of ``dtype`` whose every byte is SENTINEL."""
    dtype = np.dtype(dtype)
    return np.full(int(np.prod(shape)) * dtype.itemsize, SENTINEL, np.uint8).view(dtype).reshape(shape)


def poisoned(shape, dtype):
    """A device array of NaN (floats) or sentinel bytes (integers): unwritten elements fail."""
    dtype = np.dtype(dtype)
    return cuda.to_device(np.full(shape, np.nan, dtype) if dtype.kind == "f" else sentinel(shape, dtype))


def random_values(rng, dtype, shape):
    """Fresh random values of ``dtype``: normal floats, full-range integers (never all zeros)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def partners(size, shift):
    """(block each block reads from, block each block receives from) for a ring shift."""
    blocks = np.arange(CLUSTERS * size)
    rank = blocks % size
    base = blocks - rank
    return base + (rank + shift) % size, base + (rank - shift) % size


def random_shift(rng, size):
    return int(rng.integers(1, size)) if size > 1 else 0


def assert_same_bits(actual, expected):
    actual, expected = np.ascontiguousarray(actual), np.ascontiguousarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_int = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    mismatch = np.flatnonzero(actual.view(as_int) != expected.view(as_int))
    assert mismatch.size == 0, f"{mismatch.size} elements differ, first at {mismatch[:5]}: {actual.ravel()[mismatch[:5]]} vs {expected.ravel()[mismatch[:5]]}"


# ---------------------------------------------------------------------------------------------
# Special registers
# ---------------------------------------------------------------------------------------------


@cuda.jit
def special_registers(out):
    """out[block, :] = rank, size, cluster_idx, cluster_grid_dim, block_idx_in_cluster, cluster_dim, explicit."""
    block = cuda.blockIdx.x + cuda.gridDim.x * (cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z)
    if cuda.threadIdx.x == 0:
        values = (
            (ptx.cluster_rank(), ptx.cluster_size())
            + ptx.cluster_idx()
            + ptx.cluster_grid_dim()
            + ptx.block_idx_in_cluster()
            + ptx.cluster_dim()
        )
        for k in range(14):
            out[block, k] = values[k]
        out[block, 14] = 1 if ptx.is_explicit_cluster() else 0


def expected_registers(grid, cluster, explicit):
    z, y, x = np.meshgrid(*(np.arange(g) for g in grid[::-1]), indexing="ij")
    pos = [x.ravel(), y.ravel(), z.ravel()]
    inside = [p % c for p, c in zip(pos, cluster)]
    rank = inside[0] + cluster[0] * (inside[1] + cluster[1] * inside[2])
    columns = [rank, np.full_like(rank, np.prod(cluster))]
    columns += [p // c for p, c in zip(pos, cluster)]
    columns += [np.full_like(rank, g // c) for g, c in zip(grid, cluster)]
    columns += inside
    columns += [np.full_like(rank, c) for c in cluster]
    columns += [np.full_like(rank, int(explicit))]
    return np.stack(columns, axis=1).astype(np.uint32)


@pytest.mark.parametrize(
    "grid, cluster",
    [((2 * s, 1, 1), (s, 1, 1)) for s in CLUSTER_SIZES]
    + [((4, 2, 2), (2, 2, 1)), ((2, 4, 6), (1, 2, 3)), ((4, 4, 2), (2, 2, 2)), ((8, 4, 2), (4, 2, 2))],
    ids=lambda v: "x".join(map(str, v)),
)
def test_special_registers(grid, cluster):
    blocks = int(np.prod(grid))
    out = poisoned((blocks, 15), np.uint32)
    launch(special_registers, grid=grid, cluster=cluster, block=32, non_portable=np.prod(cluster) > 8)(out)
    cuda.synchronize()
    np.testing.assert_array_equal(out.copy_to_host(), expected_registers(grid, cluster, explicit=True))


def test_special_registers_without_a_cluster_launch():
    out = poisoned((6, 15), np.uint32)
    special_registers[6, 32](out)
    cuda.synchronize()
    np.testing.assert_array_equal(out.copy_to_host(), expected_registers((6, 1, 1), (1, 1, 1), explicit=False))


@cuda.jit
def clocks(out, cycles):
    """out[block] = sm_id, global_timer delta and clock64 delta around a spin of ``cycles`` cycles."""
    if cuda.threadIdx.x == 0:
        t0 = ptx.global_timer()
        c0 = ptx.clock64()
        c1 = c0
        while c1 - c0 < cycles:
            c1 = ptx.clock64()
        t1 = ptx.global_timer()
        out[cuda.blockIdx.x, 0] = ptx.sm_id()
        out[cuda.blockIdx.x, 1] = t1 - t0
        out[cuda.blockIdx.x, 2] = c1 - c0


def test_sm_id_and_the_two_clocks():
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    cycles = 100_000 + secrets.randbelow(100_000)
    out = poisoned((2 * sms, 3), np.uint64)
    clocks[2 * sms, 32](out, np.uint64(cycles))
    cuda.synchronize()
    got = out.copy_to_host()
    assert (got[:, 0] < sms).all()
    assert len(set(got[:, 0])) > sms // 2  # 2 x SM-count blocks spread over the SMs
    assert (got[:, 2] >= cycles).all() and (got[:, 2] < cycles + 10_000).all()
    # The spin at 0.5 to 3 GHz, in the global timer's nanoseconds (it ticks every few hundred ns).
    assert ((got[:, 1] > cycles / 3.0 - 1000) & (got[:, 1] < cycles * 2.0 + 1000)).all()


# ---------------------------------------------------------------------------------------------
# Failing a launch
# ---------------------------------------------------------------------------------------------

#: Run in a process of its own: a trapped launch loses the CUDA context. Exits 3 where the trapping
#: launch raised on the host after the same kernel ran clean without trapping.
TRAP_SCRIPT = """
import sys
import numpy as np
from numba import cuda
from clusterlab import ptx

@cuda.jit
def maybe_trap(flag, out):
    out[cuda.grid(1)] = 1
    if flag[0] == 1 and cuda.threadIdx.x == 0:
        ptx.trap()

out = cuda.device_array(64, np.uint32)
maybe_trap[2, 32](cuda.to_device(np.zeros(1, np.uint32)), out)
cuda.synchronize()
assert (out.copy_to_host() == 1).all()
print("ran clean", flush=True)
try:
    maybe_trap[2, 32](cuda.to_device(np.ones(1, np.uint32)), out)
    cuda.synchronize()
except Exception as exc:
    print("failed:", type(exc).__name__, exc, flush=True)
    sys.exit(3)
"""


def test_trap_fails_the_launch_with_an_error_the_host_sees():
    done = subprocess.run([sys.executable, "-c", TRAP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "ran clean" in done.stdout


# ---------------------------------------------------------------------------------------------
# Programmatic dependent launch
# ---------------------------------------------------------------------------------------------


@cuda.jit
def slow_producer(values, produced, ends, spin_cycles):
    """Let dependents launch, spin, then write ``produced`` (one word a thread) and stamp the end."""
    ptx.launch_dependents()
    c0 = ptx.clock64()
    while ptx.clock64() - c0 < spin_cycles:
        pass
    i = cuda.grid(1)
    produced[i] = values[i]
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        ends[cuda.blockIdx.x] = ptx.global_timer()


@cuda.jit
def dependent_consumer(produced, got, starts):
    """Stamp the start, wait for the producer's grid, then read what it wrote."""
    if cuda.threadIdx.x == 0:
        starts[cuda.blockIdx.x] = ptx.global_timer()
    ptx.grid_dependency_wait()
    i = cuda.grid(1)
    got[i] = produced[i] ^ uint32(0xFFFFFFFF)


@pytest.mark.parametrize("dependent", [True, False])
def test_dependent_launch_starts_early_and_waits_for_the_writes(dependent, rng):
    """A dependent consumer may start while the producer spins, and still reads every write.

    ``launch_dependents`` permits the early start; it does not oblige the hardware to take it
    (another process on the GPU can hold the SMs the consumer needs). So the data is checked
    at every attempt, and the early start must be seen in at least one of a few attempts.
    Without the attribute, stream order forbids it at every attempt.
    """
    size, blocks, attempts = 2, 2 * CLUSTERS, 5
    values = random_values(rng, np.uint32, blocks * N)
    produced, got = poisoned(blocks * N, np.uint32), poisoned(blocks * N, np.uint32)
    ends, starts = poisoned(blocks, np.uint64), poisoned(blocks, np.uint64)
    stream = cuda.stream()
    producer = launch(slow_producer, grid=blocks, cluster=size, block=N, stream=stream)
    consumer = launch(dependent_consumer, grid=blocks, cluster=size, block=N, stream=stream, dependent=dependent)
    producer(cuda.to_device(values), produced, ends, np.uint64(0))  # compile both before the pairs that count
    consumer(produced, got, starts)
    stream.synchronize()
    overlaps = []
    for _ in range(attempts):
        produced.copy_to_device(sentinel(blocks * N, np.uint32))
        got.copy_to_device(sentinel(blocks * N, np.uint32))
        spin = np.uint64(2_000_000 + secrets.randbelow(1_000_000))  # about a millisecond
        producer(cuda.to_device(values), produced, ends, spin)
        consumer(produced, got, starts)
        stream.synchronize()
        assert_same_bits(got.copy_to_host(), values ^ np.uint32(0xFFFFFFFF))
        first_start, last_end = starts.copy_to_host().min(), ends.copy_to_host().max()
        overlaps.append(bool(first_start < last_end))
        if dependent and overlaps[-1]:
            break
    if dependent:  # placed while the producer spun, at least once; its reads still saw every write
        assert any(overlaps), f"no early start in {attempts} attempts"
    else:  # stream order: never before the producer ended
        assert not any(overlaps), overlaps


# ---------------------------------------------------------------------------------------------
# DSMEM loads and stores: typed layer and raw address-based intrinsics
# ---------------------------------------------------------------------------------------------


def typed_exchange(dtype):
    @cuda.jit
    def exchange(src, loaded, stored, shift):
        tile = cuda.shared.array(N, dtype)
        inbox = cuda.shared.array(N, dtype)
        tid = cuda.threadIdx.x
        peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
        offset = cuda.blockIdx.x * N
        tile[tid] = src[offset + tid]
        ptx.cluster_sync()
        loaded[offset + tid] = ptx.remote_load(tile, N - 1 - tid, peer)
        ptx.remote_store(inbox, N - 1 - tid, peer, tile[tid])
        ptx.cluster_sync()
        stored[offset + tid] = inbox[tid]

    return exchange


def raw_exchange(dtype, load, store):
    @cuda.jit
    def exchange(src, loaded, stored, shift):
        tile = cuda.shared.array(N, dtype)
        inbox = cuda.shared.array(N, dtype)
        tid = cuda.threadIdx.x
        peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
        offset = cuda.blockIdx.x * N
        tile[tid] = src[offset + tid]
        ptx.cluster_sync()
        loaded[offset + tid] = load(ptx.map_shared(ptx.shared_address(tile, N - 1 - tid), peer))
        store(ptx.map_shared(ptx.shared_address(inbox, N - 1 - tid), peer), tile[tid])
        ptx.cluster_sync()
        stored[offset + tid] = inbox[tid]

    return exchange


EXCHANGES = {
    "typed-float16": (np.float16, typed_exchange(types.float16)),
    "typed-int16": (np.int16, typed_exchange(types.int16)),
    "typed-uint16": (np.uint16, typed_exchange(types.uint16)),
    "typed-int32": (np.int32, typed_exchange(types.int32)),
    "typed-uint32": (np.uint32, typed_exchange(types.uint32)),
    "typed-int64": (np.int64, typed_exchange(types.int64)),
    "typed-uint64": (np.uint64, typed_exchange(types.uint64)),
    "typed-float32": (np.float32, typed_exchange(types.float32)),
    "typed-float64": (np.float64, typed_exchange(types.float64)),
    "raw-u16": (np.uint16, raw_exchange(types.uint16, ptx.ld_shared_cluster_u16, ptx.st_shared_cluster_u16)),
    "raw-i32": (np.int32, raw_exchange(types.int32, ptx.ld_shared_cluster_i32, ptx.st_shared_cluster_i32)),
    "raw-u32": (np.uint32, raw_exchange(types.uint32, ptx.ld_shared_cluster_u32, ptx.st_shared_cluster_u32)),
    "raw-i64": (np.int64, raw_exchange(types.int64, ptx.ld_shared_cluster_i64, ptx.st_shared_cluster_i64)),
    "raw-u64": (np.uint64, raw_exchange(types.uint64, ptx.ld_shared_cluster_u64, ptx.st_shared_cluster_u64)),
    "raw-f32": (np.float32, raw_exchange(types.float32, ptx.ld_shared_cluster_f32, ptx.st_shared_cluster_f32)),
    "raw-f64": (np.float64, raw_exchange(types.float64, ptx.ld_shared_cluster_f64, ptx.st_shared_cluster_f64)),
}


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_remote_load_and_store(name, size, rng):
    dtype, kernel = EXCHANGES[name]
    blocks = CLUSTERS * size
    src = random_values(rng, dtype, (blocks, N))
    loaded, stored = poisoned(blocks * N, dtype), poisoned(blocks * N, dtype)
    shift = random_shift(rng, size)
    run(kernel, size, cuda.to_device(src.ravel()), loaded, stored, shift)
    read_from, received_from = partners(size, shift)
    assert_same_bits(loaded.copy_to_host().reshape(blocks, N), src[read_from, ::-1])
    assert_same_bits(stored.copy_to_host().reshape(blocks, N), src[received_from, ::-1])


@cuda.jit
def exchange_v2_f32(src, loaded, stored, shift):
    tile = cuda.shared.array(N2, types.float32, alignment=16)
    inbox = cuda.shared.array(N2, types.float32, alignment=16)
    tid = cuda.threadIdx.x
    peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
    offset = cuda.blockIdx.x * 2 * N
    for k in range(2):
        tile[2 * tid + k] = src[offset + 2 * tid + k]
    ptx.cluster_sync()
    a, b = ptx.ld_shared_cluster_v2_f32(ptx.map_shared(ptx.shared_address(tile, 2 * (N - 1 - tid)), peer))
    loaded[offset + 2 * tid] = a
    loaded[offset + 2 * tid + 1] = b
    destination = ptx.map_shared(ptx.shared_address(inbox, 2 * (N - 1 - tid)), peer)
    ptx.st_shared_cluster_v2_f32(destination, tile[2 * tid], tile[2 * tid + 1])
    ptx.cluster_sync()
    for k in range(2):
        stored[offset + 2 * tid + k] = inbox[2 * tid + k]


def vector4_exchange(dtype, load, store, indexed=False):
    """16-byte exchanges: raw ``load(address)`` / ``store(address, ..)`` on shared::cluster addresses,
    or (``indexed``) the array-indexed ``load(array, index, rank)`` / ``store(array, index, rank, ..)``."""

    @cuda.jit
    def exchange(src, loaded, stored, shift):
        tile = cuda.shared.array(N4, dtype, alignment=16)
        inbox = cuda.shared.array(N4, dtype, alignment=16)
        tid = cuda.threadIdx.x
        peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
        offset = cuda.blockIdx.x * 4 * N
        for k in range(4):
            tile[4 * tid + k] = src[offset + 4 * tid + k]
        ptx.cluster_sync()
        if indexed:
            values = load(tile, 4 * (N - 1 - tid), peer)
        else:
            values = load(ptx.map_shared(ptx.shared_address(tile, 4 * (N - 1 - tid)), peer))
        for k in range(4):
            loaded[offset + 4 * tid + k] = values[k]
        if indexed:
            store(inbox, 4 * (N - 1 - tid), peer, tile[4 * tid], tile[4 * tid + 1], tile[4 * tid + 2], tile[4 * tid + 3])
        else:
            destination = ptx.map_shared(ptx.shared_address(inbox, 4 * (N - 1 - tid)), peer)
            store(destination, tile[4 * tid], tile[4 * tid + 1], tile[4 * tid + 2], tile[4 * tid + 3])
        ptx.cluster_sync()
        for k in range(4):
            stored[offset + 4 * tid + k] = inbox[4 * tid + k]

    return exchange


VECTOR_EXCHANGES = {
    "v2_f32": (np.float32, 2, exchange_v2_f32),
    "typed_v4_f32": (np.float32, 4, vector4_exchange(types.float32, ptx.remote_load_v4_f32, ptx.remote_store_v4_f32,
                                                      indexed=True)),
    "v4_f32": (np.float32, 4, vector4_exchange(types.float32, ptx.ld_shared_cluster_v4_f32, ptx.st_shared_cluster_v4_f32)),
    "v4_b32": (np.uint32, 4, vector4_exchange(types.uint32, ptx.ld_shared_cluster_v4_b32, ptx.st_shared_cluster_v4_b32)),
}


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
@pytest.mark.parametrize("name", sorted(VECTOR_EXCHANGES))
def test_vector_remote_load_and_store(name, size, rng):
    dtype, width, kernel = VECTOR_EXCHANGES[name]
    blocks = CLUSTERS * size
    src = random_values(rng, dtype, (blocks, N, width))
    loaded, stored = poisoned(src.size, dtype), poisoned(src.size, dtype)
    shift = random_shift(rng, size)
    run(kernel, size, cuda.to_device(src.ravel()), loaded, stored, shift)
    read_from, received_from = partners(size, shift)
    assert_same_bits(loaded.copy_to_host().reshape(src.shape), src[read_from, ::-1])
    assert_same_bits(stored.copy_to_host().reshape(src.shape), src[received_from, ::-1])


# ---------------------------------------------------------------------------------------------
# DSMEM reductions and atomics
# ---------------------------------------------------------------------------------------------


def typed_all_reduce(dtype, reduce, identity):
    """Every block adds its values into every block of its cluster (an all-reduce)."""

    @cuda.jit
    def all_reduce(values, out):
        acc = cuda.shared.array(N, dtype)
        tid = cuda.threadIdx.x
        acc[tid] = identity
        ptx.cluster_sync()
        value = values[cuda.blockIdx.x * N + tid]
        for peer in range(ptx.cluster_size()):
            reduce(acc, tid, peer, value)
        ptx.cluster_sync()
        out[cuda.blockIdx.x * N + tid] = acc[tid]

    return all_reduce


def raw_all_reduce(dtype, reduce, identity):
    @cuda.jit
    def all_reduce(values, out):
        acc = cuda.shared.array(N, dtype)
        tid = cuda.threadIdx.x
        acc[tid] = identity
        ptx.cluster_sync()
        value = values[cuda.blockIdx.x * N + tid]
        for peer in range(ptx.cluster_size()):
            reduce(ptx.map_shared(ptx.shared_address(acc, tid), peer), value)
        ptx.cluster_sync()
        out[cuda.blockIdx.x * N + tid] = acc[tid]

    return all_reduce


def _identity(op, dtype):
    if op == "add":
        return dtype(0)
    info = np.iinfo(dtype)
    return dtype(info.min if op == "max" else info.max)


_TYPED_REDUCE = {"add": ptx.remote_add, "max": ptx.remote_max, "min": ptx.remote_min}
_NUMBA = {np.float32: types.float32, np.float64: types.float64, np.int32: types.int32, np.uint32: types.uint32,
          np.int64: types.int64, np.uint64: types.uint64}

REDUCTIONS = {}
for _op, _dtypes in {"add": [np.float32, np.float64, np.int32, np.uint32, np.int64, np.uint64],
                     "max": [np.int32, np.uint32],
                     "min": [np.int32, np.uint32]}.items():
    for _dtype in _dtypes:
        REDUCTIONS[f"remote_{_op}-{np.dtype(_dtype).name}"] = (
            _op, _dtype, typed_all_reduce(_NUMBA[_dtype], _TYPED_REDUCE[_op], _identity(_op, _dtype))
        )
for _name, _op, _dtype, _fn in [
    ("red_add_shared_cluster_f32", "add", np.float32, ptx.red_add_shared_cluster_f32),
    ("red_add_shared_cluster_f64", "add", np.float64, ptx.red_add_shared_cluster_f64),
    ("red_add_shared_cluster_i32", "add", np.int32, ptx.red_add_shared_cluster_i32),
    ("red_add_shared_cluster_u32", "add", np.uint32, ptx.red_add_shared_cluster_u32),
    ("red_add_shared_cluster_u64", "add", np.uint64, ptx.red_add_shared_cluster_u64),
    ("red_max_shared_cluster_i32", "max", np.int32, ptx.red_max_shared_cluster_i32),
    ("red_max_shared_cluster_u32", "max", np.uint32, ptx.red_max_shared_cluster_u32),
    ("red_min_shared_cluster_i32", "min", np.int32, ptx.red_min_shared_cluster_i32),
    ("red_min_shared_cluster_u32", "min", np.uint32, ptx.red_min_shared_cluster_u32),
]:
    REDUCTIONS[_name] = (_op, _dtype, raw_all_reduce(_NUMBA[_dtype], _fn, _identity(_op, _dtype)))


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_remote_reductions(name, size, rng):
    op, dtype, kernel = REDUCTIONS[name]
    blocks = CLUSTERS * size
    values = random_values(rng, dtype, (CLUSTERS, size, N))
    out = poisoned(blocks * N, dtype)
    run(kernel, size, cuda.to_device(values.ravel()), out)
    got = out.copy_to_host().reshape(CLUSTERS, size, N)
    if op == "add" and np.dtype(dtype).kind == "f":
        exact = values.astype(np.float64).sum(axis=1, keepdims=True)
        tolerance = size * np.finfo(dtype).eps * np.abs(values.astype(np.float64)).sum(axis=1, keepdims=True)
        assert np.all(np.abs(got - exact) <= tolerance)
    else:
        reduce = {"add": np.add, "max": np.maximum, "min": np.minimum}[op]
        expected = reduce.reduce(values, axis=1, dtype=dtype, keepdims=True)  # integer add wraps, as red does
        np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))


def atomic_counter(dtype, atom):
    """Every thread of the cluster adds its increment to rank 0's counter and keeps the old value."""

    @cuda.jit
    def count(increments, olds, totals):
        counter = cuda.shared.array(1, dtype)
        tid = cuda.threadIdx.x
        if tid == 0:
            counter[0] = 0
        ptx.cluster_sync()
        target = ptx.map_shared(ptx.shared_address(counter, 0), 0)
        olds[cuda.blockIdx.x * N + tid] = atom(target, increments[cuda.blockIdx.x * N + tid])
        ptx.cluster_sync()
        if tid == 0:
            totals[cuda.blockIdx.x] = counter[0]

    return count


ATOMICS = {
    "atom_add_shared_cluster_f32": (np.float32, atomic_counter(types.float32, ptx.atom_add_shared_cluster_f32)),
    "atom_add_shared_cluster_i32": (np.int32, atomic_counter(types.int32, ptx.atom_add_shared_cluster_i32)),
    "atom_add_shared_cluster_u32": (np.uint32, atomic_counter(types.uint32, ptx.atom_add_shared_cluster_u32)),
}


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
@pytest.mark.parametrize("name", sorted(ATOMICS))
def test_atomic_add_returns_the_old_values(name, size, rng):
    """Sorted by old value, each old value is the previous one plus its increment: a serial order."""
    dtype, kernel = ATOMICS[name]
    increments = rng.integers(1, 100, (CLUSTERS, size * N)).astype(dtype)  # integral: exact in float32
    olds = poisoned(increments.size, dtype)
    totals = poisoned(CLUSTERS * size, dtype)
    run(kernel, size, cuda.to_device(increments.ravel()), olds, totals)
    olds = olds.copy_to_host().reshape(CLUSTERS, size * N)
    for c in range(CLUSTERS):
        order = np.argsort(olds[c], kind="stable")
        chain = np.concatenate([[0], np.cumsum(increments[c][order])[:-1]]).astype(dtype)
        np.testing.assert_array_equal(olds[c][order], chain)
    expected_totals = np.zeros((CLUSTERS, size), dtype)
    expected_totals[:, 0] = increments.sum(axis=1, dtype=dtype)
    np.testing.assert_array_equal(totals.copy_to_host().reshape(CLUSTERS, size), expected_totals)


# ---------------------------------------------------------------------------------------------
# Cluster barrier split into arrive and wait; fences
# ---------------------------------------------------------------------------------------------


@cuda.jit
def split_barrier(src, out, shift, relaxed):
    tile = cuda.shared.array(N, types.float32)
    tid = cuda.threadIdx.x
    peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
    offset = cuda.blockIdx.x * N
    tile[tid] = src[offset + tid]
    if relaxed:
        ptx.fence_acq_rel_cluster()
        ptx.cluster_arrive_relaxed()
    else:
        ptx.cluster_arrive_release()
    ptx.cluster_wait_acquire()
    out[offset + tid] = ptx.remote_load(tile, N - 1 - tid, peer)
    ptx.cluster_sync()


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
@pytest.mark.parametrize("relaxed", [False, True], ids=["release", "fence+relaxed"])
def test_split_cluster_barrier(relaxed, size, rng):
    blocks = CLUSTERS * size
    src = random_values(rng, np.float32, (blocks, N))
    out = poisoned(blocks * N, np.float32)
    shift = random_shift(rng, size)
    run(split_barrier, size, cuda.to_device(src.ravel()), out, shift, relaxed)
    read_from, _ = partners(size, shift)
    assert_same_bits(out.copy_to_host().reshape(blocks, N), src[read_from, ::-1])


# ---------------------------------------------------------------------------------------------
# mbarrier: local phases, remote arrivals
# ---------------------------------------------------------------------------------------------

PHASES = 4


@cuda.jit
def local_phases(src, out, states):
    """Four phases of one mbarrier inside a block: phase 0 waits in PTX at cluster scope, phase 2 at
    CTA scope (the arrivals are the block's own), the odd ones poll try_wait."""
    bar = cuda.shared.array(1, types.uint64)
    tile = cuda.shared.array(N, types.float32)
    tid = cuda.threadIdx.x
    blocks = cuda.gridDim.x
    address = ptx.shared_address(bar, 0)
    if tid == 0:
        ptx.mbarrier_init(address, cuda.blockDim.x)
    cuda.syncthreads()
    for phase in range(PHASES):
        row = (phase * blocks + cuda.blockIdx.x) * N
        tile[tid] = src[row + tid]
        state = ptx.mbarrier_arrive(address)
        if phase == 0:
            ptx.mbarrier_wait_parity(address, 0)
        elif phase == 2:
            ptx.mbarrier_wait_parity_cta(address, 0)
        else:
            while not ptx.mbarrier_try_wait_parity(address, phase % 2):
                pass
        out[row + tid] = tile[N - 1 - tid]
        states[row + tid] = state
        cuda.syncthreads()  # everyone has read ``tile`` before the next phase overwrites it


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
def test_mbarrier_phases_within_a_block(size, rng):
    blocks = CLUSTERS * size
    src = random_values(rng, np.float32, (PHASES, blocks, N))
    out = poisoned(src.size, np.float32)
    states = poisoned(src.size, np.uint64)
    run(local_phases, size, cuda.to_device(src.ravel()), out, states)
    assert_same_bits(out.copy_to_host().reshape(src.shape), src[:, :, ::-1])
    assert not np.any(states.copy_to_host() == sentinel(1, np.uint64)[0]), "an mbarrier state was not written"


@cuda.jit
def remote_arrivals(src, out, shift):
    """Each thread stores into its peer's inbox over DSMEM, then arrives on the peer's mbarrier."""
    bar = cuda.shared.array(1, types.uint64)
    inbox = cuda.shared.array(N, types.float32)
    tid = cuda.threadIdx.x
    peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
    address = ptx.shared_address(bar, 0)
    if tid == 0:
        ptx.mbarrier_init(address, cuda.blockDim.x)
        ptx.fence_mbarrier_init_release_cluster()
    ptx.cluster_sync()
    ptx.remote_store(inbox, tid, peer, src[cuda.blockIdx.x * N + tid])
    ptx.mbarrier_arrive_cluster(ptx.map_shared(address, peer))
    ptx.mbarrier_wait_parity(address, 0)
    out[cuda.blockIdx.x * N + tid] = inbox[N - 1 - tid]
    ptx.cluster_sync()


@pytest.mark.parametrize("size", CLUSTER_SIZES, ids=lambda s: f"c{s}")
def test_remote_mbarrier_arrivals_release_dsmem_stores(size, rng):
    blocks = CLUSTERS * size
    src = random_values(rng, np.float32, (blocks, N))
    out = poisoned(blocks * N, np.float32)
    shift = random_shift(rng, size)
    run(remote_arrivals, size, cuda.to_device(src.ravel()), out, shift)
    _, received_from = partners(size, shift)
    assert_same_bits(out.copy_to_host().reshape(blocks, N), src[received_from, ::-1])


# ---------------------------------------------------------------------------------------------
# Copy engine: bulk copy into a peer, st.async messages
# ---------------------------------------------------------------------------------------------

WORDS = 4  # float32 per thread in the bulk copy
COPY_WORDS = N * WORDS
COPY_BYTES = COPY_WORDS * 4  # 2 KiB per copy


@cuda.jit
def bulk_ring(src, out, shift):
    """Two phases: thread 0 copies this block's outbox into the peer's inbox; all wait on their mbarrier."""
    bar = cuda.shared.array(1, types.uint64)
    outbox = cuda.shared.array((2, COPY_WORDS), types.float32, alignment=128)
    inbox = cuda.shared.array(COPY_WORDS, types.float32, alignment=128)
    tid = cuda.threadIdx.x
    blocks = cuda.gridDim.x
    peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
    address = ptx.shared_address(bar, 0)
    if tid == 0:
        ptx.mbarrier_init(address, 1)
        ptx.fence_mbarrier_init_release_cluster()
    for phase in range(2):
        row = (phase * blocks + cuda.blockIdx.x) * N * WORDS
        for k in range(WORDS):
            outbox[phase, tid * WORDS + k] = src[row + tid * WORDS + k]
    ptx.fence_proxy_async_shared_cta()
    ptx.cluster_sync()
    for phase in range(2):
        if tid == 0:
            ptx.mbarrier_arrive_expect_tx(address, COPY_BYTES)
            ptx.bulk_copy_shared_to_cluster(
                ptx.map_shared(ptx.shared_address(inbox, 0), peer),
                ptx.shared_address(outbox, (phase, 0)),
                COPY_BYTES,
                ptx.map_shared(address, peer),
            )
        ptx.mbarrier_wait_parity(address, phase)
        row = (phase * blocks + cuda.blockIdx.x) * N * WORDS
        for k in range(WORDS):
            out[row + tid * WORDS + k] = inbox[tid * WORDS + k]
        ptx.cluster_sync()  # the inbox is read before the next phase's copy overwrites it


@pytest.mark.parametrize("size", PEER_CLUSTER_SIZES, ids=lambda s: f"c{s}")
def test_bulk_copy_into_peer_completes_on_its_mbarrier(size, rng):
    blocks = CLUSTERS * size
    src = random_values(rng, np.float32, (2, blocks, N * WORDS))
    out = poisoned(src.size, np.float32)
    shift = random_shift(rng, size)
    run(bulk_ring, size, cuda.to_device(src.ravel()), out, shift)
    _, received_from = partners(size, shift)
    assert_same_bits(out.copy_to_host().reshape(src.shape), src[:, received_from])



ROWS, ROW_WORDS = 4, 40  # bulk copies from global memory: one row (160 bytes) a lane
ROWS_WORDS = ROWS * ROW_WORDS


@cuda.jit
def bulk_rows(src, order, out):
    """Lane r of warp 0 has the copy engine bring row ``order[r]`` of ``src`` (written first by this
    block, so fenced for the async proxy) into shared row r; after the mbarrier, every thread reads
    its row back with 16-byte loads and stores it through ``st_shared_v4_f32`` before ``out``."""
    bar = cuda.shared.array(1, types.uint64)
    rows = cuda.shared.array(ROWS_WORDS, types.float32, alignment=16)
    moved = cuda.shared.array(ROWS_WORDS, types.float32, alignment=16)
    tid = cuda.threadIdx.x
    block = cuda.blockIdx.x * ROWS_WORDS
    address = ptx.shared_address(bar, 0)
    for i in range(tid, ROWS_WORDS, N):
        src[block + i] = src[block + i] * 2.0  # ordinary stores the copy engine must see
    ptx.fence_proxy_async_global()
    if tid == 0:
        ptx.mbarrier_init(address, 1)
        ptx.fence_mbarrier_init_release_cluster()
    cuda.syncthreads()
    if tid == 0:
        ptx.mbarrier_arrive_expect_tx(address, ROWS_WORDS * 4)
    cuda.syncwarp()
    if tid < ROWS:
        ptx.bulk_copy_global_to_shared(ptx.shared_address(rows, tid * ROW_WORDS), src, block + order[tid] * ROW_WORDS,
                                       ROW_WORDS * 4, address)
    ptx.mbarrier_wait_parity(address, 0)
    for i in range(tid, ROWS_WORDS // 4, N):
        x0, x1, x2, x3 = ptx.ld_shared_v4_f32(ptx.shared_address(rows, 4 * i))
        ptx.st_shared_v4_f32(ptx.shared_address(moved, 4 * i), x0, x1, x2, x3)
    cuda.syncthreads()
    for i in range(tid, ROWS_WORDS, N):
        out[block + i] = moved[i]


def test_bulk_copy_from_global_memory_lands_rows_where_asked(rng):
    blocks = CLUSTERS
    src = random_values(rng, np.float32, (blocks, ROWS, ROW_WORDS))
    order = rng.permutation(ROWS).astype(np.int32)
    out = poisoned(src.size, np.float32)
    bulk_rows[blocks, N](cuda.to_device(src.ravel()), cuda.to_device(order), out)
    assert_same_bits(out.copy_to_host().reshape(src.shape), 2 * src[:, order])

MESSAGE_BYTES = 64  # per thread: u32 + 4 x b32 + f32 + 2 x f32 + 4 x f32 + u64 + f64


@cuda.jit
def async_messages(words, floats, longs, doubles, out_words, out_floats, out_longs, out_doubles, shift):
    """Each thread sends 64 bytes to the peer with st.async; the peer expects N * 64 bytes."""
    bar = cuda.shared.array(1, types.uint64)
    in_u32 = cuda.shared.array(N, types.uint32)
    in_v4b = cuda.shared.array(N4, types.uint32, alignment=16)
    in_f32 = cuda.shared.array(N, types.float32)
    in_v2f = cuda.shared.array(N2, types.float32, alignment=8)
    in_v4f = cuda.shared.array(N4, types.float32, alignment=16)
    in_u64 = cuda.shared.array(N, types.uint64)
    in_f64 = cuda.shared.array(N, types.float64)
    tid = cuda.threadIdx.x
    thread = cuda.blockIdx.x * N + tid
    peer = (ptx.cluster_rank() + shift) % ptx.cluster_size()
    address = ptx.shared_address(bar, 0)
    if tid == 0:
        ptx.mbarrier_init(address, 1)
        ptx.fence_mbarrier_init_release_cluster()
    ptx.cluster_sync()
    if tid == 0:
        ptx.mbarrier_expect_tx(address, N * MESSAGE_BYTES)
        ptx.mbarrier_arrive(address)
    remote_bar = ptx.map_shared(address, peer)
    slot = N - 1 - tid
    w, f = 5 * thread, 7 * thread
    ptx.st_async_u32(ptx.map_shared(ptx.shared_address(in_u32, slot), peer), words[w], remote_bar)
    ptx.st_async_v4_b32(
        ptx.map_shared(ptx.shared_address(in_v4b, 4 * slot), peer),
        words[w + 1], words[w + 2], words[w + 3], words[w + 4], remote_bar,
    )
    ptx.st_async_f32(ptx.map_shared(ptx.shared_address(in_f32, slot), peer), floats[f], remote_bar)
    ptx.st_async_v2_f32(
        ptx.map_shared(ptx.shared_address(in_v2f, 2 * slot), peer), floats[f + 1], floats[f + 2], remote_bar
    )
    ptx.st_async_v4_f32(
        ptx.map_shared(ptx.shared_address(in_v4f, 4 * slot), peer),
        floats[f + 3], floats[f + 4], floats[f + 5], floats[f + 6], remote_bar,
    )
    ptx.st_async_u64(ptx.map_shared(ptx.shared_address(in_u64, slot), peer), longs[thread], remote_bar)
    ptx.st_async_f64(ptx.map_shared(ptx.shared_address(in_f64, slot), peer), doubles[thread], remote_bar)
    ptx.mbarrier_wait_parity(address, 0)
    out_words[w] = in_u32[tid]
    for k in range(4):
        out_words[w + 1 + k] = in_v4b[4 * tid + k]
    out_floats[f] = in_f32[tid]
    for k in range(2):
        out_floats[f + 1 + k] = in_v2f[2 * tid + k]
    for k in range(4):
        out_floats[f + 3 + k] = in_v4f[4 * tid + k]
    out_longs[thread] = in_u64[tid]
    out_doubles[thread] = in_f64[tid]
    ptx.cluster_sync()


@pytest.mark.parametrize("size", PEER_CLUSTER_SIZES, ids=lambda s: f"c{s}")
def test_st_async_messages_complete_on_the_peer_mbarrier(size, rng):
    blocks = CLUSTERS * size
    inputs = [
        random_values(rng, np.uint32, (blocks, N, 5)),
        random_values(rng, np.float32, (blocks, N, 7)),
        random_values(rng, np.uint64, (blocks, N)),
        random_values(rng, np.float64, (blocks, N)),
    ]
    outputs = [poisoned(a.size, a.dtype) for a in inputs]
    shift = random_shift(rng, size)
    run(async_messages, size, *[cuda.to_device(a.ravel()) for a in inputs], *outputs, shift)
    _, received_from = partners(size, shift)
    for source, result in zip(inputs, outputs):
        assert_same_bits(result.copy_to_host().reshape(source.shape), source[received_from, ::-1])


# ---------------------------------------------------------------------------------------------
# Global loads
# ---------------------------------------------------------------------------------------------


@cuda.jit
def global_loads(words, halves, out, evict_last):
    i = cuda.grid(1)
    if i < out.shape[0]:
        policy = ptx.l2_evict_last_policy() if evict_last else ptx.l2_evict_first_policy()
        if i == 0:  # the whole array into L2, then read as usual: a hint never changes values
            ptx.prefetch_l2_bulk(words, 0, 4 * words.shape[0])
        plain = ptx.ld_global_nc_v4(words, 4 * i)
        streamed = ptx.ld_global_nc_v4_no_allocate(words, 4 * (out.shape[0] - 1 - i))
        hinted = ptx.ld_global_nc_v4_policy(halves, 8 * i, policy)
        for k in range(4):
            out[i, k] = plain[k]
            out[i, 4 + k] = streamed[k]
            out[i, 8 + k] = hinted[k]


@pytest.mark.parametrize("evict_last", [False, True], ids=["evict_first", "evict_last"])
def test_global_128_bit_loads(evict_last, rng):
    rows = 4 * N + 3  # a ragged tail
    words = random_values(rng, np.uint32, (rows, 4))
    halves = random_values(rng, np.float16, (rows, 8))
    out = poisoned((rows, 12), np.uint32)
    run(
        global_loads, 4, cuda.to_device(words.ravel()), cuda.to_device(halves.ravel().view(np.uint16)), out, evict_last,
        clusters=clusters_for(rows),
    )
    expected = np.concatenate([words, words[::-1], halves.view(np.uint32)], axis=1)
    assert_same_bits(out.copy_to_host(), expected)


UNWRITTEN = 0xFFFFFFFF  # a word no producer below stores


@cuda.jit
def relaxed_handoff(words, values, out):
    """Block 1 stores ``values`` into ``words`` one word at a time (strong stores) after a wait of
    20 µs; block 0, already waiting, reads each quad with relaxed loads until no word is unwritten."""
    i = cuda.threadIdx.x
    if cuda.blockIdx.x == 1:
        start = ptx.global_timer()
        while ptx.global_timer() - start < 20000:
            pass
        for k in range(4):
            cuda.atomic.exch(words, 4 * i + k, values[4 * i + k])
    else:
        got = ptx.ld_relaxed_gpu_v4(words, 4 * i)
        while got[0] == UNWRITTEN or got[1] == UNWRITTEN or got[2] == UNWRITTEN or got[3] == UNWRITTEN:
            got = ptx.ld_relaxed_gpu_v4(words, 4 * i)
        for k in range(4):
            out[i, k] = got[k]


def test_relaxed_loads_wait_for_another_blocks_stores(rng):
    """``ld_relaxed_gpu_v4`` in a loop is not hoisted and sees the other block's words arrive: every
    quad ends up read whole, as stored (a hoisted load would spin forever on the unwritten words;
    the producer waits first so that the consumer's first loads find them unwritten)."""
    values = random_values(rng, np.uint32, (N, 4))
    values[values == UNWRITTEN] = 0
    words = cuda.to_device(np.full(4 * N, UNWRITTEN, np.uint32))
    out = poisoned((N, 4), np.uint32)
    relaxed_handoff[2, N](words, cuda.to_device(values.ravel()), out)
    cuda.synchronize()
    assert_same_bits(out.copy_to_host(), values)


STAGES = 3  # slots of the cp.async ring below
AHEAD = STAGES - 1  # rows in flight while one is read; cp_async_wait takes a constant
RING_WORDS = STAGES * 4 * N  # shared array lengths must be compile-time constants


@cuda.jit
def async_copy_ring(words, out):
    """Each thread streams its rows ``i, i + threads, ...`` (16 bytes each) through a ring of
    STAGES slots of its own: copies AHEAD rows ahead, waits for the oldest, reads it back."""
    ring = cuda.shared.array(RING_WORDS, uint32)
    tid = cuda.threadIdx.x
    first, stride = cuda.grid(1), cuda.gridsize(1)
    rows = out.shape[0]
    slot0 = ptx.shared_address(ring, 4 * tid)
    for k in range(AHEAD):
        if first + k * stride < rows:
            ptx.cp_async_16(slot0 + k * 16 * N, words, 4 * (first + k * stride))
        ptx.cp_async_commit()
    k = 0
    row = first
    while row < rows:
        ahead = row + AHEAD * stride
        if ahead < rows:
            ptx.cp_async_16(slot0 + (k + AHEAD) % STAGES * 16 * N, words, 4 * ahead)
        ptx.cp_async_commit()
        ptx.cp_async_wait(AHEAD)  # row k has landed
        got = ptx.ld_shared_v4_b32(slot0 + k % STAGES * 16 * N)
        for e in range(4):
            out[row, e] = got[e]
        k += 1
        row += stride


def test_async_copies_stream_rows_through_a_ring_in_shared_memory(rng):
    rows = 11 * 2 * N + 5  # several laps of the ring per thread, a ragged tail
    words = random_values(rng, np.uint32, (rows, 4))
    out = poisoned((rows, 4), np.uint32)
    run(async_copy_ring, 1, cuda.to_device(words.ravel()), out, clusters=2)
    assert_same_bits(out.copy_to_host(), words)


# ---------------------------------------------------------------------------------------------
# Half-precision conversions on 16-bit storage
# ---------------------------------------------------------------------------------------------


@cuda.jit
def narrow(x, half, bf16):
    i = cuda.grid(1)
    if i < x.size:
        half[i] = ptx.f32_to_f16(x[i])
        bf16[i] = ptx.f32_to_bf16(x[i])


@cuda.jit
def widen(bits, from_half, from_bf16):
    i = cuda.grid(1)
    if i < bits.size:
        from_half[i] = ptx.f16_to_f32(bits[i])
        from_bf16[i] = ptx.bf16_to_f32(bits[i])


@cuda.jit
def pairs(words, xs, unpacked, packed):
    i = cuda.grid(1)
    if i < words.size:
        lo, hi = ptx.f16x2_to_f32x2(words[i])
        unpacked[i, 0] = lo
        unpacked[i, 1] = hi
        lo, hi = ptx.bf16x2_to_f32x2(words[i])
        unpacked[i, 2] = lo
        unpacked[i, 3] = hi
        packed[i, 0] = ptx.f32x2_to_f16x2(xs[i, 0], xs[i, 1])
        packed[i, 1] = ptx.f32x2_to_bf16x2(xs[i, 0], xs[i, 1])


def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (torch on the CPU as the reference)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def assert_same_or_both_nan(actual, expected):
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    assert_same_bits(actual[~nan], expected[~nan])


def wide_range_floats(rng, count):
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0, -65520.0, 6e-8, 3e-8, 1e-45, 3.0e38,
         1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8],
        np.float32,
    )
    scaled = (rng.standard_normal(count) * 2.0 ** rng.integers(-30, 30, count)).astype(np.float32)
    random_bits = rng.integers(0, 2**32, count, dtype=np.uint32).view(np.float32)
    return np.concatenate([specials, scaled, random_bits])


def bf16_as_float32(bits):
    """bfloat16 bits (uint16) -> float32, exactly: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_float32_to_half_and_bfloat16_round_to_nearest_even(rng):
    x = wide_range_floats(rng, 20000)
    half, bf16 = poisoned(x.size, np.uint16), poisoned(x.size, np.uint16)
    run(narrow, 4, cuda.to_device(x), half, bf16, clusters=clusters_for(x.size))
    with np.errstate(over="ignore", invalid="ignore"):
        expected_half = x.astype(np.float16)
    assert_same_or_both_nan(half.copy_to_host().view(np.float16), expected_half)
    assert_same_or_both_nan(bf16_as_float32(bf16.copy_to_host()), bf16_as_float32(bf16_bits(x)))


def test_half_and_bfloat16_to_float32_is_exact_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    from_half, from_bf16 = poisoned(bits.size, np.float32), poisoned(bits.size, np.float32)
    run(widen, 4, cuda.to_device(bits), from_half, from_bf16, block=1024, clusters=clusters_for(bits.size, block=1024))
    assert_same_or_both_nan(from_half.copy_to_host(), bits.view(np.float16).astype(np.float32))
    assert_same_or_both_nan(from_bf16.copy_to_host(), bf16_as_float32(bits))


def test_packed_pairs_keep_the_low_half_first(rng):
    count = 5000
    words = rng.integers(0, 2**32, count, dtype=np.uint32)
    xs = (rng.standard_normal((count, 2)) * 100).astype(np.float32)
    unpacked, packed = poisoned((count, 4), np.float32), poisoned((count, 2), np.uint32)
    run(pairs, 4, cuda.to_device(words), cuda.to_device(xs), unpacked, packed, clusters=clusters_for(count))
    halves = words.view(np.uint16).reshape(count, 2)  # little-endian: low half first
    expected = np.concatenate([halves.view(np.float16).astype(np.float32), bf16_as_float32(halves)], axis=1)
    got = unpacked.copy_to_host()
    assert_same_or_both_nan(got[:, :2], expected[:, :2])
    assert_same_bits(got[:, 2:], expected[:, 2:])  # the bf16 unpack is pure bit moves: NaNs keep payloads
    expected_packed = np.stack(
        [xs.astype(np.float16).view(np.uint32).ravel(), bf16_bits(xs).reshape(count, 2).copy().view(np.uint32).ravel()],
        axis=1,
    )
    assert_same_bits(packed.copy_to_host(), expected_packed)


@cuda.jit
def permuted(a, b, selectors, out):
    i = cuda.grid(1)
    if i < a.size:
        out[i] = ptx.permute_bytes(a[i], b[i], selectors[i])


def test_permute_bytes_picks_bytes_of_both_words_as_the_selector_says(rng):
    count = 5000
    a, b = (rng.integers(0, 2**32, count, dtype=np.uint32) for _ in range(2))
    picks = rng.integers(0, 8, (count, 4))
    picks[:2] = [[0, 1, 4, 5], [2, 3, 6, 7]]  # LOW_HALVES, HIGH_HALVES
    selectors = (picks << np.array([0, 4, 8, 12])).sum(axis=1).astype(np.uint32)
    assert selectors[0] == ptx.LOW_HALVES and selectors[1] == ptx.HIGH_HALVES
    out = poisoned(count, np.uint32)
    run(permuted, 4, cuda.to_device(a), cuda.to_device(b), cuda.to_device(selectors), out, clusters=clusters_for(count))
    eight = np.concatenate([a.view(np.uint8).reshape(count, 4), b.view(np.uint8).reshape(count, 4)], axis=1)
    expected = np.take_along_axis(eight, picks, axis=1).copy().view(np.uint32).ravel()
    assert_same_bits(out.copy_to_host(), expected)


@cuda.jit
def powers_of_two(xs, out):
    i = cuda.grid(1)
    if i < xs.size:
        out[i] = ptx.ex2_approx_ftz(xs[i])


def test_ex2_approx_ftz_is_exp2_within_its_error_bound_and_flushes_below_the_normal_range(rng):
    """Random exponents over the float32 normal range and beyond it: 2 ** x within 2 ** -21
    relative (PTX states 2 ** -22 for ``ex2.approx``) where the result is normal, exactly 1 at 0, 0 where the result would
    be subnormal (the flush) or underflows, as online softmax relies on for masked scores."""
    count = 6000
    xs = np.concatenate([rng.uniform(-125.0, 127.0, count - 4), [0.0, -130.0, -1.0e30, -126.5]]).astype(np.float32)
    out = poisoned(count, np.float32)
    run(powers_of_two, 4, cuda.to_device(xs), out, clusters=clusters_for(count))
    got = out.copy_to_host()
    normal = xs >= -126.0
    expected = np.exp2(xs.astype(np.float64))
    np.testing.assert_allclose(got[normal], expected[normal], rtol=2.0**-21, atol=0)
    assert got[count - 4] == 1.0
    assert np.all(got[~normal] == 0.0)


# ---------------------------------------------------------------------------------------------
# Tensor cores
# ---------------------------------------------------------------------------------------------


def _mma_kernel(mma):
    @cuda.jit
    def products(a, b, c, d, staged):
        """One warp: d = a @ b + c, a [16, 16] and b [16, 8] 16-bit bits as uint32 pairs ``a[row, k/2]``,
        ``b[col, k/2]``; c, d [16, 8] float32. c is read through shared memory, four at a time
        (``ld_shared_v4_f32``), and ``staged`` gets the values as read."""
        cs = cuda.shared.array(128, types.float32)
        lane = cuda.threadIdx.x
        for i in range(lane, 128, 32):
            cs[i] = c[i // 8, i % 8]
        cuda.syncthreads()
        g, t = lane // 4, lane % 4
        # Lane (g, t) reads half t % 2 of row g (t < 2) or g + 8 (t >= 2) of c back, 16 bytes at once.
        row = g if t < 2 else g + 8
        x0, x1, x2, x3 = ptx.ld_shared_v4_f32(ptx.shared_address(cs, row * 8 + 4 * (t % 2)))
        staged[row, 4 * (t % 2)] = x0
        staged[row, 4 * (t % 2) + 1] = x1
        staged[row, 4 * (t % 2) + 2] = x2
        staged[row, 4 * (t % 2) + 3] = x3
        d0, d1, d2, d3 = mma(a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4], b[g, t], b[g, t + 4],
                             cs[g * 8 + 2 * t], cs[g * 8 + 2 * t + 1], cs[(g + 8) * 8 + 2 * t],
                             cs[(g + 8) * 8 + 2 * t + 1])
        d[g, 2 * t] = d0
        d[g, 2 * t + 1] = d1
        d[g + 8, 2 * t] = d2
        d[g + 8, 2 * t + 1] = d3

    return products


MMA_KERNELS = {"f16": _mma_kernel(ptx.mma_f16_m16n8k16), "bf16": _mma_kernel(ptx.mma_bf16_m16n8k16)}


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_multiplies_16x16_by_16x8_in_float32(dtype, rng):
    """The lane layout of the docstring, against float64 NumPy on the values the 16-bit bits hold
    (float32 accumulation: a sum of 16 exact products and c differs from float64 by < 1e-5 relative)."""
    a = rng.standard_normal((16, 16)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    if dtype == "f16":
        a_bits, b_bits = a.astype(np.float16).view(np.uint16), b.astype(np.float16).view(np.uint16)
        a_values, b_values = a_bits.view(np.float16).astype(np.float64), b_bits.view(np.float16).astype(np.float64)
    else:
        a_bits, b_bits = bf16_bits(a).reshape(16, 16), bf16_bits(b).reshape(16, 8)
        a_values, b_values = bf16_as_float32(a_bits).astype(np.float64), bf16_as_float32(b_bits).astype(np.float64)
    a_pairs = np.ascontiguousarray(a_bits).view(np.uint32)  # [16 rows, 8 pairs of k]
    b_pairs = np.ascontiguousarray(b_bits.T).view(np.uint32)  # [8 columns, 8 pairs of k]
    d, staged = poisoned((16, 8), np.float32), poisoned((16, 8), np.float32)
    run(MMA_KERNELS[dtype], 1, cuda.to_device(a_pairs), cuda.to_device(b_pairs), cuda.to_device(c), d, staged,
        block=32, clusters=1)
    want = a_values @ b_values + c
    np.testing.assert_allclose(d.copy_to_host(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert_same_bits(staged.copy_to_host(), c)
