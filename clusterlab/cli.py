"""clusterlab: ClusterReduce and ClusterGather on Hopper thread-block clusters, their DSMEM simulator, the fused
decode layers built on them, and their benchmarks.

    clusterlab info                          what GPU (if any) clusterlab can use, and versions
    clusterlab cache [--clear]               the compiled kernels kept on disk: where, how many, how large
    clusterlab tour                          ClusterReduce / ClusterGather over cluster sizes 1-16
    clusterlab trace reduce --cluster 8 --algorithm ring [--save ring.png]
                                             one primitive on the simulator, phase by phase
                                             (--save: the extension picks the format)
    clusterlab bench primitives [...]        microbenchmarks of the collectives (Hopper GPU)
    clusterlab bench fused [...]             the fused decode layer vs PyTorch and the floor (Hopper GPU)
    clusterlab bench decode [...]            whole models' time per token: fused vs unfused vs transformers
                                             vs the floor (Hopper GPU)
    clusterlab bench mlp [...]               the fused MLP block vs PyTorch and the floor, per layer (Hopper GPU)
    clusterlab generate --model DIR|PRESET --prompt-ids 1 2 3 [--prompt-ids ...] --max-new-tokens N
                                             decode a Llama / Mistral / Qwen2 checkpoint with the fused layer
                                             (the simulator without a Hopper GPU: tiny models only),
                                             or a preset's real shapes with random weights (Hopper GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .argtypes import Distinct, integer, number
from .errors import HopperRequired


def _info(args: argparse.Namespace) -> int:
    from .gpu import device_info
    from .kernel_cache import CACHE_DIR_ENV, cache_dir

    info = {**device_info(), "clusterlab": __version__}
    if info["gpu"] is not None and info["reason"] is None:  # GPCs hold whole clusters: some SMs stay out
        from .fused.plan import CLUSTER_SIZES, DeviceLimits

        sizes = "/".join(map(str, CLUSTER_SIZES))
        info[f"SMs clusters of {sizes} fill"] = "/".join(map(str, DeviceLimits.of(0).cluster_sms))
    info["kernel cache"] = cache_dir() or f"off (${CACHE_DIR_ENV} is empty)"
    if info["gpu"] is None:
        print(f"no CUDA GPU: simulator only ({info['reason']})")
    elif info["reason"] is not None:
        print(f"GPU found but unusable for clusters: {info['reason']}")
    width = max(map(len, info))
    for key, value in info.items():
        if key not in ("reason",) and value is not None:
            print(f"  {key:<{width}}  {value}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .kernel_cache import CACHE_DIR_ENV, cache_dir, clear, entries

    where = cache_dir()
    if where is None:
        print(f"kernel cache: off (${CACHE_DIR_ENV} is empty)")
        return 0
    if args.clear:
        removed, freed = clear(where)
        print(f"kernel cache: {where}: removed {removed} files, {freed / 1e6:.1f} MB")
        return 0
    files = entries(where)
    kernels = sum(path.suffix == ".nbc" for path in files)
    size = sum(path.stat().st_size for path in files)
    print(f"kernel cache: {where}: {kernels} compiled kernel{'' if kernels == 1 else 's'}, {size / 1e6:.1f} MB"
          + (" (clusterlab cache --clear removes them)" if files else ""))
    return 0


def _picture_path(text: str) -> Path:
    """An argparse ``type=`` for ``--save``: where to write the picture, checked before anything runs.

    The path must name a file (not a directory) whose extension is a format matplotlib writes
    (``.png``, ``.pdf``, ``.svg``, ...), in a directory that exists and is writable. The picture
    goes exactly there, in the format the extension names.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    if path.is_dir():
        example = str(path / "trace.png")
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name such as {example!r}")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().removeprefix(".") not in formats:
        found = f"got {path.suffix!r}" if path.suffix else "it has none"
        raise argparse.ArgumentTypeError(
            f"{text!r} must end in an extension naming the picture's format, one of "
            f"{', '.join('.' + f for f in formats)}; {found}"
        )
    directory = path.parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(directory)!r} is not writable")
    return path


def _trace(args: argparse.Namespace) -> int:
    from . import simulator
    from .simulator.inputs import check_choice
    from .tour import check_n_fits, random_rows

    algorithms = simulator.REDUCE_ALGORITHMS if args.primitive == "reduce" else simulator.GATHER_ALGORITHMS
    check_choice("--algorithm", args.algorithm, algorithms)
    if args.primitive == "gather" and args.op is not None:
        raise ValueError(f"--op {args.op} is the reduce's operator; a gather copies, it has none")
    check_n_fits("--n", args.n, args.primitive, args.algorithm, args.cluster, args.dtype)
    x = random_rows(np.random.default_rng(args.seed), args.cluster, args.n, args.dtype)
    if args.primitive == "reduce":
        _, trace = simulator.cluster_reduce(x, op=args.op or "sum", algorithm=args.algorithm)
    else:
        _, trace = simulator.cluster_gather(x, algorithm=args.algorithm)
    print(trace.phase_table())
    if args.save:
        picture_format = args.save.suffix.lower().removeprefix(".")
        trace.plot().savefig(args.save, format=picture_format, dpi=120, bbox_inches="tight")
        print(f"picture saved to {args.save}")
    return 0


