"""``algorithm="auto"``: the committed table is the committed H200 results' choice, and lookups follow it."""

import json
from pathlib import Path

import pytest

from clusterlab import simulator
from clusterlab.bench import report
from clusterlab.primitives import auto
from clusterlab.primitives.gather import gather_shared_bytes
from clusterlab.primitives.reduce import reduce_shared_bytes

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "primitives_h200.json"


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_tables_are_the_committed_results_choice(results):
    assert auto.SOURCE["card"] == results["system"]["gpu"] and "H200" in auto.SOURCE["card"]
    assert auto.SOURCE["date"] == results["date"] and auto.SOURCE["commit"] == results["commit"]
    assert auto.SOURCE["results"] == "benchmarks/results/primitives_h200.json"
    choice = report.choice_tables(results)
    # Every algorithm was measured: auto ranks them as the run did.
    assert set(results["choice"]["reduce"][0]["ranking"]) == set(simulator.REDUCE_ALGORITHMS)
    assert choice["reduce"] == results["choice"]["reduce"]
    assert choice["gather"] == results["choice"]["gather"]
    assert {
        size: tuple((r["working_bytes"], tuple(r["ranking"])) for r in choice["reduce"] if r["cluster_size"] == size)
        for size in results["settings"]["cluster_sizes"]
    } == auto.REDUCE_RANKING
    for itemsize, table in auto.GATHER_RANKING.items():
        for size, rows in table.items():
            want = tuple((r["message_bytes"], tuple(r["ranking"])) for r in choice["gather"]
                         if r["itemsize"] == itemsize and r["cluster_size"] == size)
            assert rows == want


def test_every_ranking_names_every_algorithm():
    for rows in auto.REDUCE_RANKING.values():
        assert all(sorted(ranking) == sorted(simulator.REDUCE_ALGORITHMS) for _, ranking in rows)
    for table in auto.GATHER_RANKING.values():
        for rows in table.values():
            assert all(sorted(ranking) == sorted(simulator.GATHER_ALGORITHMS) for _, ranking in rows)


def test_a_measured_point_returns_its_fastest_algorithm():
    size = 8
    for nbytes, ranking in auto.REDUCE_RANKING[size]:
        n = nbytes // 4
        fits = [a for a in ranking if reduce_shared_bytes(a, n, size)
                <= simulator.MAX_SMEM_BYTES_PER_BLOCK]
        assert auto.choose_reduce_algorithm(size, nbytes) == fits[0]
    for nbytes, ranking in auto.GATHER_RANKING[2][4]:
        assert auto.choose_gather_algorithm(4, nbytes, itemsize=2) == ranking[0]


def test_unmeasured_sizes_use_the_nearest_measured_point():
    rows = dict(auto.REDUCE_RANKING[4])
    assert auto.choose_reduce_algorithm(4, 1100) == rows[1024][0]  # nearer 1 KiB than 2 KiB on a log scale
    assert auto.choose_reduce_algorithm(4, 1 << 30) == auto.choose_reduce_algorithm(4, max(rows))
    assert auto.choose_reduce_algorithm(5, 1024) == auto.choose_reduce_algorithm(6, 1024)  # tie -> larger
    assert auto.choose_reduce_algorithm(7, 64) == auto.choose_reduce_algorithm(8, 64)


def test_the_choice_always_fits_in_shared_memory_when_something_does():
    for size in range(1, 17):
        for nbytes in (64, 4096, 65536, 200_000):
            n = nbytes // 4
            algorithm = auto.choose_reduce_algorithm(size, nbytes)
            fits = {a for a in simulator.REDUCE_ALGORITHMS
                    if reduce_shared_bytes(a, n, size) <= simulator.MAX_SMEM_BYTES_PER_BLOCK}
            assert algorithm in fits or not fits
            gathered = auto.choose_gather_algorithm(size, nbytes, itemsize=4)
            room = {a for a in simulator.GATHER_ALGORITHMS
                    if gather_shared_bytes(a, n, size, 4) <= simulator.MAX_SMEM_BYTES_PER_BLOCK}
            assert gathered in room or not room


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="cluster_size"):
        auto.choose_reduce_algorithm(17, 1024)
    with pytest.raises(ValueError, match="n_bytes"):
        auto.choose_gather_algorithm(4, 0)
    with pytest.raises(ValueError, match="itemsize"):
        auto.choose_gather_algorithm(4, 1024, itemsize=8)
