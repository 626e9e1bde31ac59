"""The benchmarks' timing arithmetic and run records, without a GPU."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

from clusterlab.bench import timing


def test_stat_is_median_and_spread():
    stat = timing.Stat.of([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (stat.median, stat.min, stat.max, stat.repeats) == (3.0, 1.0, 10.0, 5)
    assert timing.Stat.from_dict(json.loads(json.dumps(stat.as_dict()))) == stat
    assert timing.Stat.of([1, 2, 3, 10]).median == 2.5  # an even count: the mean of the middle two
    with pytest.raises(ValueError):
        timing.Stat.of([])


def test_rates_from_times_swap_the_spread():
    times_us = timing.Stat(2.0, 1.0, 4.0, 5)
    rate = times_us.inverse(8e6)  # 8 bytes per op -> bytes/s
    assert rate.median == pytest.approx(4e6)
    assert (rate.min, rate.max) == (pytest.approx(2e6), pytest.approx(8e6))
    assert times_us.scaled(1e3) == timing.Stat(2e3, 1e3, 4e3, 5)


def test_slope_cancels_the_fixed_cost():
    fixed, per_op = 7.5, 0.42
    count = 100
    assert timing.slope(fixed + count * per_op, fixed + 2 * count * per_op, count) == pytest.approx(per_op)
    with pytest.raises(ValueError):
        timing.slope(1.0, 2.0, 0)


class FakeClock:
    """Stands in for ``timing.event_time_us``: ``run(k)`` takes ``fixed + k * per_op`` µs, plus ``extra[i]`` on the
    i-th timed region (a slow repeat); remembers each region's ``k``."""

    def __init__(self, fixed, per_op, extra=()):
        self.fixed, self.per_op, self.extra, self.counts = fixed, per_op, dict(extra), []

    def run(self, k):
        self.counts.append(k)

    def __call__(self, enqueue, prepare=None):
        enqueue()
        return self.fixed + self.counts[-1] * self.per_op + self.extra.get(len(self.counts) - 1, 0.0)


def test_per_op_us_is_the_median_slope_between_count_and_twice_count(monkeypatch):
    """One warm-up of 2 x count, then per repeat count and 2 x count; the figure is the median slope, so the launch's
    fixed cost cancels and one slow repeat moves only the max."""
    clock = FakeClock(fixed=7.5, per_op=0.25, extra={4: 100.0})  # region 4: the second repeat's 2 x count
    monkeypatch.setattr(timing, "event_time_us", clock)
    stat = timing.per_op_us(clock.run, 8, repeats=5)
    assert clock.counts == [16] + [8, 16] * 5
    assert stat == timing.Stat(0.25, 0.25, 0.25 + 100.0 / 8, 5)


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    """A copy of ``nbytes`` reads and writes them: 2 x nbytes over the median time of the timed copies."""
    copies = []

    class Tensor:
        def __init__(self, numel):
            self.numel = numel

        def copy_(self, src):
            copies.append(src.numel)

    fake_torch = types.SimpleNamespace(randn=lambda numel, device: Tensor(numel), empty_like=lambda t: Tensor(t.numel),
                                       cuda=types.SimpleNamespace(synchronize=lambda: None))
    times_us = iter([2.0, 4.0, 1.0, 2.0, 8.0])

    def fake_event_time_us(enqueue, prepare=None):
        enqueue()
        return next(times_us)

    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(timing, "require_hopper", lambda: None)
    monkeypatch.setattr(timing, "COPY_WARMUP_S", 0.0)
    monkeypatch.setattr(timing, "event_time_us", fake_event_time_us)
    bandwidth = timing.copy_bandwidth(nbytes=4096, repeats=5)
    assert copies[-5:] == [1024] * 5  # float32 elements
    per_us = 2 * 4096 * 1e6  # bytes read + written, over µs, in bytes/s
    assert bandwidth == timing.Stat(per_us / 2.0, per_us / 8.0, per_us / 1.0, 5)  # median, min, max of 2, 8, 1 µs


def test_fewer_than_five_repeats_are_refused():
    with pytest.raises(ValueError, match="at least 5"):
        timing.per_op_us(lambda k: None, 10, repeats=4)
    with pytest.raises(ValueError, match="at least 5"):
        timing.graph_launch_us(lambda: None, repeats=3)


