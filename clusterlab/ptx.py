"""Inline PTX for Hopper thread-block clusters, callable inside Numba-CUDA ``@cuda.jit`` kernels.

Every PTX string of clusterlab lives in this module. Each name below is a numba intrinsic: call it
from device code only (from the host it raises). Shapes are scalars unless a docstring says
otherwise; "u32" etc. name the numba integer/float types the intrinsic returns.

Address spaces
--------------
A *cluster* is a group of up to 16 thread blocks that the hardware schedules together on one GPC.
Each block can read and write the shared memory of every block of its cluster (distributed shared
memory, DSMEM). Three kinds of address appear below, all ``uint32``:

* shared::cta address: a byte offset in this block's shared-memory window, from
  :func:`shared_address`. mbarrier operations and the *source* of a bulk copy take these.
* shared::cluster address: the same offset in a chosen block of the cluster, from
  :func:`map_shared` (``mapa``). Remote loads, stores, reductions, ``st.async`` and the
  *destination* of a bulk copy take these. ``map_shared(addr, cluster_rank())`` addresses this
  block's own memory through the cluster window.
* generic pointers: what numba holds for ``cuda.shared.array(...)``; :func:`shared_address`
  converts them.

``remote_load`` / ``remote_store`` / ``remote_add`` / ``remote_max`` / ``remote_min`` do
``shared_address`` + ``map_shared`` + the access in one call, typed by the array's dtype;
``remote_load_v4_f32`` / ``remote_store_v4_f32`` move four float32 with one 16-byte access.

Array indices
-------------
Intrinsics that take ``array, index`` address ``array[index]`` counting from the start of the array, as
PTX addresses do: unlike numba's own ``array[index]``, a negative index does not wrap around from the
end, so a kernel's indices must be non-negative. Numba cannot tell that a signed index is never
negative, and the wrap-around would cost two 64-bit instructions at every access (a tenth to a fifth of the
fused kernels' machine code).

Memory ordering, in one paragraph
---------------------------------
Plain DSMEM loads/stores and ``red`` here are *weak/relaxed*: they are ordered with respect to other
blocks only through a release/acquire pair at cluster scope. The usual pair is the cluster barrier:
every thread's writes before :func:`cluster_arrive_release` are visible to every thread of the
cluster after its :func:`cluster_wait_acquire` (:func:`cluster_sync` does both). mbarrier phases
give the same guarantee one-way: writes before a release-arrive are visible after an acquire-wait
that observes the phase completing. Data delivered by the copy engine (``cp.async.bulk``,
``st.async``) is visible once the receiving mbarrier's phase completes. Ordinary shared-memory
stores that the copy engine will *read* need :func:`fence_proxy_async_shared_cta` first.

A block's shared memory exists for its peers only while the block runs: a block must not touch a
peer's shared memory (a remote load, store, ``red``, ``st.async``, bulk copy or mbarrier arrival)
before its first cluster barrier wait, which shows every block of the cluster running, and every
block must reach a final :func:`cluster_sync` before it exits if any peer may still touch its memory.

Where it is legal
-----------------
Everything here needs compute capability 9.0 (Hopper) and PTX ISA 8.0 or later (``st.async``:
8.1). Cluster barriers and special registers need every thread of the cluster to take part (no
early ``return`` before the last barrier). Under a launch without clusters, every block is a
cluster of one and all of this still works, except the copy-engine sends (bulk copy,
``st.async``), whose destination must be another block.

Constraint letters (LLVM inline asm, NVPTX)
-------------------------------------------
========  ============  ===================
letter    PTX register  numba type
========  ============  ===================
``h``     16-bit        ``uint16`` / ``int16``
``r``     32-bit int    ``uint32`` / ``int32``
``l``     64-bit int    ``uint64`` / ``int64``, pointers
``f``     ``.f32``      ``float32``
``d``     ``.f64``      ``float64``
========  ============  ===================

``~{memory}`` is added to every asm that reads or writes memory another thread may touch, so that
LLVM neither caches values across it nor moves loads and stores over it. Asm without side
effects (special registers, ``mapa``, conversions, read-only ``ld.global.nc``) is left free for the
compiler to schedule, hoist or remove.
"""

from __future__ import annotations

from llvmlite import ir
from numba import cuda, types
from numba.cuda import cgutils
from numba.cuda.api_util import normalize_indices
from numba.cuda.core.errors import NumbaTypeError
from numba.cuda.extending import intrinsic

#: PTX register type -> (inline-asm constraint letter, numba type of the value in Python).
REGISTERS = {
    "b16": ("h", types.uint16),
    "u16": ("h", types.uint16),
    "s16": ("h", types.int16),
    "b32": ("r", types.uint32),
    "u32": ("r", types.uint32),
    "s32": ("r", types.int32),
    "b64": ("l", types.uint64),
    "u64": ("l", types.uint64),
    "s64": ("l", types.int64),
    "f32": ("f", types.float32),
    "f64": ("d", types.float64),
}

#: How an asm statement touches memory; decides ``side_effect`` and the ``~{memory}`` clobber.
PURE = "pure"  # no memory access, no side effect: free to reorder, hoist or delete
READS = "reads"  # reads memory others write: ordered against barriers, deletable if unused
WRITES = "writes"  # writes memory or synchronises: never moved, never deleted

#: NVPTX address spaces (LLVM numbering) of shared and global memory.
_SHARED_ADDRSPACE = 3
_GLOBAL_ADDRSPACE = 1


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _llvm_type(context, ptx_type):
    return context.get_value_type(REGISTERS[ptx_type][1])


def _emit(context, builder, text, results, operands, values, memory):
    """Emit one inline-asm call; return its LLVM result (a struct when several results)."""
    constraints = [f"={REGISTERS[r][0]}" for r in results] + [REGISTERS[o][0] for o in operands]
    if memory != PURE:
        constraints.append("~{memory}")
    result_types = [_llvm_type(context, r) for r in results]
    if not results:
        ret = ir.VoidType()
    elif len(results) == 1:
        ret = result_types[0]
    else:
        ret = ir.LiteralStructType(result_types)
    fnty = ir.FunctionType(ret, [v.type for v in values])
    asm = ir.InlineAsm(fnty, text, ",".join(constraints), side_effect=memory == WRITES)
    return builder.call(asm, values)


def _numba_result(results, boolean):
    if boolean:
        return types.boolean
    if not results:
        return types.void
    kinds = [REGISTERS[r][1] for r in results]
    if len(kinds) == 1:
        return kinds[0]
    return types.UniTuple(kinds[0], len(kinds))


def _wrap_result(context, builder, sig, raw, results, boolean):
    if boolean:
        return builder.icmp_unsigned("!=", raw, ir.Constant(raw.type, 0))
    if len(results) > 1:
        items = [builder.extract_value(raw, i) for i in range(len(results))]
        return context.make_tuple(builder, sig.return_type, items)
    return raw if results else context.get_dummy_value()


def _check_operand(name, position, argty, ptx_type):
    """Integers feed integer registers; integers or floats feed float registers (cast as in arithmetic)."""
    wants_float = isinstance(REGISTERS[ptx_type][1], types.Float)
    accepted = (types.Integer, types.Float) if wants_float else types.Integer
    if not isinstance(argty, accepted):
        kind = "a number" if wants_float else "an integer"
        raise NumbaTypeError(f"{name}: argument {position} must be {kind} ({ptx_type}), got {argty}")


def _typer(arity, body):
    """A typing function of exactly ``arity`` arguments (numba's intrinsics reject *args)."""
    signatures = {
        0: lambda typingctx: body(),
        1: lambda typingctx, a: body(a),
        2: lambda typingctx, a, b: body(a, b),
        3: lambda typingctx, a, b, c: body(a, b, c),
        4: lambda typingctx, a, b, c, d: body(a, b, c, d),
        5: lambda typingctx, a, b, c, d, e: body(a, b, c, d, e),
        6: lambda typingctx, a, b, c, d, e, f: body(a, b, c, d, e, f),
        10: lambda typingctx, a, b, c, d, e, f, g, h, i, j: body(a, b, c, d, e, f, g, h, i, j),
    }
    return signatures[arity]


def _named(fn, name, doc):
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = __name__
    return intrinsic(fn)


def _asm_intrinsic(name, doc, text, results=(), operands=(), memory=PURE, boolean=False):
    """An intrinsic whose arguments are scalars cast to ``operands`` and whose PTX is ``text``.

    ``$0..`` in ``text`` are the results, then the operands. ``boolean=True`` turns a single u32
    result (0 or 1, from ``selp``) into a numba ``boolean``.
    """
    results = (results,) if isinstance(results, str) else tuple(results)
    operands = tuple(operands)
    restype = _numba_result(results, boolean)

    def body(*argtys):
        for position, (argty, ptx_type) in enumerate(zip(argtys, operands)):
            _check_operand(name, position, argty, ptx_type)
        sig = restype(*argtys)

        def codegen(context, builder, sig, args):
            values = [
                context.cast(builder, v, t, REGISTERS[o][1]) for v, t, o in zip(args, sig.args, operands)
            ]
            raw = _emit(context, builder, text, results, operands, values, memory)
            return _wrap_result(context, builder, sig, raw, results, boolean)

        return sig, codegen

    return _named(_typer(len(operands), body), name, doc)


