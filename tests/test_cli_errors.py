"""Usage errors of the clusterlab command: exit status 2, one line naming the flag, no traceback,
and nothing run (or allocated) before the check."""

import os
import re
import subprocess
import sys

import matplotlib.figure
import pytest

import clusterlab.simulator
import clusterlab.tour
from clusterlab.cli import main
from clusterlab.tour import run_tour


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "clusterlab", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trace", "reduce", "--n", "-5"], "argument --n: must be an integer >= 1; got '-5'"),
        (["trace", "reduce", "--n", "many"], "argument --n: must be an integer >= 1; got 'many'"),
        (["tour", "--n", "0"], "argument --n: must be an integer >= 1; got '0'"),
        (["trace", "reduce", "--cluster", "-1"], "argument --cluster: must be an integer in 1..16; got '-1'"),
        (["tour", "--cluster", "2", "17"], "argument --cluster: must be an integer in 1..16; got '17'"),
        (["trace", "gather", "--seed", "-1"],
         "argument --seed: must be an integer in 0..9223372036854775807; got '-1'"),
        (["tour", "--seed", "-1"], "argument --seed: must be an integer in 0..9223372036854775807; got '-1'"),
        (["generate", "--model", "llama3.2-1b", "--prompt-ids", "1", "--seed", "99999999999999999999999"],
         "argument --seed: must be an integer in 0..9223372036854775807; got '99999999999999999999999'"),
        (["trace", "reduce", "--n", "50000000"], "--n must be at most 25824 for the ring reduce (cluster size 8"),
        (["tour", "--cluster", "1", "--n", "50000"], "--n must be at most 14528 for the ring reduce (cluster size 1"),
        # the run of the tour that allows the fewest elements, whichever runs first
        (["tour", "--n", "14524"], "--n must be at most 3628 for the bulk reduce (cluster size 16, float32)"),
        (["trace", "gather", "--algorithm", "butterfly"], "--algorithm must be one of ('direct', 'ring', 'bulk')"),
        (["trace", "gather", "--op", "max"], "--op max is the reduce's operator; a gather copies, it has none"),
        (["bench", "fused", "--tag", "../x"], "argument --tag: must be letters, digits, '.', '_' or '-'"),
        (["bench", "primitives", "--tag", ""], "argument --tag: must be letters, digits, '.', '_' or '-'"),
        (["trace", "reduce", "--save", "."], "argument --save: '.' is a directory"),
        (["trace", "reduce", "--save", "ring"], "argument --save: 'ring' must end in an extension naming"),
        (["trace", "reduce", "--save", "ring.xyz"], "one of .eps, .gif, .jpg"),
        (["trace", "reduce", "--save", "missing/ring.png"], "directory 'missing' does not exist"),
        (["bench", "fused", "--variant", "8xfoo"], "argument --variant: must look like CxW"),
        (["bench", "fused", "--variant", "3x4"], "cluster size must be one of (1, 2, 4, 8, 16), got 3"),
        (["bench", "fused", "--variant", "8x6"], "argument --variant: variant (8, 6): warps must be one of (4, 8, 16)"),
        (["bench", "fused", "--variant", "8x8x0"], "its third number (head split, or MLA's attention clusters) must"),
        (["bench", "primitives", "--cluster", "17"], "argument --cluster: must be an integer in 1..16; got '17'"),
        (["bench", "primitives", "--bytes", "24"], "argument --bytes: must be an integer >= 16, a multiple of 16; got"),
        (["bench", "primitives", "--repeats", "2"], "argument --repeats: must be an integer >= 5; got '2'"),
        (["generate", "--model", "llama3.2-1b", "--prompt-ids", "1", "--top-k", "5"],
         "--top-k 5 samples, so it needs --temperature > 0 (0, the default, is greedy)"),
        (["generate", "--model", "llama3.2-1b", "--prompt-ids", "1", "--max-new-tokens", "99999999999999999999"],
         "max_new_tokens=99999999999999999999 after the longest prompt (1 token) needs caches of "
         "100000000000000000000 rows"),
        (["generate", "--model", "llama3.2-1b", "--prompt-ids", "1", "2", "--max-new-tokens", "2147483647"],
         "max_new_tokens=2147483647 after the longest prompt (2 tokens) needs caches of 2147483649 rows; the kernels "
         "take at most 2147483647"),
    ],
)
def test_usage_errors_exit_2_with_one_line_naming_the_flag(args, message, tmp_path):
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last_line = done.stderr.rstrip("\n").splitlines()[-1]
    assert message in last_line
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_without_a_suite_names_the_suite_alone(tmp_path):
    """The suite's options may be none (its defaults): only the missing suite is named."""
    done = run_cli("bench", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.rstrip("\n").splitlines()[-1].endswith("the following arguments are required: suite")


def test_too_large_n_is_refused_before_any_row_is_made(monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("rows were generated before n was checked")

    monkeypatch.setattr(clusterlab.tour, "random_rows", must_not_run)
    assert main(["trace", "gather", "--cluster", "16", "--n", "50000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--n must be at most 3632 for the ring gather (cluster size 16, float32); got 50000000" in err


def test_bad_save_path_is_refused_before_the_simulation(monkeypatch, tmp_path, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the simulator ran before --save was checked")

    monkeypatch.setattr(clusterlab.simulator, "cluster_reduce", must_not_run)
    with pytest.raises(SystemExit) as exited:
        main(["trace", "reduce", "--save", str(tmp_path / "missing" / "ring.png")])
    assert exited.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_write_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ring.png"))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    assert main(["trace", "reduce", "--n", "4", "--save", str(tmp_path / "ring.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clusterlab trace: [Errno 13] Permission denied")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n": 0}, ValueError, r"n must be an integer >= 1; got 0"),
        ({"n": 50_000}, ValueError, r"n must be at most 14528 for the ring reduce \(cluster size 1, float32\)"),
        ({"cluster_sizes": [2, 17]}, ValueError, r"cluster_sizes\[1\] must be an integer in 1..16; got 17"),
        ({"cluster_sizes": [2.0]}, TypeError, r"cluster_sizes\[0\] must be an integer in 1..16; got 2.0"),
        ({"seed": -1}, ValueError, r"seed must be an integer >= 0; got -1"),
        ({"dtype": "float8"}, ValueError, r"dtype must be one of \('float32', .*got 'float8'"),
        ({"backend": "tpu"}, ValueError, r"backend must be one of \('auto', 'gpu', 'simulator'\); got 'tpu'"),
        ({"backend": "gpu", "dtype": "float64"}, ValueError, r"dtype must be one of \('float32', 'float16', "
         r"'bfloat16'\) on the GPU; got 'float64'"),
    ],
)
def test_run_tour_checks_everything_before_running(kwargs, error, message):
    with pytest.raises(error, match=message):
        run_tour(**{"cluster_sizes": [1, 2], "n": 8, **kwargs})


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("clusterlab.bench.fused_ablation", ["--batch", "9"], "argument --batch: must be an integer in 1..8; got '9'"),
        ("clusterlab.bench.fused_ablation", ["--kv", "1024", "0"],
         "argument --kv: must be an integer in 1..2147483647; got '0'"),
        ("clusterlab.bench.fused_ablation", ["--jobs", "0"], "argument --jobs: must be an integer in 1..64; got '0'"),
        ("clusterlab.bench.launch_overhead", ["--launches", "0"], "argument --launches: must be an integer >= 1"),
        ("clusterlab.bench.fused_timeline", ["--shape", "16x"], "argument --shape: must look like CxW or CxWxS"),
        ("clusterlab.bench.placement", ["--cluster", "17"], "argument --cluster: must be an integer in 1..16; got '17'"),
        ("clusterlab.bench.placement", ["--warps", "8", "--per-sm", "2", "9"],
         "argument --per-sm: 9 blocks of 8 warps exceed the 2048 threads an SM holds"),
        ("clusterlab.bench.placement", ["--cluster", "8", "16", "--blocks", "12"],
         "argument --blocks: 12 blocks make no cluster of 16"),
        ("clusterlab.bench.fused_ablation", ["--kv", "2147483648"], "argument --kv: must be an integer in "
                                                                    "1..2147483647; got '2147483648'"),
        ("clusterlab.bench.fused_timeline", ["--shape", "3x4"],
         "argument --shape: variant (3, 4): cluster size must be one of (1, 2, 4, 8, 16), got 3"),
        ("clusterlab.bench.fused_timeline", ["--shape", "8x4x1x0"],
         "argument --shape: shape (8, 4, 1, 0): its sets of clusters must be >= 1, got 0"),
        ("clusterlab.bench.fused_timeline", ["--layer", "mlp", "--shape", "2x6"],
         "argument --shape: variant (2, 6): warps must be one of (4, 8, 16), got 6"),
        ("clusterlab.bench.fused_timeline", ["--out-dir", "afile"],
         "argument --out-dir: out_dir 'afile' is not a directory results can be written into: 'afile' is not a "
         "directory"),
        ("clusterlab.bench.placement", ["--out-dir", "afile/results"],
         "argument --out-dir: out_dir 'afile/results' is not a directory results can be written into: 'afile' is "
         "not a directory"),
        ("clusterlab.bench.launch_overhead", ["--output", "afile/x.json"],
         "argument --output: the folder of the output 'afile' is not a directory results can be written into: "
         "'afile' is not a directory"),
        ("clusterlab.bench.launch_overhead", ["--output", "."], "argument --output: '.' is a directory, not a file"),
        ("clusterlab", ["bench", "fused", "--variant"], "argument --variant: expected at least one argument"),
        *[("clusterlab", ["bench", suite, "--out-dir", "afile/results"],
           "argument --out-dir: out_dir 'afile/results' is not a directory results can be written into: 'afile' is "
           "not a directory") for suite in ("primitives", "fused", "decode", "mlp")],
        ("clusterlab", ["bench", "fused", "--kv", "4294967296"], "argument --kv: must be an integer in 1..2147483647"),
        ("clusterlab", ["bench", "decode", "--seed", "99999999999999999999999"],
         "argument --seed: must be an integer in 0..9223372036854775807"),
        ("clusterlab", ["bench", "mlp", "--seed", "99999999999999999999999"],
         "argument --seed: must be an integer in 0..9223372036854775807"),
    ],
)
def test_the_benchmark_modules_refuse_bad_numbers_before_touching_a_gpu(module, args, message, tmp_path):
    (tmp_path / "afile").write_text("not a folder")  # what an --out-dir or --output must not be inside
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.rstrip("\n").splitlines()[-1]
    assert [path.name for path in tmp_path.iterdir()] == ["afile"]  # nothing written


