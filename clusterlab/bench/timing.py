"""Timing, statistics, run records and settings checks shared by clusterlab's benchmarks.

Method (every benchmark of clusterlab follows it):

- device time only, from CUDA events; each timed region is queued behind a short spin kernel
  (``torch.cuda._sleep``) so that the host's submission time never lands between the events;
- a warm-up before the first timed run (compilation, module load, first-touch);
- at least 5 repeats; a figure is their median, reported with its min-max spread (:class:`Stat`);
- per-operation costs come from a *slope*: the same kernel run with ``R`` and ``2R`` operations,
  ``(t(2R) - t(R)) / R``, which cancels launch latency, staging and exit (:func:`per_op_us`);
- single-launch latency is one replay of a CUDA graph holding the launch (:func:`graph_launch_us`).

Every timer raises :class:`clusterlab.HopperRequired` before it touches CUDA where no Hopper GPU
is usable.

Each run record carries the card, driver, the clocks seen during the run (:class:`ClockSampler`),
the commit (``$CLUSTERLAB_COMMIT``, else git's HEAD, ``-dirty`` where the tree differs: :func:`commit`)
and the date.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..gpu import require_hopper

#: Fewest repeats any figure is the median of.
MIN_REPEATS = 5
#: GPU clock cycles the spin kernel queued before each timed region runs (about 50 us): long
#: enough for the host to submit the events and the work behind it.
SPIN_CYCLES = 100_000
#: Seconds of copying before :func:`copy_bandwidth` times its copies. Two copies were not enough on a
#: GPU idle until then: a fresh H200 measured 4.09 TB/s as a process's first work, where a process
#: minutes later on the same card measured 4.24 (and the fused kernels timed the same in both).
COPY_WARMUP_S = 0.5


@dataclass(frozen=True)
class Stat:
    """A figure over repeats: the median and the min-max spread of ``repeats`` values."""

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, values) -> Stat:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Stat.of needs at least one value")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Stat:
        """Every value times ``factor`` (a negative factor swaps min and max)."""
        low, high = sorted((self.min * factor, self.max * factor))
        return Stat(self.median * factor, low, high, self.repeats)

    def inverse(self, numerator: float) -> Stat:
        """``numerator / value`` of every value: times to rates; the spread's ends swap."""
        low, high = sorted((numerator / self.max, numerator / self.min))
        return Stat(numerator / self.median, low, high, self.repeats)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Stat:
        return cls(float(data["median"]), float(data["min"]), float(data["max"]), int(data["repeats"]))

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.min:.3g}-{self.max:.3g}]"


def slope(t_single: float, t_double: float, count: int) -> float:
    """Cost of one unit from two timings: ``count`` units took ``t_single``, ``2 * count`` ``t_double``."""
    if count < 1:
        raise ValueError(f"count={count}: need at least one unit")
    return (t_double - t_single) / count


def event_time_us(enqueue, prepare=None) -> float:
    """Device time in µs of the work ``enqueue()`` puts on torch's current stream.

    ``prepare()`` (optional) is enqueued before the start event, untimed (e.g. zeroing a counter).
    A spin kernel runs first so the whole region is queued before the GPU reaches the start event.
    Synchronises; a failed launch raises here, not later.
    """
    require_hopper()
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if prepare is not None:
        prepare()
    torch.cuda._sleep(SPIN_CYCLES)
    start.record()
    enqueue()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1e3