def _check_element(name, array, index):
    """Validate ``array[index]`` and return the index type to compile for (literals widened)."""
    if not isinstance(array, types.Array):
        raise NumbaTypeError(f"{name}: the first argument must be an array, got {array}")
    index = types.unliteral(index)
    if isinstance(index, types.Integer):
        if array.ndim != 1:
            raise NumbaTypeError(f"{name}: {array.ndim}-d array needs a tuple of {array.ndim} indices")
    elif isinstance(index, types.UniTuple) and isinstance(index.dtype, types.Integer):
        if index.count != array.ndim:
            raise NumbaTypeError(f"{name}: {array.ndim}-d array needs {array.ndim} indices, got {index.count}")
    else:
        raise NumbaTypeError(f"{name}: index must be an integer or a tuple of integers, got {index}")
    return index


def _element_pointer(context, builder, arrayty, indexty, array, index):
    """Generic pointer to ``array[index]``; the index counts from the start of the array, never from its end
    (see "Array indices" in the module's docstring)."""
    indexty, indices = normalize_indices(context, builder, indexty, index, arrayty, arrayty.dtype)
    struct = context.make_array(arrayty)(context, builder, value=array)
    return cgutils.get_item_pointer(context, builder, arrayty, struct, indices, wraparound=False)


def _global_element_pointer(context, builder, arrayty, indexty, array, index):
    """``array[index]`` as a pointer into the global address space (what ``cvta.to.global`` spells in PTX)."""
    pointer = _element_pointer(context, builder, arrayty, indexty, array, index)
    return builder.addrspacecast(pointer, ir.PointerType(pointer.type.pointee, _GLOBAL_ADDRSPACE))


def _global_source_asm(name, text, before, after, memory=True):
    """Typing function body of a void instruction on ``before`` u32 operands, the global address of
    ``array[index]`` and ``after`` u32 operands, in that order the ``$0..`` of ``text`` (the copy
    engine's and ``cp.async``'s global sources). Kept even when unused (a side effect); with
    ``memory`` a memory clobber too, so that no load or store moves across it."""

    def body(*argtys):
        lead, (array, index), tail = argtys[:before], argtys[before:before + 2], argtys[before + 2:]
        for position, argty in enumerate(lead):
            _check_operand(name, position, argty, "u32")
        index = _check_element(name, array, index)
        for position, argty in enumerate(tail, start=before + 2):
            _check_operand(name, position, argty, "u32")
        sig = types.void(*lead, array, index, *tail)

        def codegen(context, builder, sig, args):
            def u32(values, types_):
                return [context.cast(builder, value, ty, types.uint32) for value, ty in zip(values, types_)]

            operands = u32(args[:before], sig.args[:before])
            operands.append(_global_element_pointer(context, builder, sig.args[before], sig.args[before + 1],
                                                    args[before], args[before + 1]))
            operands += u32(args[before + 2:], sig.args[before + 2:])
            fnty = ir.FunctionType(ir.VoidType(), [operand.type for operand in operands])
            constraints = ",".join(["r"] * before + ["l"] + ["r"] * after) + (",~{memory}" if memory else "")
            builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=True), operands)
            return context.get_dummy_value()

        return sig, codegen

    return body


def _shared_u32(builder, pointer):
    """Generic pointer -> 32-bit shared::cta address.

    The addrspacecast is what ``cvta.to.shared.u64`` + ``cvt.u32.u64`` spell in PTX; NVVM emits
    exactly that pair, or drops both when it can see the array is a ``.shared`` symbol.
    """
    shared = builder.addrspacecast(pointer, ir.PointerType(pointer.type.pointee, _SHARED_ADDRSPACE))
    return builder.ptrtoint(shared, ir.IntType(32))


# --------------------------------------------------------------------------------------------
# Special registers
# --------------------------------------------------------------------------------------------


def _sreg(name, register, doc):
    return _asm_intrinsic(name, doc, f"mov.u32 $0, {register};", results="u32")


def _sreg3(name, register, doc):
    text = f"mov.u32 $0, {register}.x; mov.u32 $1, {register}.y; mov.u32 $2, {register}.z;"
    return _asm_intrinsic(name, doc, text, results=("u32", "u32", "u32"))


cluster_rank = _sreg(
    "cluster_rank",
    "%cluster_ctarank",
    """cluster_rank() -> uint32: this block's rank in its cluster, 0 .. cluster_size() - 1.

    PTX ``mov.u32 %r, %cluster_ctarank``. The rank is what :func:`map_shared` takes; for a 3-D
    cluster it is ``x + y * dim_x + z * dim_x * dim_y`` of :func:`block_idx_in_cluster`. No memory
    ordering. sm_90+.
    """,
)

cluster_size = _sreg(
    "cluster_size",
    "%cluster_nctarank",
    """cluster_size() -> uint32: number of blocks in this cluster (1 without a cluster launch).

    PTX ``mov.u32 %r, %cluster_nctarank``. No memory ordering. sm_90+.
    """,
)

cluster_idx = _sreg3(
    "cluster_idx",
    "%clusterid",
    """cluster_idx() -> (x, y, z) uint32: this cluster's position in the grid of clusters.

    PTX ``%clusterid.{x,y,z}`` (like ``cuda.blockIdx``, counted in clusters). No memory ordering.
    sm_90+.
    """,
)

cluster_grid_dim = _sreg3(
    "cluster_grid_dim",
    "%nclusterid",
    """cluster_grid_dim() -> (x, y, z) uint32: number of clusters in the grid per axis.

    PTX ``%nclusterid.{x,y,z}``; equals the launch grid (in blocks) divided by the cluster shape.
    No memory ordering. sm_90+.
    """,
)

block_idx_in_cluster = _sreg3(
    "block_idx_in_cluster",
    "%cluster_ctaid",
    """block_idx_in_cluster() -> (x, y, z) uint32: this block's position inside its cluster.

    PTX ``%cluster_ctaid.{x,y,z}``; equals ``cuda.blockIdx`` modulo :func:`cluster_dim` per axis.
    No memory ordering. sm_90+.
    """,
)

cluster_dim = _sreg3(
    "cluster_dim",
    "%cluster_nctaid",
    """cluster_dim() -> (x, y, z) uint32: the cluster shape in blocks per axis.

    PTX ``%cluster_nctaid.{x,y,z}``; the product is :func:`cluster_size`. No memory ordering.
    sm_90+.
    """,
)

is_explicit_cluster = _asm_intrinsic(
    "is_explicit_cluster",
    """is_explicit_cluster() -> bool: True when the launch asked for clusters.

    PTX ``mov.pred %p, %is_explicit_cluster`` (false for an ordinary launch, where every block is
    an implicit cluster of one). No memory ordering. sm_90+.
    """,
    "{ .reg .pred p; mov.pred p, %is_explicit_cluster; selp.u32 $0, 1, 0, p; }",
    results="u32",
    boolean=True,
)

sm_id = _asm_intrinsic(
    "sm_id",
    """sm_id() -> uint32: the SM this block runs on, 0 .. SM count - 1.

    PTX ``mov.u32 %r, %smid``. Shows where the GPU placed a block (which blocks of a grid share an
    SM); the value is meant for measurement, not for choosing work. sm_30+.
    """,
    "mov.u32 $0, %smid;",
    results="u32",
    memory=READS,
)

global_timer = _asm_intrinsic(
    "global_timer",
    """global_timer() -> uint64: the GPU-wide nanosecond timer, the same clock on every SM.

    PTX ``mov.u64 %rd, %globaltimer``. Compares moments across blocks (when each block started);
    it advances in steps (256 ns on an H100 under the default setting), so time short phases with
    :func:`clock64`. Never moved or deleted by the compiler. sm_30+.
    """,
    "mov.u64 $0, %globaltimer;",
    results="u64",
    memory=WRITES,
)

clock64 = _asm_intrinsic(
    "clock64",
    """clock64() -> uint64: this SM's cycle counter.

    PTX ``mov.u64 %rd, %clock64``. Cycle-exact durations inside one block; counters of different
    SMs are not synchronised (use :func:`global_timer` across blocks). Never moved or deleted by
    the compiler. sm_20+.
    """,
    "mov.u64 $0, %clock64;",
    results="u64",
    memory=WRITES,
)


# --------------------------------------------------------------------------------------------
# Cluster barrier and fences
# --------------------------------------------------------------------------------------------

cluster_arrive_release = _asm_intrinsic(
    "cluster_arrive_release",
    """cluster_arrive_release(): arrive at the cluster barrier, releasing this thread's writes.

    PTX ``barrier.cluster.arrive.release``. Every thread of every block in the cluster must arrive
    once per phase; pair with :func:`cluster_wait_acquire`. Work placed between the two overlaps
    the barrier's latency. Not ``.aligned``: legal in divergent code. sm_90+.
    """,
    "barrier.cluster.arrive.release;",
    memory=WRITES,
)