def test_clock_summary_of_samples():
    sampler = timing.ClockSampler()
    sampler.samples = [
        ["1755", "2619", "1980", "2619", "40", "120.5", "P0"],
        ["1980", "2619", "1980", "2619", "45", "[N/A]", "P0"],
        ["1800", "2619", "1980", "2619", "44", "300.0", "P0"],
    ]
    summary = sampler.summary()
    assert summary["samples"] == 3
    assert summary["clocks.sm"] == {"median": 1800.0, "min": 1755.0, "max": 1980.0, "repeats": 3}
    assert summary["power.draw"]["repeats"] == 2  # "[N/A]" is not a number
    assert summary["pstate"] == ["P0"]
    assert timing.ClockSampler().summary() == {}


def test_commit_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_COMMIT", "abc123")
    assert timing.commit() == "abc123"


def test_commit_is_marked_dirty_where_tracked_files_differ_from_it(monkeypatch, tmp_path):
    """A record names HEAD only for the tree HEAD holds: a changed tracked file appends ``-dirty``, an
    untracked one does not; a source no work tree tracks (outside one, or untracked inside one, as an
    installed copy in another project's virtual environment) has the commit ``unknown``."""
    import subprocess

    monkeypatch.delenv("CLUSTERLAB_COMMIT", raising=False)
    source, installed = tmp_path / "kernel.py", tmp_path / ".venv" / "kernel.py"
    source.write_text("x = 1\n")
    assert timing.commit(source) == "unknown"

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", "kernel.py")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert timing.commit(source) == head
    installed.parent.mkdir()
    installed.write_text("x = 1\n")
    assert timing.commit(installed) == "unknown"
    assert timing.commit(source) == head  # untracked files leave it clean
    source.write_text("x = 2\n")
    assert timing.commit(source) == head + "-dirty"
    assert (timing.short_commit(head), timing.short_commit(head + "-dirty")) == (head[:7], head[:7] + "-dirty")
    assert timing.commit().removesuffix("-dirty") in ("unknown", subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(timing.__file__).parent, capture_output=True, text=True).stdout.strip())


def test_writable_dir_refuses_a_directory_this_process_cannot_write(monkeypatch, tmp_path):
    """A directory os.access says this process may not write into is refused, itself or as the nearest existing
    ancestor of one that would be created."""
    assert timing.writable_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    monkeypatch.setattr(timing.os, "access", lambda path, mode: False)
    for path in (tmp_path, tmp_path / "new" / "dir"):
        with pytest.raises(ValueError, match=rf"out_dir '{re.escape(str(path))}' .*'{re.escape(str(tmp_path))}' is not "
                                             "writable by this process"):
            timing.writable_dir(path)


def test_write_json_creates_parents(tmp_path):
    path = timing.write_json({"a": [1, 2]}, tmp_path / "x" / "r.json")
    assert json.loads(path.read_text()) == {"a": [1, 2]}


def test_clock_sampler_queries_at_most_once_per_period(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "_smi", lambda fields: calls.append(fields) or ["1980"] * len(fields))
    sampler = timing.ClockSampler(period_s=3600)
    for _ in range(5):
        sampler.sample()
    assert len(calls) == 1 and len(sampler.samples) == 1


@pytest.mark.parametrize(
    "name, tag",
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200 NVL", "h200"),
     ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090")],
)
def test_results_are_tagged_with_the_cards_model(name, tag):
    assert timing.card_tag(name) == tag


def test_a_card_without_a_name_is_an_error():
    with pytest.raises(ValueError, match="card_tag needs the card's name"):
        timing.card_tag(None)


def test_results_header_names_the_card_the_driver_the_date_and_the_commit(monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_COMMIT", "0123abc")
    monkeypatch.setattr(timing, "_smi", lambda fields: ["580.159.04"] if tuple(fields) == ("driver_version",) else None)
    info = {"gpu": "NVIDIA H200", "driver_cuda_version": "13.0", "torch": "2.11.0", "numba-cuda": "0.30.4"}
    head = timing.results_header(info, ("torch", "transformers"))
    assert head.pop("date").endswith("+00:00")
    assert head == {"card": "NVIDIA H200", "driver": "580.159.04", "driver_cuda_version": "13.0",
                    "software": {"torch": "2.11.0", "transformers": None}, "commit": "0123abc"}
    monkeypatch.setattr(timing, "_smi", lambda fields: None)  # no nvidia-smi
    assert timing.results_header(info)["driver"] is None
