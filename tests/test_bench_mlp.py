"""``clusterlab bench mlp``: the PyTorch block it times, its table, JSON and picture, the settings it
refuses and the CLI without a GPU (all on the CPU), and a small run on a Hopper GPU."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from clusterlab.bench import timing
from clusterlab.bench.mlp import (
    PRESETS,
    MLPRow,
    check_settings,
    format_table,
    mlp_config,
    parse_variant,
    torch_mlp_block,
    write_results,
)
from clusterlab.cli import main
from clusterlab.fused.mlp import MLPConfig, MLPWeights, reference_mlp
from clusterlab.fused.reference import relative_error
from clusterlab.gpu import hopper_problem
from clusterlab.models import LlamaModel, ModelConfig, random_weights

no_gpu = pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")

ROW_KEYS = {"preset", "dtype", "batch", "cluster_size", "clusters", "warps", "blocks", "layers", "fused_us",
            "torch_us", "floor_us", "step_bytes", "rel_err", "torch_rel_err", "options", "fraction_of_copy_bw",
            "speedup"}
RECORD_KEYS = {"card", "driver", "driver_cuda_version", "software", "date", "commit", "copy_bandwidth_tbps", "l2_bytes",
               "l2_turnover", "rows"}
INFO = {"gpu": "NVIDIA H200", "driver_cuda_version": "13.0", "numba-cuda": "0.30.4", "cuda-core": "1.2.2",
        "torch": "2.13.0"}


# -- the shapes and the PyTorch block ----------------------------------------------------------------


def test_presets_are_the_models_mlp_shapes():
    assert PRESETS == ("llama3-8b", "llama3.2-1b", "llama2-7b", "qwen2.5-7b")
    assert mlp_config("llama3-8b") == MLPConfig(4096, 14336, 1e-5)
    assert mlp_config("qwen2.5-7b") == MLPConfig(3584, 18944, 1e-6)
    # W_gate, W_up, W_down and the gain once, two inputs read and two outputs written
    assert mlp_config("llama3.2-1b").step_bytes(2) == 2 * ((3 * 8192 + 1) * 2048 + 4 * 2 * 2048)


def test_torch_block_is_the_models_own_mlp_block_and_close_to_the_reference():
    config = ModelConfig(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=500000.0, vocab_size=97)
    model = LlamaModel(config, random_weights(config, torch.float16, seed=3), attention="unfused")
    lw = model.weights.layers[0]
    weights = MLPWeights(lw.post_norm, lw.gate, lw.up, lw.down)
    gen = torch.Generator().manual_seed(1)
    out, h = (torch.randn(3, 64, generator=gen).half() for _ in range(2))
    got, residual = torch_mlp_block(weights, out, h, config.rms_norm_eps)
    want, want_residual = model.mlp_block(0, out, h)
    assert torch.equal(got, want) and torch.equal(residual, want_residual)
    exact, _ = reference_mlp(weights, out, h, config.rms_norm_eps)
    assert relative_error(got, exact) < 1e-2


# -- tables, JSON, picture ---------------------------------------------------------------------------


def rows():
    common = {"dtype": "float16", "layers": 1, "step_bytes": 352_000_000, "rel_err": 2.5e-4, "torch_rel_err": 3.1e-4}
    return [
        MLPRow("llama3-8b", batch=1, cluster_size=2, clusters=128, warps=8, blocks=256, fused_us=100.0,
               torch_us=150.0, floor_us=80.0, **common),
        MLPRow("llama3-8b", batch=8, cluster_size=2, clusters=128, warps=8, blocks=256, fused_us=110.0,
               torch_us=160.0, floor_us=80.0, **common),
        MLPRow("llama3-8b", batch=1, cluster_size=4, clusters=64, warps=8, blocks=256, fused_us=125.0,
               torch_us=150.0, floor_us=80.0, **common),
        MLPRow("llama3.2-1b", batch=1, cluster_size=2, clusters=128, warps=8, blocks=256, fused_us=40.0,
               torch_us=60.0, floor_us=24.0, **(common | {"layers": 2, "step_bytes": 100_000_000})),
    ]


def test_table_gives_the_shape_times_percent_of_copy_bandwidth_speedup_and_errors():
    lines = format_table(rows(), 4.3e12).splitlines()
    assert "4.30 TB/s" in lines[0] and "per layer" in lines[0]
    assert lines[1].split()[:9] == ["preset", "dtype", "batch", "C", "clusters", "W", "blocks", "layers", "fused"]
    assert len(lines) == 2 + 4
    first = lines[2].split()
    # preset dtype batch C clusters W blocks layers | fused torch floor | % of copy BW, x torch | errors
    assert first == ["llama3-8b", "float16", "1", "2", "128", "8", "256", "1", "100.0", "150.0", "80.0", "80.0",
                     "1.50", "2.5e-04", "3.1e-04"]
    variant = lines[4].split()
    assert variant[3:7] == ["4", "64", "8", "256"] and variant[11:13] == ["64.0", "1.20"]
    assert lines[5].split()[7] == "2"
    with_options = dataclasses.replace(rows()[0], options="interleave_inputs=True")
    assert format_table([with_options], 4.3e12).splitlines()[2].endswith("3.1e-04  [interleave_inputs=True]")


def test_results_json_has_exactly_the_schema_and_the_picture_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_COMMIT", "0123456789abcdef")
    monkeypatch.setattr(timing, "_smi", lambda fields: ["580.159.04"])
    json_path, png_path = write_results(rows(), 4.3e12, INFO, tmp_path / "out", "test", l2_bytes=60 << 20)
    assert (json_path, png_path) == (tmp_path / "out" / "mlp_test.json", tmp_path / "out" / "mlp_test.png")
    record = json.loads(json_path.read_text())
    assert set(record) == RECORD_KEYS
    assert record["card"] == "NVIDIA H200" and record["commit"] == "0123456789abcdef"
    assert record["driver_cuda_version"] == "13.0" and record["driver"] == "580.159.04"
    assert record["software"] == {"numba-cuda": "0.30.4", "cuda-core": "1.2.2", "torch": "2.13.0"}
    assert record["copy_bandwidth_tbps"] == pytest.approx(4.3)
    assert record["l2_bytes"] == 60 << 20 and record["l2_turnover"] == 3
    assert [set(r) for r in record["rows"]] == [ROW_KEYS] * 4
    first = record["rows"][0]
    assert first["fraction_of_copy_bw"] == pytest.approx(0.8) and first["speedup"] == pytest.approx(1.5)
    assert (first["cluster_size"], first["clusters"], first["warps"], first["blocks"]) == (2, 128, 8, 256)
    assert [r["preset"] for r in record["rows"]] == ["llama3-8b"] * 3 + ["llama3.2-1b"]
    assert png_path.read_bytes()[:4] == b"\x89PNG" and png_path.stat().st_size > 20_000


# -- settings and the command ------------------------------------------------------------------------


def test_variants_parse_as_cluster_size_by_warps():
    assert parse_variant("2x8") == (2, 8)
    assert parse_variant("16x4") == (16, 4)
    for bad in ("2", "2x8x2", "x8", "2xfoo"):
        with pytest.raises(Exception, match="must look like CxW"):
            parse_variant(bad)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"presets": ["llama4"]}, "presets must be among"),
        ({"presets": "llama3-8b"}, "presets must be among .*, got 'llama3-8b'"),
        ({"batches": [0]}, "batches must be integers in 1..8"),
        ({"batches": [1, True]}, r"batches must be integers in 1..8, got \[1, True\]"),
        ({"dtypes": ["float32"]}, "dtypes must be among"),
        ({"variants": [(3, 8)]}, r"variant 3x8 can run none of the presets asked for \(llama3-8b: cluster_size must"),
        ({"variants": [(2, 6)]}, r"variant 2x6 can run none of the presets asked for \(llama3-8b: warps must be"),
        ({"presets": ["qwen2.5-7b"], "variants": [(2, 8), (16, 4)]},
         "variant 16x4 can run none of the presets asked for .qwen2.5-7b: hidden_size 3584 and intermediate_size 18944 "
         "have no split"),
    ],
)
def test_settings_no_run_could_use_are_refused(settings, message):
    given = {"presets": ["llama3-8b"], "batches": [1], "dtypes": ["float16"], "variants": None} | settings
    with pytest.raises(ValueError, match=message):
        check_settings(**given)


def test_a_variant_some_presets_can_run_is_accepted():
    # 16x4 tiles Llama-3-8B's intermediate size but not Qwen2.5-7B's: the run skips that pair
    check_settings(["llama3-8b", "qwen2.5-7b"], [1, 8], ["float16", "bfloat16"], [(2, 8), (4, 8), (16, 4)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "2xfoo"], "argument --variant: must look like CxW"),
        (["--batch", "9"], "argument --batch: must be an integer in 1..8; got '9'"),
        (["--preset", "llama4"], "argument --preset: invalid choice: 'llama4'"),
        (["--dtype", "float32"], "argument --dtype: invalid choice: 'float32'"),
        (["--l2-turnover", "-1"], "argument --l2-turnover: must be a number in 0..64; got '-1'"),
        (["--l2-turnover", "65"], "argument --l2-turnover: must be a number in 0..64; got '65'"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "mlp", "--out-dir", str(tmp_path / "out"), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err.rstrip("\n").splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_variant_that_cannot_run_exits_2_before_anything_runs(capsys, tmp_path):
    assert main(["bench", "mlp", "--variant", "3x8", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clusterlab bench: variant 3x8 can run none of the presets asked for (llama3-8b: "
                          "cluster_size must be one of")
    assert not (tmp_path / "out").exists()


@no_gpu
@pytest.mark.parametrize("extra", [[], ["--preset", "llama3.2-1b", "--batch", "1", "--variant", "2x8"]])
def test_without_a_hopper_gpu_bench_mlp_exits_1_naming_what_is_missing(extra, capsys, tmp_path):
    assert main(["bench", "mlp", "--out-dir", str(tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clusterlab bench: a Hopper GPU is required")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@no_gpu
def test_run_as_a_module_without_a_hopper_gpu_exits_1_too(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clusterlab.bench.mlp", "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("clusterlab bench: a Hopper GPU is required")
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()


# -- on a Hopper GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_small_run_writes_positive_finite_times_above_the_floor(tmp_path, capsys):
    assert main(["bench", "mlp", "--preset", "llama3.2-1b", "--batch", "1", "--out-dir", str(tmp_path),
                 "--tag", "quick"]) == 0
    out = capsys.readouterr().out
    assert "fused MLP block vs PyTorch graph" in out and "fit at once" in out
    record = json.loads((tmp_path / "mlp_quick.json").read_text())
    assert set(record) == RECORD_KEYS
    (row,) = record["rows"]
    assert set(row) == ROW_KEYS
    assert (row["preset"], row["dtype"], row["batch"]) == ("llama3.2-1b", "float16", 1)
    assert row["blocks"] == row["cluster_size"] * row["clusters"] and row["layers"] >= 1
    for key in ("fused_us", "torch_us", "floor_us"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["fused_us"] > row["floor_us"]  # nothing beats moving its bytes at copy bandwidth
    assert row["rel_err"] < 1e-2 and row["torch_rel_err"] < 1e-2
    assert (tmp_path / "mlp_quick.png").stat().st_size > 20_000