cluster_arrive_relaxed = _asm_intrinsic(
    "cluster_arrive_relaxed",
    """cluster_arrive_relaxed(): arrive at the cluster barrier without ordering memory.

    PTX ``barrier.cluster.arrive.relaxed``: only execution is synchronised. Use it when nothing
    written before it must be seen by peers, or after an explicit :func:`fence_acq_rel_cluster`.
    sm_90+.
    """,
    "barrier.cluster.arrive.relaxed;",
    memory=WRITES,
)

cluster_wait_acquire = _asm_intrinsic(
    "cluster_wait_acquire",
    """cluster_wait_acquire(): wait until every thread of the cluster has arrived; acquire.

    PTX ``barrier.cluster.wait.acquire``. After it, writes released by the arrivals of this phase
    are visible. Each thread must arrive before it waits. sm_90+.
    """,
    "barrier.cluster.wait.acquire;",
    memory=WRITES,
)

cluster_sync = _asm_intrinsic(
    "cluster_sync",
    """cluster_sync(): full cluster barrier (arrive.release then wait.acquire).

    PTX ``barrier.cluster.arrive.release; barrier.cluster.wait.acquire``. The cluster-wide
    ``syncthreads``: after it every block's writes before it are visible to all blocks. Also the
    guarantee a block needs before it exits while peers may still access its shared memory.
    sm_90+.
    """,
    "barrier.cluster.arrive.release; barrier.cluster.wait.acquire;",
    memory=WRITES,
)

fence_acq_rel_cluster = _asm_intrinsic(
    "fence_acq_rel_cluster",
    """fence_acq_rel_cluster(): acquire-release fence at cluster scope.

    PTX ``fence.acq_rel.cluster``: orders this thread's earlier and later memory operations as
    seen by any thread of the cluster. Pair with :func:`cluster_arrive_relaxed` to split the fence
    from the arrive. sm_90+.
    """,
    "fence.acq_rel.cluster;",
    memory=WRITES,
)


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


def _shared_address(typingctx, array, index):
    index = _check_element("shared_address", array, index)

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], sig.args[1], *args)
        return _shared_u32(builder, pointer)

    return types.uint32(array, index), codegen


shared_address = _named(
    _shared_address,
    "shared_address",
    """shared_address(array, index) -> uint32: shared::cta address of ``array[index]``.

    ``array`` must live in shared memory (``cuda.shared.array``, static or dynamic); ``index`` is an
    integer or, for an n-d array, a tuple (same rules as ``array[index]``). numba holds shared arrays
    as generic pointers; this is ``cvta.to.shared.u64`` + ``cvt.u32.u64`` (NVVM folds both away
    when it sees the array's ``.shared`` symbol). Pure arithmetic, no memory access.
    """,
)

map_shared = _asm_intrinsic(
    "map_shared",
    """map_shared(addr, rank) -> uint32: the shared::cluster address of ``addr`` in block ``rank``.

    PTX ``mapa.shared::cluster.u32``. ``addr`` is a shared::cta address (from
    :func:`shared_address`); ``rank`` is a :func:`cluster_rank` of this cluster (0 ..
    cluster_size() - 1). The result addresses the same offset in that block's shared memory.
    Pure address arithmetic, no memory access. sm_90+.
    """,
    "mapa.shared::cluster.u32 $0, $1, $2;",
    results="u32",
    operands=("u32", "u32"),
)


# --------------------------------------------------------------------------------------------
# DSMEM loads and stores (raw, address-based)
# --------------------------------------------------------------------------------------------

_DSMEM_ORDERING = (
    "Weak access: visible to other blocks only after a release/acquire pair at cluster scope "
    "(e.g. :func:`cluster_sync`)"
)


def _ld_shared_cluster(name, ptx_type, results, py_type):
    vec = {1: "", 2: ".v2", 4: ".v4"}[len(results)]
    outs = ", ".join(f"${i}" for i in range(len(results)))
    dest = f"{{{outs}}}" if len(results) > 1 else outs
    instruction = f"ld.shared::cluster{vec}.{ptx_type}"
    doc = f"""{name}(addr) -> {py_type}: load from a shared::cluster address.

    PTX ``{instruction}``. ``addr`` comes from :func:`map_shared` and must be aligned to the access
    size. {_DSMEM_ORDERING}. The block owning ``addr`` must not have exited. sm_90+.
    """
    text = f"{instruction} {dest}, [${len(results)}];"
    return _asm_intrinsic(name, doc, text, results=results, operands=("u32",), memory=READS)


def _st_shared_cluster(name, ptx_type, count, py_type):
    vec = {1: "", 2: ".v2", 4: ".v4"}[count]
    ins = ", ".join(f"${i + 1}" for i in range(count))
    source = f"{{{ins}}}" if count > 1 else ins
    instruction = f"st.shared::cluster{vec}.{ptx_type}"
    values = "value" if count == 1 else ", ".join(f"v{i}" for i in range(count))
    doc = f"""{name}(addr, {values}): store {py_type} to a shared::cluster address.

    PTX ``{instruction}``. ``addr`` comes from :func:`map_shared` and must be aligned to the access
    size. {_DSMEM_ORDERING}. sm_90+.
    """
    text = f"{instruction} [$0], {source};"
    return _asm_intrinsic(name, doc, text, operands=("u32",) + (ptx_type,) * count, memory=WRITES)


ld_shared_cluster_u16 = _ld_shared_cluster("ld_shared_cluster_u16", "u16", ("u16",), "uint16")
ld_shared_cluster_i32 = _ld_shared_cluster("ld_shared_cluster_i32", "s32", ("s32",), "int32")
ld_shared_cluster_u32 = _ld_shared_cluster("ld_shared_cluster_u32", "u32", ("u32",), "uint32")
ld_shared_cluster_i64 = _ld_shared_cluster("ld_shared_cluster_i64", "s64", ("s64",), "int64")
ld_shared_cluster_u64 = _ld_shared_cluster("ld_shared_cluster_u64", "u64", ("u64",), "uint64")
ld_shared_cluster_f32 = _ld_shared_cluster("ld_shared_cluster_f32", "f32", ("f32",), "float32")
ld_shared_cluster_f64 = _ld_shared_cluster("ld_shared_cluster_f64", "f64", ("f64",), "float64")
ld_shared_cluster_v2_f32 = _ld_shared_cluster("ld_shared_cluster_v2_f32", "f32", ("f32",) * 2, "(float32, float32)")
ld_shared_cluster_v4_f32 = _ld_shared_cluster("ld_shared_cluster_v4_f32", "f32", ("f32",) * 4, "4 x float32 tuple")
ld_shared_cluster_v4_b32 = _ld_shared_cluster("ld_shared_cluster_v4_b32", "b32", ("b32",) * 4, "4 x uint32 tuple")

st_shared_cluster_u16 = _st_shared_cluster("st_shared_cluster_u16", "u16", 1, "uint16")
st_shared_cluster_i32 = _st_shared_cluster("st_shared_cluster_i32", "s32", 1, "int32")
st_shared_cluster_u32 = _st_shared_cluster("st_shared_cluster_u32", "u32", 1, "uint32")
st_shared_cluster_i64 = _st_shared_cluster("st_shared_cluster_i64", "s64", 1, "int64")
st_shared_cluster_u64 = _st_shared_cluster("st_shared_cluster_u64", "u64", 1, "uint64")
st_shared_cluster_f32 = _st_shared_cluster("st_shared_cluster_f32", "f32", 1, "float32")
st_shared_cluster_f64 = _st_shared_cluster("st_shared_cluster_f64", "f64", 1, "float64")
st_shared_cluster_v2_f32 = _st_shared_cluster("st_shared_cluster_v2_f32", "f32", 2, "two float32")
st_shared_cluster_v4_f32 = _st_shared_cluster("st_shared_cluster_v4_f32", "f32", 4, "four float32")
st_shared_cluster_v4_b32 = _st_shared_cluster("st_shared_cluster_v4_b32", "b32", 4, "four 32-bit words (16 bytes)")


# --------------------------------------------------------------------------------------------
# DSMEM reductions and atomics
# --------------------------------------------------------------------------------------------


def _red_shared_cluster(name, op, ptx_type):
    instruction = f"red.relaxed.cluster.shared::cluster.{op}.{ptx_type}"
    doc = f"""{name}(addr, value): atomically ``*addr = {op}(*addr, value)`` in a peer's shared memory.

    PTX ``{instruction}``; ``addr`` from :func:`map_shared`. Relaxed at cluster scope: atomic, but
    ordered with other memory only by a later release/acquire (e.g. :func:`cluster_sync`). No
    value comes back (fire and forget; see ``atom_*`` for the old value). sm_90+.
    """
    return _asm_intrinsic(name, doc, f"{instruction} [$0], $1;", operands=("u32", ptx_type), memory=WRITES)


def _atom_shared_cluster(name, op, ptx_type):
    instruction = f"atom.relaxed.cluster.shared::cluster.{op}.{ptx_type}"
    doc = f"""{name}(addr, value) -> old: atomic {op} in a peer's shared memory, returning the old value.

    PTX ``{instruction}``; ``addr`` from :func:`map_shared`. Relaxed at cluster scope (see
    :func:`red_add_shared_cluster_f32`). Waits for the round trip; prefer ``red_*`` when the old
    value is not needed. sm_90+.
    """
    text = f"{instruction} $0, [$1], $2;"
    return _asm_intrinsic(name, doc, text, results=ptx_type, operands=("u32", ptx_type), memory=WRITES)