def per_op_us(run, count: int, repeats: int = MIN_REPEATS, prepare=None, warmup: int = 1) -> Stat:
    """Per-operation µs of ``run(k)`` (enqueue ``k`` operations), from the slope between k=count and 2*count.

    Each repeat times ``run(count)`` then ``run(2 * count)``; the Stat is over the repeats' slopes.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: at least {MIN_REPEATS}")
    for _ in range(warmup):
        event_time_us(lambda: run(2 * count), prepare)
    slopes = []
    for _ in range(repeats):
        single = event_time_us(lambda: run(count), prepare)
        double = event_time_us(lambda: run(2 * count), prepare)
        slopes.append(slope(single, double, count))
    return Stat.of(slopes)


def calibrate_count(run, target_us: float, first: int = 64, low: int = 16, high: int = 1 << 16, prepare=None) -> int:
    """Operations per timed run so that ``run(count)`` takes about ``target_us`` (one trial of ``first``)."""
    trial = event_time_us(lambda: run(first), prepare)
    estimate = max(trial / first, 1e-3)
    return int(min(high, max(low, round(target_us / estimate))))


def capture_graph(step, count: int = 1):
    """A CUDA graph of ``count`` back-to-back ``step()`` calls (``step`` must have run once already).

    Captured on a side stream with ``CUDAGraph.capture_begin`` / ``capture_end`` directly:
    ``torch.cuda.graph`` would also synchronise and empty torch's allocator cache on every
    capture, which thousands of captures in one sweep cannot afford.
    """
    require_hopper()
    import torch

    graph = torch.cuda.CUDAGraph()
    stream = _capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for _ in range(count):
                step()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


@functools.cache
def _capture_stream():
    import torch

    return torch.cuda.Stream()


def graph_launch_us(step, repeats: int = MIN_REPEATS, warmup: int = 3) -> Stat:
    """Single-launch latency in µs: one replay of a graph holding ``step()``, timed alone, ``repeats`` times."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: at least {MIN_REPEATS}")
    graph = capture_graph(step)
    for _ in range(warmup):
        graph.replay()
    return Stat.of([event_time_us(graph.replay) for _ in range(repeats)])


def graph_per_op_us(step, count: int = 32, repeats: int = MIN_REPEATS) -> Stat:
    """Per-step µs inside CUDA graphs of ``count`` and ``2 * count`` back-to-back ``step()`` calls (slope).

    Both graphs are replayed once before timing: a graph's first replay also uploads it.
    """
    single, double = capture_graph(step, count), capture_graph(step, 2 * count)
    single.replay()
    double.replay()
    return per_op_us(lambda k: (single if k == count else double).replay(), count, repeats)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> Stat:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written) of ``Tensor.copy_``,
    timed after :data:`COPY_WARMUP_S` of the same copy."""
    require_hopper()
    import torch

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    warm_until = time.perf_counter() + COPY_WARMUP_S
    while time.perf_counter() < warm_until:
        dst.copy_(src)
        torch.cuda.synchronize()
    times = Stat.of([event_time_us(lambda: dst.copy_(src)) for _ in range(max(repeats, MIN_REPEATS))])
    return times.inverse(2 * nbytes * 1e6)


# --------------------------------------------------------------------------------------------
# What the run ran on
# --------------------------------------------------------------------------------------------

#: nvidia-smi fields sampled during a run (names as ``nvidia-smi --help-query-gpu`` lists them).
SMI_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "temperature.gpu", "power.draw", "pstate")


def _smi(fields) -> list[str] | None:
    """One nvidia-smi query of GPU 0, or None where nvidia-smi is missing or fails."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [item.strip() for item in done.stdout.strip().splitlines()[0].split(",")]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


class ClockSampler:
    """GPU 0's clocks, temperature and power from nvidia-smi, sampled between measurements.

    Call :meth:`sample` between timed regions (it queries at most once per ``period_s``), never
    from a thread running beside them: an nvidia-smi query goes through the driver and can stall
    the GPU for a moment, which would land inside a timing. ``summary()`` gives min / median / max
    per numeric field over the samples and the P-states seen; an empty dict where nvidia-smi is
    unavailable.
    """

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.samples: list[list[str]] = []
        self._last = -math.inf
        self._available = True

    def sample(self) -> None:
        now = time.monotonic()
        if not self._available or now - self._last < self.period_s:
            return
        self._last = now
        sample = _smi(SMI_FIELDS)
        if sample is None:
            self._available = False
        else:
            self.samples.append(sample)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        out: dict = {"samples": len(self.samples)}
        for index, field in enumerate(SMI_FIELDS):
            column = [sample[index] for sample in self.samples]
            numbers = [v for v in map(_number, column) if v is not None]
            if numbers:
                out[field] = Stat.of(numbers).as_dict()
            else:
                out[field] = sorted(set(column))
        return out


def measure_card(tag: str | None) -> tuple[dict, str, float]:
    """The card a benchmark runs on, read before its first timing: :func:`clusterlab.gpu.device_info`'s
    dict, the results files' tag (``tag``, or the card's: :func:`card_tag`) and the copy bandwidth measured
    now (bytes/s, :func:`copy_bandwidth`), printed as the run's first line. HopperRequired off Hopper."""
    from ..gpu import device_info, require_hopper  # looked up at the call: tests stand in for them

    require_hopper()
    info = device_info()
    tag = card_tag(info["gpu"]) if tag is None else tag
    bandwidth = copy_bandwidth().median
    print(f"{info['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), L2 {info['l2_bytes'] >> 20} MiB",
          flush=True)
    return info, tag, bandwidth


