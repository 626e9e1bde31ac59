"""The clusterlab command: every subcommand on a machine without a GPU."""

import os
import subprocess
import sys

import pytest

import clusterlab
from clusterlab import simulator
from clusterlab.cli import main
from clusterlab.gpu import hopper_problem

no_gpu = pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")


def test_entry_point_runs_as_a_module():
    env = dict(os.environ, CLUSTERLAB_CACHE_DIR="/tmp/kernels here")
    done = subprocess.run([sys.executable, "-m", "clusterlab", "info"], capture_output=True, text=True, check=True,
                          env=env)
    assert "numba-cuda" in done.stdout
    assert "kernel cache" in done.stdout and "/tmp/kernels here" in done.stdout
    assert f"clusterlab     {clusterlab.__version__}" in done.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"clusterlab {clusterlab.__version__}\n"


def test_cache_shows_the_kept_kernels_and_clears_them(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path))
    assert main(["cache"]) == 0
    assert capsys.readouterr().out == f"kernel cache: {tmp_path}: 0 compiled kernels, 0.0 MB\n"
    for name, size in (("clusterlab.fused_decode_attention-ab12.py312.nbi", 1000),
                       ("clusterlab.fused_decode_attention-ab12.py312.0.nbc", 2_500_000), ("other.txt", 3)):
        (tmp_path / name).write_bytes(os.urandom(size))
    assert main(["cache"]) == 0
    assert "1 compiled kernel, 2.5 MB (clusterlab cache --clear removes them)" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out == f"kernel cache: {tmp_path}: removed 2 files, 2.5 MB\n"
    assert [p.name for p in tmp_path.iterdir()] == ["other.txt"]
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", "")
    assert main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out == "kernel cache: off ($CLUSTERLAB_CACHE_DIR is empty)\n"


def test_options_of_several_values_keep_each_value_once():
    import argparse

    from clusterlab.argtypes import Distinct, integer

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", nargs="+", action=Distinct, type=integer(1), default=[1])
    assert parser.parse_args(["--batch", "4", "1", "8", "4", "1"]).batch == [4, 1, 8]
    assert parser.parse_args([]).batch == [1]


@pytest.mark.gpu
def test_info_names_the_sms_each_cluster_size_fills(capsys):
    from clusterlab.launch import cluster_sms

    assert main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "SMs clusters of 1/2/4/8/16 fill" in line)
    assert line.split()[-1] == "/".join(str(cluster_sms(size)) for size in (1, 2, 4, 8, 16))


@no_gpu
def test_info_without_gpu_says_simulator_only(capsys):
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith("no CUDA GPU: simulator only")


def test_trace_prints_phases_and_saves_the_picture(tmp_path, capsys):
    picture = tmp_path / "ring.png"
    assert main(["trace", "reduce", "--cluster", "5", "--algorithm", "ring", "--n", "7", "--save", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "reduce-scatter 3" in out and "all-gather 3" in out
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"


def test_trace_gather(capsys):
    assert main(["trace", "gather", "--cluster", "3", "--algorithm", "bulk", "--n", "5", "--dtype", "float16"]) == 0
    assert "cp.async.bulk" in capsys.readouterr().out


@no_gpu
def test_tour_on_the_simulator_checks_every_algorithm(capsys):
    assert main(["tour", "--cluster", "1", "3", "16", "--n", "37", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend: simulator")
    algorithms = len(simulator.REDUCE_ALGORITHMS) + len(simulator.GATHER_ALGORITHMS)
    assert f"{3 * algorithms} passed, 0 failed" in out  # three cluster sizes


def test_an_interrupt_ends_a_command_in_one_line_with_status_130(monkeypatch, capsys):
    import clusterlab.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(clusterlab.cli, "_tour", interrupted)  # as Ctrl-C during a long simulator run
    assert main(["tour", "--cluster", "2"]) == 130
    assert capsys.readouterr().err == "clusterlab tour: interrupted\n"


@no_gpu
def test_tour_of_int32_sums_exactly_on_the_simulator(capsys):
    assert main(["tour", "--cluster", "2", "5", "--n", "29", "--dtype", "int32"]) == 0
    out = capsys.readouterr().out
    algorithms = len(simulator.REDUCE_ALGORITHMS) + len(simulator.GATHER_ALGORITHMS)
    assert out.count("equals NumPy") == 2 * algorithms and f"{2 * algorithms} passed, 0 failed" in out


@no_gpu
@pytest.mark.parametrize("suite", ["primitives", "fused"])
def test_bench_without_gpu_exits_1_naming_what_is_missing(suite, capsys):
    assert main(["bench", suite]) == 1
    assert "a Hopper GPU is required" in capsys.readouterr().err


@pytest.mark.parametrize("suite, args, message", [
    ("primitives", ["--cluster", "17"], "argument --cluster: must be an integer in 1..16; got '17'"),
    ("fused", ["--batch", "9"], "argument --batch: must be an integer in 1..8; got '9'"),
    ("decode", ["--context", "-1"], "argument --context: must be an integer >= 1; got '-1'"),
    ("mlp", ["--preset", "gpt2"], "argument --preset: invalid choice: 'gpt2'"),
])
def test_bench_suites_name_the_command_that_was_typed(suite, args, message, capsys):
    """``clusterlab bench SUITE`` errors and usage say ``clusterlab bench SUITE``, not the module's file."""
    with pytest.raises(SystemExit) as exited:
        main(["bench", suite, *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: clusterlab bench {suite} [-h]")
    assert f"clusterlab bench {suite}: error: {message}" in err


def test_bad_value_exits_2_with_the_parameter(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["trace", "reduce", "--cluster", "17"])
    assert exited.value.code == 2
    assert "argument --cluster: must be an integer in 1..16; got '17'" in capsys.readouterr().err


def test_trace_saves_exactly_where_asked_in_the_format_of_the_extension(tmp_path, capsys):
    picture = tmp_path / "ring.svg"
    assert main(["trace", "gather", "--cluster", "2", "--n", "3", "--save", str(picture)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"picture saved to {picture}")
    assert picture.read_text().lstrip().startswith("<?xml")
    assert sorted(tmp_path.iterdir()) == [picture]


@no_gpu
def test_tour_on_gpu_backend_without_gpu_is_refused():
    assert main(["tour", "--backend", "gpu", "--cluster", "2"]) == 1