red_add_shared_cluster_f32 = _red_shared_cluster("red_add_shared_cluster_f32", "add", "f32")
red_add_shared_cluster_f64 = _red_shared_cluster("red_add_shared_cluster_f64", "add", "f64")
red_add_shared_cluster_i32 = _red_shared_cluster("red_add_shared_cluster_i32", "add", "s32")
red_add_shared_cluster_u32 = _red_shared_cluster("red_add_shared_cluster_u32", "add", "u32")
red_add_shared_cluster_u64 = _red_shared_cluster("red_add_shared_cluster_u64", "add", "u64")
red_max_shared_cluster_i32 = _red_shared_cluster("red_max_shared_cluster_i32", "max", "s32")
red_max_shared_cluster_u32 = _red_shared_cluster("red_max_shared_cluster_u32", "max", "u32")
red_min_shared_cluster_i32 = _red_shared_cluster("red_min_shared_cluster_i32", "min", "s32")
red_min_shared_cluster_u32 = _red_shared_cluster("red_min_shared_cluster_u32", "min", "u32")
atom_add_shared_cluster_f32 = _atom_shared_cluster("atom_add_shared_cluster_f32", "add", "f32")
atom_add_shared_cluster_i32 = _atom_shared_cluster("atom_add_shared_cluster_i32", "add", "s32")
atom_add_shared_cluster_u32 = _atom_shared_cluster("atom_add_shared_cluster_u32", "add", "u32")


# --------------------------------------------------------------------------------------------
# Typed DSMEM layer: dispatch on the shared array's dtype at typing time
# --------------------------------------------------------------------------------------------

#: numba dtype -> PTX type of a remote load/store of one element.
_ACCESS_TYPES = {
    types.float16: "b16",
    types.uint16: "u16",
    types.int16: "s16",
    types.int32: "s32",
    types.uint32: "u32",
    types.int64: "s64",
    types.uint64: "u64",
    types.float32: "f32",
    types.float64: "f64",
}

#: (operation, numba dtype) -> PTX type of the ``red`` that implements it. Integer add wraps
#: identically for signed and unsigned 64-bit, so int64 uses ``.u64``. 64-bit max/min are left
#: out on purpose: on an H100 (driver 580) ``red.shared::cluster.max/min.{s,u}64`` into a peer's
#: memory lost updates and compute-sanitizer's racecheck reported plain read/write races in
#: them, i.e. they are not atomic across the cluster.
_REDUCE_TYPES = {
    ("add", types.float32): "f32",
    ("add", types.float64): "f64",
    ("add", types.int32): "s32",
    ("add", types.uint32): "u32",
    ("add", types.int64): "u64",
    ("add", types.uint64): "u64",
    ("max", types.int32): "s32",
    ("max", types.uint32): "u32",
    ("min", types.int32): "s32",
    ("min", types.uint32): "u32",
}


def _remote_pointer(context, builder, sig, args):
    """shared::cluster address (u32) of ``array[index]`` in block ``rank``: args = array, index, rank, ..."""
    arrayty, indexty, rankty = sig.args[:3]
    pointer = _element_pointer(context, builder, arrayty, indexty, args[0], args[1])
    rank = context.cast(builder, args[2], rankty, types.uint32)
    mapped = _emit(
        context, builder, "mapa.shared::cluster.u32 $0, $1, $2;", ("u32",), ("u32", "u32"),
        [_shared_u32(builder, pointer), rank], PURE,
    )
    return mapped


def _check_remote(name, array, index, rank, table):
    """Validate a typed remote access; return the index type to compile for."""
    index = _check_element(name, array, index)
    if not isinstance(rank, types.Integer):
        raise NumbaTypeError(f"{name}: rank must be an integer, got {rank}")
    if array.dtype not in table:
        allowed = ", ".join(sorted({str(k if isinstance(k, types.Type) else k[1]) for k in table}))
        raise NumbaTypeError(f"{name}: arrays of {array.dtype} are not supported (supported: {allowed})")
    return index


def _remote_load(typingctx, array, index, rank):
    index = _check_remote("remote_load", array, index, rank, _ACCESS_TYPES)

    def codegen(context, builder, sig, args):
        ptx_type = _ACCESS_TYPES[sig.args[0].dtype]
        address = _remote_pointer(context, builder, sig, args)
        raw = _emit(
            context, builder, f"ld.shared::cluster.{ptx_type} $0, [$1];", (ptx_type,), ("u32",),
            [address], READS,
        )
        return builder.bitcast(raw, context.get_value_type(sig.return_type))

    return array.dtype(array, index, rank), codegen


def _remote_store(typingctx, array, index, rank, value):
    index = _check_remote("remote_store", array, index, rank, _ACCESS_TYPES)
    if not isinstance(value, (types.Integer, types.Float)):
        raise NumbaTypeError(f"remote_store: value must be a number, got {value}")

    def codegen(context, builder, sig, args):
        dtype = sig.args[0].dtype
        ptx_type = _ACCESS_TYPES[dtype]
        address = _remote_pointer(context, builder, sig, args)
        cast = context.cast(builder, args[3], sig.args[3], dtype)
        bits = builder.bitcast(cast, _llvm_type(context, ptx_type))
        _emit(
            context, builder, f"st.shared::cluster.{ptx_type} [$0], $1;", (), ("u32", ptx_type),
            [address, bits], WRITES,
        )
        return context.get_dummy_value()

    return types.void(array, index, rank, value), codegen


def _remote_reduce(op):
    table = {dtype: ptx for (o, dtype), ptx in _REDUCE_TYPES.items() if o == op}
    name = f"remote_{op}"

    def typer(typingctx, array, index, rank, value):
        index = _check_remote(name, array, index, rank, table)
        if not isinstance(value, (types.Integer, types.Float)):
            raise NumbaTypeError(f"{name}: value must be a number, got {value}")

        def codegen(context, builder, sig, args):
            dtype = sig.args[0].dtype
            ptx_type = table[dtype]
            address = _remote_pointer(context, builder, sig, args)
            cast = context.cast(builder, args[3], sig.args[3], dtype)
            _emit(
                context, builder, f"red.relaxed.cluster.shared::cluster.{op}.{ptx_type} [$0], $1;",
                (), ("u32", ptx_type), [address, cast], WRITES,
            )
            return context.get_dummy_value()

        return types.void(array, index, rank, value), codegen

    return typer


remote_load = _named(
    _remote_load,
    "remote_load",
    """remote_load(array, index, rank) -> array.dtype: read ``array[index]`` of block ``rank``.

    ``array`` is a shared array (static or dynamic ``cuda.shared.array``) of float16, int16,
    uint16, float32, float64, int32, uint32, int64 or uint64; every block of the cluster has the
    same array at the same offset, and this reads block ``rank``'s copy. bfloat16 data lives in
    uint16 arrays (see :func:`bf16_to_f32`). PTX ``mapa.shared::cluster.u32`` +
    ``ld.shared::cluster.<type>``. {ordering}. sm_90+.
    """.format(ordering=_DSMEM_ORDERING),
)

remote_store = _named(
    _remote_store,
    "remote_store",
    """remote_store(array, index, rank, value): write ``value`` into ``array[index]`` of block ``rank``.

    Same arrays and dtypes as :func:`remote_load`; ``value`` is cast to the array's dtype as in
    ``array[index] = value``. PTX ``mapa.shared::cluster.u32`` + ``st.shared::cluster.<type>``.
    {ordering}. sm_90+.
    """.format(ordering=_DSMEM_ORDERING),
)

@cuda.jit(device=True, inline=True)
def remote_load_v4_f32(array, index, rank):
    """remote_load_v4_f32(array, index, rank) -> 4 x float32: ``array[index .. index + 3]`` of block ``rank``.

    One 16-byte access: :func:`shared_address` + :func:`map_shared` + :func:`ld_shared_cluster_v4_f32`.
    ``array`` is a float32 shared array whose element ``index`` is 16-byte aligned (a 16-byte-aligned
    array, ``index`` a multiple of 4). Ordering as :func:`remote_load`.
    """
    return ld_shared_cluster_v4_f32(map_shared(shared_address(array, index), rank))


@cuda.jit(device=True, inline=True)
def remote_store_v4_f32(array, index, rank, x0, x1, x2, x3):
    """remote_store_v4_f32(array, index, rank, x0, x1, x2, x3): write four float32 into ``array[index ..
    index + 3]`` of block ``rank`` with one 16-byte access (alignment as :func:`remote_load_v4_f32`)."""
    st_shared_cluster_v4_f32(map_shared(shared_address(array, index), rank), x0, x1, x2, x3)


remote_add = _named(
    _remote_reduce("add"),
    "remote_add",
    """remote_add(array, index, rank, value): atomically add ``value`` to ``array[index]`` of block ``rank``.

    float32, float64, int32, uint32, int64, uint64 arrays. PTX ``mapa`` +
    ``red.relaxed.cluster.shared::cluster.add.<type>``: atomic, relaxed at cluster scope; the sum
    is complete and visible after a :func:`cluster_sync` (float sums in arrival order). sm_90+.
    """,
)