def _tour(args: argparse.Namespace) -> int:
    from .tour import check_tour_fits, format_tour, run_tour

    check_tour_fits("--n", args.n, args.cluster, args.dtype)
    rows = run_tour(cluster_sizes=args.cluster, n=args.n, dtype=args.dtype, backend=args.backend, seed=args.seed)
    print(format_tour(rows))
    return 0 if all(row.ok for row in rows) else 1


def _bench(args: argparse.Namespace) -> int:
    from importlib import import_module

    return import_module(f"{__package__}.bench.{args.suite}").main(args.options, prog=f"clusterlab bench {args.suite}")


class _AppendPrompt(argparse.Action):
    """``--prompt-ids`` and ``--prompt`` into one list, in the order given: ``(const, value)`` pairs."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (self.const, values)])


def _generate(args: argparse.Namespace) -> int:
    import time

    from .gpu import hopper_problem
    from .models import MODEL_PRESETS, LlamaModel, ModelConfig, checkpoint_eos, random
    from .models.decode import check_sampling
    from .models.llama import cache_rows, check_prompts

    given = args.prompts or []  # (kind, value) in the order of the command line
    texts = [value for kind, value in given if kind == "text"]
    if not given:
        raise ValueError("give at least one prompt: --prompt-ids ID [ID ...] or --prompt TEXT")
    if args.top_k is not None and args.temperature == 0:
        raise ValueError(f"--top-k {args.top_k} samples, so it needs --temperature > 0 (0, the default, is greedy)")
    preset = not Path(args.model).is_dir()
    if preset and args.model not in MODEL_PRESETS:
        raise ValueError(f"--model {args.model!r} is neither a directory nor a preset ({', '.join(MODEL_PRESETS)})")
    if preset and texts:
        raise ValueError(f"--prompt needs a checkpoint's tokenizer.json; the preset {args.model!r} takes --prompt-ids")
    tokenizer = None
    if texts:
        tokenizer_path = Path(args.model) / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ValueError(f"--prompt needs {tokenizer_path}; give --prompt-ids instead")
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{tokenizer_path}: not a tokenizer the tokenizers library reads ({exc})") from None
        # each prompt whole and alone, as transformers encodes one text: the padding and truncation a saved
        # tokenizer.json may carry (for batches of one length) would change the prompt
        tokenizer.no_padding()
        tokenizer.no_truncation()
    prompts = []
    for i, (kind, value) in enumerate(given):
        try:
            ids = list(value) if kind == "ids" else tokenizer.encode(value).ids
        except Exception as exc:  # a bare Exception again, e.g. a WordLevel vocabulary without its [UNK]
            raise ValueError(f"prompt {i} (--prompt {value!r}): {tokenizer_path} cannot encode it ({exc})") from None
        if not ids:
            raise ValueError(f"prompt {i} (--prompt {value!r}) encodes to no tokens")
        prompts.append(ids)
    # everything the run needs checked before any weight is drawn or read
    config = MODEL_PRESETS[args.model] if preset else ModelConfig.from_pretrained(args.model)
    check_prompts(prompts, config.vocab_size)
    try:
        eos = [] if args.ignore_eos or preset else checkpoint_eos(args.model, config.vocab_size)
    except ValueError as exc:
        raise ValueError(f"{exc}; --ignore-eos decodes without it") from None
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, eos, args.seed, config.vocab_size)
    cache_rows(prompts, args.max_new_tokens)
    problem = hopper_problem()
    device = "cpu" if problem is not None else "cuda"
    if preset:
        if problem is not None:
            raise HopperRequired(f"the preset {args.model!r} (random weights in its real shapes) needs a Hopper GPU; "
                                 f"the simulator runs tiny checkpoints only: {problem}")
        import torch

        print(f"{args.model}: random weights in the real shapes (its tokens mean nothing)")
        model = random(args.model, getattr(torch, args.dtype or "float16"), device, seed=0)
    else:
        model = LlamaModel.from_pretrained(args.model, dtype=args.dtype, device=device)
    if model.on_simulator:
        print(f"attention runs on the DSMEM simulator (no Hopper GPU: {problem}): slow, tiny models only")
    start = time.perf_counter()
    new = model.generate(prompts, args.max_new_tokens, eos_token_id=eos or None, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed)
    elapsed = time.perf_counter() - start
    for i, ids in enumerate(new):
        print(f"prompt {i}: {' '.join(map(str, ids))}")
        if tokenizer is not None:
            unknown = [token for token in ids if tokenizer.id_to_token(token) is None]
            left_out = f" (ids the tokenizer lacks, left out: {' '.join(map(str, unknown))})" if unknown else ""
            print(f"  text: {tokenizer.decode(ids, skip_special_tokens=False)!r}{left_out}")  # an eos shown too
    stats, tokens = model.last_stats, sum(map(len, new))
    print(f"{tokens} new token{'s' * (tokens != 1)} in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s "
          f"(prefill {stats['prefill_s']:.2f} s, {stats['decode_steps']} decode steps in {stats['decode_s']:.2f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import simulator

    parser = argparse.ArgumentParser(prog="clusterlab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"clusterlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="the GPU clusterlab can use (or why none), and versions")
    info.set_defaults(run=_info)

    cache = commands.add_parser(
        "cache", help="the compiled kernels kept on disk between processes: where, how many, how large"
    )
    cache.add_argument("--clear", action="store_true", help="remove them (each is compiled again when next needed)")
    cache.set_defaults(run=_cache)

    tour = commands.add_parser(
        "tour",
        help="ClusterReduce and ClusterGather over cluster sizes 1-16: on the GPU checked bit for bit "
        "against the simulator, else on the simulator checked against NumPy",
    )
    cluster_size = integer(1, simulator.MAX_CLUSTER_SIZE)
    elements = integer(1)
    seed = integer(0, 2**63 - 1)  # as the benchmarks' --seed
    tour.add_argument("--cluster", type=cluster_size, nargs="+", action=Distinct, default=list(range(1, 17)),
                      help="cluster sizes (1-16)")
    tour.add_argument("--n", type=elements, default=1024, help="elements per block (default 1024)")
    tour.add_argument("--dtype", default="float32", choices=simulator.DTYPES)
    tour.add_argument("--backend", default="auto", choices=("auto", "gpu", "simulator"))
    tour.add_argument("--seed", type=seed, default=None, help="seed of the random rows (0 .. 2**63 - 1)")
    tour.set_defaults(run=_tour)

    trace = commands.add_parser("trace", help="run one primitive on the simulator and show its data movement")
    trace.add_argument("primitive", choices=("reduce", "gather"))
    trace.add_argument("--cluster", type=cluster_size, default=8, help="cluster size (1-16)")
    trace.add_argument(
        "--algorithm", default="ring",
        help=f"reduce: {', '.join(simulator.REDUCE_ALGORITHMS)}; gather: {', '.join(simulator.GATHER_ALGORITHMS)}",
    )
    trace.add_argument("--op", choices=simulator.OPS, help="reduce only (default: sum)")
    trace.add_argument("--n", type=elements, default=64, help="elements per block (at most what fits in shared memory)")
    trace.add_argument("--dtype", default="float32", choices=simulator.DTYPES)
    trace.add_argument("--seed", type=seed, default=None, help="seed of the random rows (0 .. 2**63 - 1)")
    trace.add_argument(
        "--save", metavar="PATH", type=_picture_path,
        help="save the per-phase picture to PATH, in the format its extension names (.png, .pdf, .svg, ...)",
    )
    trace.set_defaults(run=_trace)

    bench = commands.add_parser(
        "bench",
        help="benchmarks on a Hopper GPU; results as a table, JSON and PNG under benchmarks/results/",
        description="Options after the suite name go to it: clusterlab bench primitives --help",
    )
    bench.add_argument("suite", choices=("primitives", "fused", "decode", "mlp"))
    options = bench.add_argument("options", nargs=argparse.REMAINDER, help="the suite's own options")
    options.required = False  # none is a suite's defaults; argparse would name it beside a missing suite
    bench.set_defaults(run=_bench)

    generate = commands.add_parser(
        "generate",
        help="decode a Llama / Mistral / Qwen2 checkpoint (safetensors) with the fused attention layer; "
        "on the simulator without a Hopper GPU",
    )
    generate.add_argument("--model", required=True, metavar="DIR|PRESET",
                          help="Hugging Face model directory, or a preset of clusterlab bench decode (random weights "
                          "in its real shapes, float16 unless --dtype; a Hopper GPU)")
    generate.add_argument("--prompt-ids", type=integer(0), nargs="+", action=_AppendPrompt, dest="prompts",
                          const="ids", metavar="ID",
                          help="one prompt as token ids; repeat for a batch (at most 8 prompts in all, numbered in "
                          "the order given with --prompt)")
    generate.add_argument("--prompt", action=_AppendPrompt, dest="prompts", const="text", metavar="TEXT",
                          help="one prompt as text, encoded with DIR/tokenizer.json; repeatable")
    generate.add_argument("--max-new-tokens", type=integer(1), default=16, help="default 16")
    generate.add_argument("--dtype", choices=("float16", "bfloat16"), default=None,
                          help="default: the checkpoint's own if float16/bfloat16, else bfloat16 (a preset: float16)")
    generate.add_argument("--temperature", type=number(0), default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-k", type=integer(1), default=None, help="sample among the K likeliest tokens")
    generate.add_argument("--seed", type=seed, default=None, help="seed of the sampling (0 .. 2**63 - 1)")
    generate.add_argument("--ignore-eos", action="store_true",
                          help="do not stop at the checkpoint's eos_token_id (generation_config.json / config.json)")
    generate.set_defaults(run=_generate)
    return parser


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints a warning as one line naming the command, not the source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"clusterlab {command}: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return args.run(args)
    except KeyboardInterrupt:
        print(f"clusterlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except HopperRequired as exc:
        print(f"clusterlab {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"clusterlab {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"clusterlab {args.command}: {exc}", file=sys.stderr)
        return 1