@pytest.mark.parametrize("module, args", [("clusterlab.bench.fused_ablation", ["--jobs", "4"]),
                                          ("clusterlab.bench.launch_overhead", [])])
def test_studies_look_for_the_gpu_before_any_work(module, args, tmp_path):
    """Without a Hopper GPU, the study names what is missing at once: no compile worker's traceback."""
    from clusterlab.gpu import hopper_problem

    if hopper_problem() is None:
        pytest.skip("this machine has a Hopper GPU")
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1 and "RemoteTraceback" not in done.stderr
    assert done.stderr.rstrip("\n").splitlines()[-1].startswith("clusterlab.errors.HopperRequired: a Hopper GPU is "
                                                                  "required")
    assert list(tmp_path.iterdir()) == []


def test_the_ablation_refuses_to_compile_ahead_without_the_kernel_cache(tmp_path):
    env = {**os.environ, "CLUSTERLAB_CACHE_DIR": ""}
    done = subprocess.run([sys.executable, "-m", "clusterlab.bench.fused_ablation", "--jobs", "4"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.rstrip("\n").splitlines()[-1].endswith(
        "error: --jobs 4 compiles ahead into the kernel cache, which $CLUSTERLAB_CACHE_DIR turns off")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("run", "kwargs", "message"),
    [
        ("fused", {"variants": [(8, 4), (3, 4)]}, "variant (3, 4): cluster size must be one of"),
        ("fused", {"variants": [(8, 4, 0)]}, "variant (8, 4, 0): its third number"),
        ("fused", {"variants": [(8,)]}, "a variant is () or (cluster_size, warps"),
        ("primitives", {"cluster_sizes": [2, 17]}, "cluster_sizes must be integers in 1..16, got [2, 17]"),
        ("primitives", {"cluster_sizes": [2.0]}, "cluster_sizes must be integers in 1..16, got [2.0]"),
        ("primitives", {"cluster_sizes": "8"}, "cluster_sizes must be integers in 1..16, got '8'"),
        ("primitives", {"cluster_sizes": []}, "cluster_sizes must be integers in 1..16, got []"),
        ("primitives", {"message_bytes": [64, 24]}, "message_bytes must be positive multiples of 16 (bytes per block), "
                                                    "got [64, 24]"),
        ("primitives", {"message_bytes": [0]}, "message_bytes must be positive multiples of 16"),
        ("primitives", {"dtypes": ["float64"]}, "dtypes must be among ('float32', 'bfloat16', 'float16'), "
                                                "got ['float64']"),
        ("primitives", {"configs": ["one", "grid"]}, "configs must be among ('one', 'chip'), got ['one', 'grid']"),
        ("primitives", {"repeats": 1}, "repeats must be an int >= 5, got 1"),
        ("primitives", {"repeats": 7.0}, "repeats must be an int >= 5, got 7.0"),
        ("primitives", {"seed": True}, "seed must be None or an int in 0 .. 2**63 - 1, got True"),
    ],
)
def test_bench_runs_refuse_bad_settings_before_looking_for_a_gpu(run, kwargs, message, monkeypatch):
    import clusterlab.gpu
    from clusterlab.bench import fused, primitives

    def no_gpu_yet():
        raise AssertionError("the GPU was looked for before the settings were checked")

    monkeypatch.setattr(clusterlab.gpu, "require_hopper", no_gpu_yet)
    bench = {"fused": fused.run_bench, "primitives": primitives.run_primitives_bench}[run]
    with pytest.raises(ValueError, match=re.escape(message)):
        bench(**kwargs)