remote_max = _named(
    _remote_reduce("max"),
    "remote_max",
    """remote_max(array, index, rank, value): atomically ``array[index] = max(array[index], value)`` in block ``rank``.

    int32 and uint32 arrays (64-bit max is not atomic across a cluster on H100). PTX ``mapa`` +
    ``red.relaxed.cluster.shared::cluster.max``. Relaxed at cluster scope; read the result after a
    :func:`cluster_sync`. sm_90+.
    """,
)

remote_min = _named(
    _remote_reduce("min"),
    "remote_min",
    """remote_min(array, index, rank, value): atomically ``array[index] = min(array[index], value)`` in block ``rank``.

    int32 and uint32 arrays (64-bit min is not atomic across a cluster on H100). PTX ``mapa`` +
    ``red.relaxed.cluster.shared::cluster.min``. Relaxed at cluster scope; read the result after a
    :func:`cluster_sync`. sm_90+.
    """,
)


# --------------------------------------------------------------------------------------------
# mbarrier
# --------------------------------------------------------------------------------------------

mbarrier_init = _asm_intrinsic(
    "mbarrier_init",
    """mbarrier_init(addr, count): initialise the mbarrier at shared::cta ``addr`` for ``count`` arrivals.

    PTX ``mbarrier.init.shared::cta.b64``. ``addr`` from :func:`shared_address` of an 8-byte
    aligned 64-bit slot (e.g. a ``cuda.shared.array(1, uint64)``); 1 <= count < 2**20. One thread
    initialises; make the init visible before any other thread (or peer block, or the copy engine)
    uses the barrier: ``cuda.syncthreads()`` within a block, :func:`fence_mbarrier_init_release_cluster`
    + :func:`cluster_sync` across the cluster. sm_80+ (``.shared::cta`` form: PTX 7.8).
    """,
    "mbarrier.init.shared::cta.b64 [$0], $1;",
    operands=("u32", "u32"),
    memory=WRITES,
)

fence_mbarrier_init_release_cluster = _asm_intrinsic(
    "fence_mbarrier_init_release_cluster",
    """fence_mbarrier_init_release_cluster(): release earlier ``mbarrier.init`` to the cluster.

    PTX ``fence.mbarrier_init.release.cluster``: a light fence ordering only mbarrier
    initialisations; follow it by a cluster barrier arrive (e.g. :func:`cluster_sync`) before
    peers or the copy engine signal the barrier. sm_90+.
    """,
    "fence.mbarrier_init.release.cluster;",
    memory=WRITES,
)

mbarrier_arrive = _asm_intrinsic(
    "mbarrier_arrive",
    """mbarrier_arrive(addr) -> uint64 state: arrive once on this block's mbarrier.

    PTX ``mbarrier.arrive.release.cta.shared::cta.b64``. Release at CTA scope: this thread's
    earlier writes are visible to threads of this block that observe the phase complete. The
    returned state token may be ignored. sm_90+ (for ``.release.cta``).
    """,
    "mbarrier.arrive.release.cta.shared::cta.b64 $0, [$1];",
    results="u64",
    operands=("u32",),
    memory=WRITES,
)

mbarrier_arrive_cluster = _asm_intrinsic(
    "mbarrier_arrive_cluster",
    """mbarrier_arrive_cluster(addr): arrive once on an mbarrier of any block in the cluster.

    PTX ``mbarrier.arrive.release.cluster.shared::cluster.b64 _, [addr]``; ``addr`` is a
    shared::cluster address from :func:`map_shared`. Release at cluster scope: this thread's
    earlier writes (including DSMEM stores into the owner) are visible to the owner's threads that
    see the phase complete with :func:`mbarrier_try_wait_parity`. sm_90+.
    """,
    "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [$0];",
    operands=("u32",),
    memory=WRITES,
)

mbarrier_arrive_expect_tx = _asm_intrinsic(
    "mbarrier_arrive_expect_tx",
    """mbarrier_arrive_expect_tx(addr, tx_bytes) -> uint64 state: expect bytes, then arrive.

    PTX ``mbarrier.arrive.expect_tx.release.cta.shared::cta.b64``. Adds ``tx_bytes`` to the
    current phase's transaction count, then arrives (release, CTA scope). The phase completes when
    all arrivals are in *and* the copy engine has delivered ``tx_bytes`` (``cp.async.bulk`` /
    ``st.async`` completing on this barrier; their bytes may land before or after this call).
    sm_90+.
    """,
    "mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 $0, [$1], $2;",
    results="u64",
    operands=("u32", "u32"),
    memory=WRITES,
)

mbarrier_expect_tx = _asm_intrinsic(
    "mbarrier_expect_tx",
    """mbarrier_expect_tx(addr, tx_bytes): add ``tx_bytes`` to the current phase without arriving.

    PTX ``mbarrier.expect_tx.relaxed.cta.shared::cta.b64``. Relaxed: orders nothing by itself.
    sm_90+.
    """,
    "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;",
    operands=("u32", "u32"),
    memory=WRITES,
)

mbarrier_try_wait_parity = _asm_intrinsic(
    "mbarrier_try_wait_parity",
    """mbarrier_try_wait_parity(addr, parity) -> bool: has the phase of parity ``parity`` completed?

    PTX ``mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64``. Phases alternate parity 0,
    1, 0, ... starting at 0 after init; waiting on parity p returns True once the phase with that
    parity has completed. The hardware may suspend the thread for a while before answering False.
    Acquire at cluster scope: on True, writes released by the arrivals (local or remote) and bytes
    delivered by the copy engine are visible. ``addr`` is this block's own mbarrier (waiting on a
    peer's is not allowed). sm_90+.
    """,
    "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [$1], $2; selp.u32 $0, 1, 0, p; }",
    results="u32",
    operands=("u32", "u32"),
    memory=WRITES,
    boolean=True,
)

def _mbarrier_wait_parity(name, scope, doc):
    """The blocking wait of :func:`mbarrier_try_wait_parity`, acquiring at ``scope`` ("cluster" or "cta")."""
    return _asm_intrinsic(
        name,
        doc,
        "{ .reg .pred p; clusterlab_mbarrier_wait: "
        f"mbarrier.try_wait.parity.acquire.{scope}.shared::cta.b64 p, [$0], $1; "
        "@!p bra clusterlab_mbarrier_wait; }",
        operands=("u32", "u32"),
        memory=WRITES,
    )


mbarrier_wait_parity = _mbarrier_wait_parity(
    "mbarrier_wait_parity",
    "cluster",
    """mbarrier_wait_parity(addr, parity): block until the phase of parity ``parity`` has completed.

    A PTX loop around ``mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64`` (see
    :func:`mbarrier_try_wait_parity` for the semantics). sm_90+.
    """,
)

mbarrier_wait_parity_cta = _mbarrier_wait_parity(
    "mbarrier_wait_parity_cta",
    "cta",
    """mbarrier_wait_parity_cta(addr, parity): :func:`mbarrier_wait_parity`, acquiring at CTA scope.

    A PTX loop around ``mbarrier.try_wait.parity.acquire.cta.shared::cta.b64``: enough where the
    phase is completed by this block's own threads and by bulk copies into this block's shared
    memory (a ring the block fills from global memory), not where peers' writes must be seen. The
    cluster-scope wait invalidates the SM's L1 on every return (``CCTL.IVALL``); this one does
    not. sm_90+.
    """,
)


# --------------------------------------------------------------------------------------------
# Copy engine: bulk copies and st.async
# --------------------------------------------------------------------------------------------

fence_proxy_async_shared_cta = _asm_intrinsic(
    "fence_proxy_async_shared_cta",
    """fence_proxy_async_shared_cta(): make this thread's shared-memory writes visible to the copy engine.

    PTX ``fence.proxy.async.shared::cta``. Ordinary stores go through the generic proxy; the
    bulk-copy engine reads through the async proxy. Each thread that wrote the source of a
    :func:`bulk_copy_shared_to_cluster` runs this, then a barrier (``cuda.syncthreads()``) orders it
    before the thread that issues the copy. sm_90+.
    """,
    "fence.proxy.async.shared::cta;",
    memory=WRITES,
)

bulk_copy_shared_to_cluster = _asm_intrinsic(
    "bulk_copy_shared_to_cluster",
    """bulk_copy_shared_to_cluster(dst, src, size_bytes, mbar): copy engine copy into a peer's shared memory.

    PTX ``cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [dst], [src],
    size, [mbar]``. ``src`` is a shared::cta address of this block; ``dst`` and ``mbar`` are
    shared::cluster addresses (:func:`map_shared`) in the *same* destination block, which must be
    another block of the cluster (compute-sanitizer's memcheck rejects a copy into the issuing
    block itself: "not located in remote CTA"); ``dst``, ``src`` 16-byte aligned, ``size_bytes`` a
    multiple of 16. Asynchronous: issued by one thread, completes
    by decrementing ``mbar``'s transaction count by ``size_bytes``; the receiver waits with
    :func:`mbarrier_arrive_expect_tx` + :func:`mbarrier_wait_parity`. The source must not be
    overwritten, nor its block exit, until the receiver has seen completion (e.g. a final
    :func:`cluster_sync`). Writes to ``src`` by ordinary stores need
    :func:`fence_proxy_async_shared_cta` first. sm_90+.
    """,
    "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
    operands=("u32", "u32", "u32", "u32"),
    memory=WRITES,
)