def card_tag(name: str | None) -> str:
    """A results-file suffix naming the card: ``"NVIDIA H200"`` -> ``"h200"``, ``"NVIDIA H100 80GB HBM3"``
    -> ``"h100"``; the lower-cased name with spaces as ``_`` where no model number stands in it."""
    if not name:
        raise ValueError("card_tag needs the card's name (device_info()['gpu']), got none")
    for word in name.split():
        if re.fullmatch(r"[A-Z]{1,2}\d{2,4}[A-Za-z]*", word):
            return word.lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def commit(source: str | os.PathLike = __file__) -> str:
    """The source commit: ``$CLUSTERLAB_COMMIT`` (set it where the tree has no .git), else the HEAD of
    the git work tree that tracks ``source`` (default: this module), with ``-dirty`` appended where its
    tracked files differ from HEAD, so that a record never names a commit that did not run; "unknown"
    where no work tree tracks it (an installed copy, also one in another project's virtual environment)."""
    if os.environ.get("CLUSTERLAB_COMMIT"):
        return os.environ["CLUSTERLAB_COMMIT"]
    where, name = os.path.split(os.path.abspath(source))

    def git(*args: str):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30, check=False)

    try:
        if git("ls-files", "--error-unmatch", name).returncode != 0:
            return "unknown"
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.returncode != 0 or status.stdout.strip() else "")


def short_commit(commit: str, digits: int = 7) -> str:
    """``commit`` (as :func:`commit` records it) cut to ``digits`` hex digits for a figure's title,
    ``-dirty`` kept."""
    return commit[:digits] + ("-dirty" if commit.endswith("-dirty") else "")


def driver_release() -> str | None:
    """The NVIDIA driver's release as nvidia-smi reports it (e.g. ``"580.159.04"``), None without nvidia-smi."""
    smi = _smi(("driver_version",))
    return smi[0] if smi else None


def system_info() -> dict:
    """Card, compute capability, SM count, driver, CUDA and package versions of this process's GPU 0."""
    import torch

    from ..gpu import device_info

    info = {k: v for k, v in device_info().items() if k != "reason"}
    info["driver_version"] = driver_release()
    info["torch_cuda"] = torch.version.cuda
    return info


def results_header(info: dict, packages=("numba-cuda", "cuda-core", "torch")) -> dict:
    """The first fields of a benchmark's results file: ``card``, ``driver`` (release), ``driver_cuda_version``,
    ``software`` (the versions of ``packages``), UTC ``date`` and ``commit``. ``info``:
    :func:`clusterlab.gpu.device_info`'s dict."""
    return {
        "card": info.get("gpu"),
        "driver": driver_release(),
        "driver_cuda_version": info.get("driver_cuda_version"),
        "software": {k: info.get(k) for k in packages},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
    }


def run_record(clocks: ClockSampler) -> dict:
    """The header of a results file: system, clocks seen, commit and UTC date."""
    return {
        "system": system_info(),
        "clocks_seen": clocks.summary(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def writable_dir(path: str | os.PathLike, parameter: str = "out_dir") -> Path:
    """``path``, checked before a run spends GPU time whose results it would then fail to write: a
    directory this process may write into, or one it may create (its nearest existing ancestor is such
    a directory). ValueError naming it (as ``parameter``) otherwise; nothing is created here."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not writable by this process" if existing.is_dir() else "not a directory"
        raise ValueError(f"{parameter} {str(path)!r} is not a directory results can be written into: "
                         f"{str(existing)!r} is {why}")
    return path


def check_settings_list(name: str, values, allowed: str, ok) -> list:
    """``values`` (a run's presets, batches, lengths or dtypes) as a list, checked before a run
    spends GPU time on the first of them: a non-empty sequence, not a string, whose every entry
    passes ``ok``. ValueError naming ``name``, what is ``allowed`` and ``values`` otherwise."""

    def passes(value) -> bool:
        try:
            return bool(ok(value))
        except TypeError:  # an entry ok cannot even compare, such as a list where a name belongs
            return False

    try:
        listed = None if isinstance(values, (str, bytes)) else list(values)
    except TypeError:  # not a sequence at all
        listed = None
    if not listed or not all(map(passes, listed)):
        raise ValueError(f"{name} must be {allowed}, got {(values if listed is None else listed)!r}")
    return listed


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