fence_proxy_async_global = _asm_intrinsic(
    "fence_proxy_async_global",
    """fence_proxy_async_global(): make this thread's global-memory writes visible to the copy engine.

    PTX ``fence.proxy.async.global``: as :func:`fence_proxy_async_shared_cta`, for data in global
    memory that a :func:`bulk_copy_global_to_shared` of this block will read: each writing thread
    runs it after its stores, then a barrier (``cuda.syncthreads()``) orders it before the thread
    that issues the copy. sm_90+.
    """,
    "fence.proxy.async.global;",
    memory=WRITES,
)


bulk_copy_global_to_shared = _named(
    _typer(5, _global_source_asm(
        "bulk_copy_global_to_shared",
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];", 1, 2,
    )),
    "bulk_copy_global_to_shared",
    """bulk_copy_global_to_shared(dst, array, index, size_bytes, mbar): copy engine copy from global memory.

    PTX ``cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], size,
    [mbar]``: one instruction moves a whole contiguous range into this block's shared memory at
    ``dst`` (a shared::cta address, :func:`shared_address`), holding no register and no thread
    meanwhile; on arrival it decrements the transaction count of this block's mbarrier ``mbar``
    by ``size_bytes``. The receiver expects the bytes with :func:`mbarrier_arrive_expect_tx` and
    reads after :func:`mbarrier_wait_parity`. Both addresses 16-byte aligned, ``size_bytes`` a
    multiple of 16. Data written earlier in the kernel by ordinary stores needs
    :func:`fence_proxy_async_global` first. sm_90+.
    """,
)


def _st_async(name, ptx_type, count, py_type):
    vec = {1: "", 2: ".v2", 4: ".v4"}[count]
    ins = ", ".join(f"${i + 1}" for i in range(count))
    source = f"{{{ins}}}" if count > 1 else ins
    instruction = f"st.async.shared::cluster.mbarrier::complete_tx::bytes{vec}.{ptx_type}"
    values = "value" if count == 1 else ", ".join(f"v{i}" for i in range(count))
    nbytes = count * (8 if ptx_type.endswith("64") else 4)
    doc = f"""{name}(addr, {values}, mbar): asynchronous {nbytes}-byte store of {py_type} into a peer, signalling its mbarrier.

    PTX ``{instruction}``. ``addr`` and ``mbar`` are shared::cluster addresses
    (:func:`map_shared`) in the same destination block, another block of the cluster (as for
    :func:`bulk_copy_shared_to_cluster`); ``addr`` aligned to {nbytes} bytes. On
    arrival the store decrements ``mbar``'s transaction count by {nbytes}; the receiver expects the
    bytes with :func:`mbarrier_arrive_expect_tx` and reads after :func:`mbarrier_wait_parity`. The
    cheapest way to send a small message to one peer. sm_90+ (PTX 8.1).
    """
    text = f"{instruction} [$0], {source}, [${count + 1}];"
    return _asm_intrinsic(name, doc, text, operands=("u32",) + (ptx_type,) * count + ("u32",), memory=WRITES)


st_async_u32 = _st_async("st_async_u32", "u32", 1, "uint32")
st_async_f32 = _st_async("st_async_f32", "f32", 1, "float32")
st_async_u64 = _st_async("st_async_u64", "u64", 1, "uint64")
st_async_f64 = _st_async("st_async_f64", "f64", 1, "float64")
st_async_v2_f32 = _st_async("st_async_v2_f32", "f32", 2, "two float32")
st_async_v4_f32 = _st_async("st_async_v4_f32", "f32", 4, "four float32")
st_async_v4_b32 = _st_async("st_async_v4_b32", "b32", 4, "four 32-bit words")


# --------------------------------------------------------------------------------------------
# Global memory: 128-bit read-only loads with cache hints, bulk L2 prefetch
# --------------------------------------------------------------------------------------------


def _ld_global_v4(name, instruction, with_policy, doc, side_effect=False):
    """A 128-bit global load ``instruction`` (``ld....v4.b32``) as an intrinsic; ``side_effect``: never
    merged with another or moved out of a loop (a load that may see another thread's store)."""
    text = f"{instruction} {{$0, $1, $2, $3}}, [$4]" + (", $5;" if with_policy else ";")

    def body(array, index, *policy):
        index = _check_element(name, array, index)
        if policy and not isinstance(policy[0], types.Integer):
            raise NumbaTypeError(f"{name}: policy must be a uint64 from l2_evict_first_policy(), got {policy[0]}")
        sig = types.UniTuple(types.uint32, 4)(array, index, *policy)

        def codegen(context, builder, sig, args):
            values = [_global_element_pointer(context, builder, sig.args[0], sig.args[1], args[0], args[1])]
            if with_policy:
                values.append(context.cast(builder, args[2], sig.args[2], types.uint64))
            u32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([u32] * 4), [v.type for v in values])
            constraints = "=r,=r,=r,=r,l" + (",l" if with_policy else "")
            raw = builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), values)
            items = [builder.extract_value(raw, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, items)

        return sig, codegen

    return _named(_typer(3 if with_policy else 2, body), name, doc.format(instruction=instruction))


_GLOBAL_V4_COMMON = """The 16 bytes at ``array[index]`` (any dtype; the element's address must be 16-byte
    aligned, i.e. ``index * itemsize`` a multiple of 16 from a 16-byte aligned base) as four uint32
    words in memory order; unpack half-precision pairs with :func:`f16x2_to_f32x2` /
    :func:`bf16x2_to_f32x2`. Non-coherent read-only path: the data must not be written by any
    thread during the kernel. No side effects: the compiler may schedule it early, so issue all
    independent loads of a row before using the first (bytes in flight decide bandwidth)."""

ld_global_nc_v4 = _ld_global_v4(
    "ld_global_nc_v4",
    "ld.global.nc.v4.b32",
    False,
    """ld_global_nc_v4(array, index) -> 4 x uint32: 128-bit read-only global load.

    PTX ``{instruction}``. """ + _GLOBAL_V4_COMMON,
)

ld_global_nc_v4_no_allocate = _ld_global_v4(
    "ld_global_nc_v4_no_allocate",
    "ld.global.nc.L1::no_allocate.L2::256B.v4.b32",
    False,
    """ld_global_nc_v4_no_allocate(array, index) -> 4 x uint32: streaming 128-bit read-only load.

    PTX ``{instruction}``: bypass L1 allocation (data read once) and fetch 256-byte L2 sectors.
    For weights streamed once per kernel. """ + _GLOBAL_V4_COMMON,
)

ld_global_nc_v4_policy = _ld_global_v4(
    "ld_global_nc_v4_policy",
    "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.b32",
    True,
    """ld_global_nc_v4_policy(array, index, policy) -> 4 x uint32: streaming load with an L2 eviction policy.

    PTX ``{instruction}``; ``policy`` from :func:`l2_evict_first_policy` (data read once, evict it
    first so activations and KV cache stay in L2) or :func:`l2_evict_last_policy`. """
    + _GLOBAL_V4_COMMON,
)

ld_relaxed_gpu_v4 = _ld_global_v4(
    "ld_relaxed_gpu_v4",
    "ld.relaxed.gpu.global.v4.b32",
    False,
    """ld_relaxed_gpu_v4(array, index) -> 4 x uint32: a 128-bit load that sees other blocks' stores.

    PTX ``{instruction}``: a strong load at GPU scope, each 32-bit word read whole. Unlike the
    ``.nc`` loads it may read words another block of the same kernel writes (with a strong store
    such as ``cuda.atomic.exch``), and it is never merged or hoisted, so a loop can wait on it until
    the words it expects have arrived. It orders nothing else: the words themselves are the flag.
    Alignment as for :func:`ld_global_nc_v4`.""",
    side_effect=True,
)


# A side effect (never deleted) but no memory clobber: a hint that reads nothing the program sees,
# so loads and stores around it stay free to move.
prefetch_l2_bulk = _named(
    _typer(3, _global_source_asm("prefetch_l2_bulk", "cp.async.bulk.prefetch.L2.global [$0], $1;", 0, 1,
                                 memory=False)),
    "prefetch_l2_bulk",
    """prefetch_l2_bulk(array, index, nbytes): ask the copy engine to bring ``nbytes`` from ``array[index]`` into L2.

    PTX ``cp.async.bulk.prefetch.L2.global [addr], nbytes``: one instruction for a whole
    contiguous range, no registers, no completion to wait for (a hint: the bytes may be evicted
    before they are read). The address must be 16-byte aligned and ``nbytes`` a multiple of 16.
    Lets a kernel keep device memory busy across work that issues no loads of its own (barriers,
    DSMEM exchanges), and keep more bytes in flight than its registers hold. sm_90+.
    """,
)

# --------------------------------------------------------------------------------------------
# Asynchronous copies global -> shared, one thread's 16 bytes at a time (cp.async)
# --------------------------------------------------------------------------------------------


cp_async_16 = _named(
    _typer(3, _global_source_asm("cp_async_16", "cp.async.cg.shared.global [$0], [$1], 16;", 1, 0)),
    "cp_async_16",
    """cp_async_16(dst, array, index): start copying the 16 bytes at ``array[index]`` into shared memory at ``dst``.

    PTX ``cp.async.cg.shared.global [dst], [src], 16``: the load goes out now and lands in
    shared memory later, holding no register meanwhile, so a thread can keep many loads in
    flight across work of its own (a pipeline of stages, or a cluster barrier). ``dst`` is a
    shared::cta address (:func:`shared_address`), both ends 16-byte aligned; the global data must
    not change during the kernel. Bypasses L1 (``.cg``); no L2 prefetch-size hint (on an H200 a
    ``.L2::256B`` hint cost 5-10% of the streaming rate). Copies are grouped by
    :func:`cp_async_commit` and waited for with :func:`cp_async_wait`; only the issuing thread
    is guaranteed to see the bytes after its wait (others need a barrier too). sm_80+.
    """,
)

cp_async_commit = _asm_intrinsic(
    "cp_async_commit",
    """cp_async_commit(): close this thread's group of :func:`cp_async_16` copies issued since the last commit.

    PTX ``cp.async.commit_group``. A commit with no copies makes an empty group, complete at
    once: committing once per pipeline stage, loads or not, keeps group counts uniform. sm_80+.
    """,
    "cp.async.commit_group;",
    memory=WRITES,
)


trap = _asm_intrinsic(
    "trap",
    """trap(): abort the kernel.

    PTX ``trap``. The launch fails with an error the host sees at its next synchronisation, and the
    CUDA context is lost. For a wait that can no longer end: failing the launch frees the GPU, where
    waiting on would hold it forever. sm_30+.
    """,
    "trap;",
    memory=WRITES,
)

grid_dependency_wait = _asm_intrinsic(
    "grid_dependency_wait",
    """grid_dependency_wait(): wait until the grids this one depends on have completed and their memory is visible.

    PTX ``griddepcontrol.wait``. Under programmatic dependent launch (``clusterlab.launch(...,
    dependent=True)``) a kernel may start while the kernel before it in the stream is still
    running; everything before this wait may only read what no earlier kernel writes (weights, say)
    and write nothing an earlier kernel reads. Without that launch attribute it returns at once. sm_90+.
    """,
    "griddepcontrol.wait;",
    memory=WRITES,
)

launch_dependents = _asm_intrinsic(
    "launch_dependents",
    """launch_dependents(): let the next kernel in the stream start before this one ends.

    PTX ``griddepcontrol.launch_dependents``. Once every block of this grid has issued it (or
    exited), a kernel launched after it with programmatic dependent launch may start its blocks
    wherever there is room; that kernel still waits for this grid's completion in its
    :func:`grid_dependency_wait`. A hint with no effect on what either kernel computes. sm_90+.
    """,
    "griddepcontrol.launch_dependents;",
    memory=WRITES,
)


def _cp_async_wait(pending):
    name = "cp_async_wait"
    if not isinstance(pending, types.IntegerLiteral):
        raise NumbaTypeError(f"{name}: the number of pending groups must be a compile-time constant, got {pending}")
    count = pending.literal_value
    if not 0 <= count <= 255:
        raise NumbaTypeError(f"{name}: pending groups must be 0..255, got {count}")
    sig = types.void(pending)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.VoidType(), [])
        builder.call(ir.InlineAsm(fnty, f"cp.async.wait_group {count};", "~{memory}", side_effect=True), [])
        return context.get_dummy_value()

    return sig, codegen


cp_async_wait = _named(
    _typer(1, _cp_async_wait),
    "cp_async_wait",
    """cp_async_wait(pending): wait until at most ``pending`` of this thread's newest copy groups are still in flight.

    PTX ``cp.async.wait_group pending``; ``pending`` a compile-time constant (a literal, or a
    constant the kernel closes over). With one group committed per pipeline stage and ``S``
    stages, ``cp_async_wait(S - 1)`` after committing stage ``k + S - 1`` means stage ``k`` has
    landed. Makes this thread's copies visible to this thread only. sm_80+.
    """,
)

ld_shared_v4_b32 = _asm_intrinsic(
    "ld_shared_v4_b32",
    """ld_shared_v4_b32(addr) -> 4 x uint32: the 16 bytes at shared::cta ``addr`` (16-byte aligned).

    PTX ``ld.shared.v4.b32``: one 128-bit shared-memory load, e.g. of data a :func:`cp_async_16`
    brought in; words in memory order. sm_20+.
    """,
    "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
    results=("b32", "b32", "b32", "b32"),
    operands=("u32",),
    memory=READS,
)

ld_shared_v4_f32 = _asm_intrinsic(
    "ld_shared_v4_f32",
    """ld_shared_v4_f32(addr) -> 4 x float32: the 16 bytes at shared::cta ``addr`` (16-byte aligned).

    PTX ``ld.shared.v4.f32``: four consecutive float32 of a shared array in one 128-bit load
    (``addr`` from :func:`shared_address`). sm_20+.
    """,
    "ld.shared.v4.f32 {$0, $1, $2, $3}, [$4];",
    results=("f32", "f32", "f32", "f32"),
    operands=("u32",),
    memory=READS,
)


st_shared_v4_f32 = _asm_intrinsic(
    "st_shared_v4_f32",
    """st_shared_v4_f32(addr, x0, x1, x2, x3): store four float32 at shared::cta ``addr`` (16-byte aligned).

    PTX ``st.shared.v4.f32``: one 128-bit shared-memory store, the counterpart of
    :func:`ld_shared_v4_f32`. sm_20+.
    """,
    "st.shared.v4.f32 [$0], {$1, $2, $3, $4};",
    operands=("u32", "f32", "f32", "f32", "f32"),
    memory=WRITES,
)


l2_evict_first_policy = _asm_intrinsic(
    "l2_evict_first_policy",
    """l2_evict_first_policy() -> uint64: an L2 cache policy marking loaded lines evict-first.

    PTX ``createpolicy.fractional.L2::evict_first.b64 policy, 1.0``; pass to
    :func:`ld_global_nc_v4_policy`. Create it once per thread, outside loops. sm_80+.
    """,
    "createpolicy.fractional.L2::evict_first.b64 $0, 1.0;",
    results="u64",
)

l2_evict_last_policy = _asm_intrinsic(
    "l2_evict_last_policy",
    """l2_evict_last_policy() -> uint64: an L2 cache policy marking loaded lines evict-last.

    PTX ``createpolicy.fractional.L2::evict_last.b64 policy, 1.0``; for data reused across
    kernels (keep it in L2). sm_80+.
    """,
    "createpolicy.fractional.L2::evict_last.b64 $0, 1.0;",
    results="u64",
)


# --------------------------------------------------------------------------------------------
# Half-precision conversions on 16-bit storage (uint16 arrays)
# --------------------------------------------------------------------------------------------

f16_to_f32 = _asm_intrinsic(
    "f16_to_f32",
    """f16_to_f32(bits) -> float32: IEEE half stored as uint16 -> float32 (exact).

    PTX ``cvt.f32.f16``. Lets float16 data live in uint16 shared arrays. sm_53+.
    """,
    "cvt.f32.f16 $0, $1;",
    results="f32",
    operands=("b16",),
)

f32_to_f16 = _asm_intrinsic(
    "f32_to_f16",
    """f32_to_f16(x) -> uint16: float32 -> IEEE half bits, round to nearest even.

    PTX ``cvt.rn.f16.f32`` (overflow gives inf, as numpy's ``astype(float16)``). sm_53+.
    """,
    "cvt.rn.f16.f32 $0, $1;",
    results="b16",
    operands=("f32",),
)

bf16_to_f32 = _asm_intrinsic(
    "bf16_to_f32",
    """bf16_to_f32(bits) -> float32: bfloat16 stored as uint16 -> float32 (exact).

    PTX ``cvt.f32.bf16``. numba rejects bfloat16 shared arrays; keep bf16 data in uint16 arrays
    and convert with this. sm_90+.
    """,
    "cvt.f32.bf16 $0, $1;",
    results="f32",
    operands=("b16",),
)

f32_to_bf16 = _asm_intrinsic(
    "f32_to_bf16",
    """f32_to_bf16(x) -> uint16: float32 -> bfloat16 bits, round to nearest even.

    PTX ``cvt.rn.bf16.f32`` (NaN stays NaN). sm_80+.
    """,
    "cvt.rn.bf16.f32 $0, $1;",
    results="b16",
    operands=("f32",),
)

f16x2_to_f32x2 = _asm_intrinsic(
    "f16x2_to_f32x2",
    """f16x2_to_f32x2(word) -> (lo, hi) float32: two halves packed in a uint32 -> two float32 (exact).

    ``lo`` is the half at the lower address (bits 0..15), as in a word from
    :func:`ld_global_nc_v4`. PTX ``mov.b32 {lo, hi}`` + two ``cvt.f32.f16``. sm_53+.
    """,
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
    results=("f32", "f32"),
    operands=("b32",),
)

bf16x2_to_f32x2 = _asm_intrinsic(
    "bf16x2_to_f32x2",
    """bf16x2_to_f32x2(word) -> (lo, hi) float32: two bfloat16 packed in a uint32 -> two float32 (exact).

    ``lo`` is the value at the lower address (bits 0..15). A bfloat16 is the top half of a float32,
    so PTX ``shl.b32`` / ``and.b32`` (two integer ops, no ``cvt``) do it. sm_50+.
    """,
    "{ .reg .b32 lo, hi; shl.b32 lo, $2, 16; and.b32 hi, $2, 0xFFFF0000; mov.b32 $0, lo; mov.b32 $1, hi; }",
    results=("f32", "f32"),
    operands=("b32",),
)

f32x2_to_f16x2 = _asm_intrinsic(
    "f32x2_to_f16x2",
    """f32x2_to_f16x2(lo, hi) -> uint32: two float32 -> two halves packed in a uint32, round to nearest even.

    ``lo`` lands in bits 0..15 (the lower address). PTX ``cvt.rn.f16x2.f32 d, hi, lo``. sm_80+.
    """,
    "cvt.rn.f16x2.f32 $0, $2, $1;",
    results="b32",
    operands=("f32", "f32"),
)

f32x2_to_bf16x2 = _asm_intrinsic(
    "f32x2_to_bf16x2",
    """f32x2_to_bf16x2(lo, hi) -> uint32: two float32 -> two bfloat16 packed in a uint32, round to nearest even.

    ``lo`` lands in bits 0..15 (the lower address). PTX ``cvt.rn.bf16x2.f32 d, hi, lo``. sm_80+.
    """,
    "cvt.rn.bf16x2.f32 $0, $2, $1;",
    results="b32",
    operands=("f32", "f32"),
)


permute_bytes = _asm_intrinsic(
    "permute_bytes",
    """permute_bytes(a, b, selector) -> uint32: four of the eight bytes of ``b:a``, chosen by ``selector``.

    PTX ``prmt.b32 d, a, b, selector``: byte ``n`` of the result is byte ``selector >> 4n & 7`` of
    the eight (``a``'s bytes 0..3, ``b``'s 4..7). With :data:`LOW_HALVES` it pairs the first
    16-bit values of two words, with :data:`HIGH_HALVES` the second: one column of two rows of
    16-bit pairs, as an ``mma`` operand packs it. sm_20+.
    """,
    "prmt.b32 $0, $1, $2, $3;",
    results="b32",
    operands=("b32", "b32", "b32"),
)

#: :func:`permute_bytes` selector: bits 0..15 of ``a`` in bits 0..15, bits 0..15 of ``b`` in 16..31.
LOW_HALVES = 0x5410
#: :func:`permute_bytes` selector: bits 16..31 of ``a`` in bits 0..15, bits 16..31 of ``b`` in 16..31.
HIGH_HALVES = 0x7632

ex2_approx_ftz = _asm_intrinsic(
    "ex2_approx_ftz",
    """ex2_approx_ftz(x) -> float32: 2 ** x, one ``MUFU.EX2``.

    PTX ``ex2.approx.ftz.f32`` (relative error about 2 ** -22 where the result is normal): subnormal
    inputs and results flush to zero, so no range fix-up surrounds it (``math.exp2`` on a float32
    compiles to ``ex2.approx.f32``, which scales subnormal results in and out: four instructions
    more). exp2(0) is exactly 1; exp2 of a large negative number is 0. sm_20+.
    """,
    "ex2.approx.ftz.f32 $0, $1;",
    results="f32",
    operands=("f32",),
)


# --------------------------------------------------------------------------------------------
# Tensor cores
# --------------------------------------------------------------------------------------------


def _mma_m16n8k16(ptx_type: str, values: str):
    """The warp-wide ``mma.m16n8k16`` intrinsic on ``ptx_type`` (f16, bf16) operands, float32 accumulators."""
    name = f"mma_{ptx_type}_m16n8k16"
    instruction = f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32"
    doc = f"""{name}(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3) float32: D = A B + C on tensor cores.

    PTX ``{instruction}``, one warp: A is 16 x 16 and B
    16 x 8 {values} values, packed two to a uint32 (the lower column/row in bits 0..15), C and D 16 x
    8 float32. Lane ``4*g + t`` (``g`` = lane // 4, ``t`` = lane % 4) holds

    - ``a0`` A[g, 2t:2t+2], ``a1`` A[g+8, 2t:2t+2], ``a2`` A[g, 2t+8:2t+10], ``a3`` A[g+8, 2t+8:2t+10];
    - ``b0`` B[2t:2t+2, g], ``b1`` B[2t+8:2t+10, g];
    - ``c0, c1`` C[g, 2t], C[g, 2t+1]; ``c2, c3`` C[g+8, 2t], C[g+8, 2t+1] (and D the same).

    A sum over k has no order: any one-to-one map of the data's columns onto k serves, so long
    as A and B use the same one (a map that depends on ``t`` alone lets lane ``(g, t)`` bring
    eight consecutive columns of a row, one 16-byte load, for two calls). Every lane of the
    warp must call it (``.sync.aligned``). sm_80+.
    """
    text = f"{instruction} {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, {{$10, $11, $12, $13}};"
    return _asm_intrinsic(name, doc, text, results=("f32",) * 4, operands=("b32",) * 6 + ("f32",) * 4)


mma_f16_m16n8k16 = _mma_m16n8k16("f16", "IEEE half")
mma_bf16_m16n8k16 = _mma_m16n8k16("bf16", "bfloat16")


__all__ = [
    # special registers
    "cluster_rank",
    "cluster_size",
    "cluster_idx",
    "cluster_grid_dim",
    "block_idx_in_cluster",
    "cluster_dim",
    "is_explicit_cluster",
    "sm_id",
    "global_timer",
    "clock64",
    # barrier and fences
    "cluster_arrive_release",
    "cluster_arrive_relaxed",
    "cluster_wait_acquire",
    "cluster_sync",
    "fence_acq_rel_cluster",
    # failing a launch
    "trap",
    # programmatic dependent launch
    "grid_dependency_wait",
    "launch_dependents",
    # addresses
    "shared_address",
    "map_shared",
    # raw DSMEM access
    "ld_shared_cluster_u16",
    "ld_shared_cluster_i32",
    "ld_shared_cluster_u32",
    "ld_shared_cluster_i64",
    "ld_shared_cluster_u64",
    "ld_shared_cluster_f32",
    "ld_shared_cluster_f64",
    "ld_shared_cluster_v2_f32",
    "ld_shared_cluster_v4_f32",
    "ld_shared_cluster_v4_b32",
    "st_shared_cluster_u16",
    "st_shared_cluster_i32",
    "st_shared_cluster_u32",
    "st_shared_cluster_i64",
    "st_shared_cluster_u64",
    "st_shared_cluster_f32",
    "st_shared_cluster_f64",
    "st_shared_cluster_v2_f32",
    "st_shared_cluster_v4_f32",
    "st_shared_cluster_v4_b32",
    "red_add_shared_cluster_f32",
    "red_add_shared_cluster_f64",
    "red_add_shared_cluster_i32",
    "red_add_shared_cluster_u32",
    "red_add_shared_cluster_u64",
    "red_max_shared_cluster_i32",
    "red_max_shared_cluster_u32",
    "red_min_shared_cluster_i32",
    "red_min_shared_cluster_u32",
    "atom_add_shared_cluster_f32",
    "atom_add_shared_cluster_i32",
    "atom_add_shared_cluster_u32",
    # typed DSMEM layer
    "remote_load",
    "remote_store",
    "remote_load_v4_f32",
    "remote_store_v4_f32",
    "remote_add",
    "remote_max",
    "remote_min",
    # mbarrier
    "mbarrier_init",
    "fence_mbarrier_init_release_cluster",
    "mbarrier_arrive",
    "mbarrier_arrive_cluster",
    "mbarrier_arrive_expect_tx",
    "mbarrier_expect_tx",
    "mbarrier_try_wait_parity",
    "mbarrier_wait_parity",
    "mbarrier_wait_parity_cta",
    # copy engine
    "fence_proxy_async_shared_cta",
    "fence_proxy_async_global",
    "bulk_copy_shared_to_cluster",
    "bulk_copy_global_to_shared",
    "st_async_u32",
    "st_async_f32",
    "st_async_u64",
    "st_async_f64",
    "st_async_v2_f32",
    "st_async_v4_f32",
    "st_async_v4_b32",
    # global loads
    "ld_global_nc_v4",
    "ld_global_nc_v4_no_allocate",
    "ld_global_nc_v4_policy",
    "ld_relaxed_gpu_v4",
    "prefetch_l2_bulk",
    "cp_async_16",
    "cp_async_commit",
    "cp_async_wait",
    "ld_shared_v4_b32",
    "ld_shared_v4_f32",
    "st_shared_v4_f32",
    "l2_evict_first_policy",
    "l2_evict_last_policy",
    # conversions
    "f16_to_f32",
    "f32_to_f16",
    "bf16_to_f32",
    "f32_to_bf16",
    "f16x2_to_f32x2",
    "bf16x2_to_f32x2",
    "f32x2_to_f16x2",
    "f32x2_to_bf16x2",
    "permute_bytes",
    "ex2_approx_ftz",
    # tensor cores
    "mma_f16_m16n8k16",
    "mma_bf16_m16n8k16",
]
