"""``clusterlab bench decode``: the bytes-per-token floor, tables, JSON and picture, transformers'
model over our weights, the caches a benchmark fills, the CLI's errors (all on the CPU), and a
``--quick`` run on a Hopper GPU."""

import json
import math

import pytest
import torch

from clusterlab.cli import main
from clusterlab.gpu import hopper_problem
from clusterlab.models import LlamaModel, ModelConfig, random_weights
from clusterlab.bench.decode import (
    BreakdownRow,
    DecodeRow,
    bytes_per_token,
    check_fused,
    format_breakdown,
    format_table,
    run_bench,
    write_results,
)

no_gpu = pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")

#: A tiny Llama: 2 layers, hidden 64, 4 query heads and 2 KV heads of 64, MLP 128, vocabulary 97.
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=97)

ROW_KEYS = {"preset", "dtype", "batch", "context", "fused_us", "unfused_us", "hf_us", "floor_us", "bytes_per_token",
            "fused_attention_us"}
BREAKDOWN_KEYS = {"preset", "dtype", "batch", "context", "model", "attention_us", "mlp_us", "rest_us", "step_us"}
RECORD_KEYS = {"card", "driver", "driver_cuda_version", "software", "date", "commit", "copy_bandwidth_tbps", "hf",
               "handoff", "rows", "breakdown"}


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**(TINY | changes))


# -- the floor ---------------------------------------------------------------------------------------


def test_bytes_per_token_reads_every_weight_once_and_the_cache_rows():
    # per layer: input norm 64, qkv (4 + 2 * 2) * 64 rows x 64, o 64 x 256, post norm 64, gate/up/down 128 x 64
    layer = 64 + 512 * 64 + 64 * 256 + 64 + 3 * 128 * 64
    weights = 2 * layer + 64 + 97 * 64  # two layers, the final norm, lm_head
    cache = 3 * 100 * 2 * 2 * 64 * 2  # batch x context x layers x kv heads x head_dim x (K, V)
    assert bytes_per_token(tiny(), batch=3, context=100) == 2 * (weights + cache) == 615168
    assert bytes_per_token(tiny(), batch=3, context=100, itemsize=4) == 4 * (weights + cache)
    assert bytes_per_token(tiny(), batch=1, context=100) == 2 * (weights + cache // 3)


def test_bytes_per_token_counts_lm_head_once_tied_or_not_and_adds_biases():
    untied = bytes_per_token(tiny(), 2, 50)
    assert bytes_per_token(tiny(tie_word_embeddings=True), 2, 50) == untied
    # Llama's attention_bias: q/k/v biases (512) and the output projection's (64), per layer
    assert bytes_per_token(tiny(attention_bias=True, o_bias=True), 2, 50) == untied + 2 * 2 * (512 + 64)


# -- tables, JSON, picture ---------------------------------------------------------------------------


def rows(hf_us=8000.0):
    return [
        DecodeRow("llama3-8b", "float16", 4, 1024, fused_us=1000.0, unfused_us=2500.0, hf_us=hf_us, floor_us=500.0,
                  bytes_per_token=2_150_000_000, fused_attention_us=1600.0),
        DecodeRow("llama3-8b", "float16", 4, 4096, fused_us=1250.0, unfused_us=3000.0, hf_us=hf_us, floor_us=700.0,
                  bytes_per_token=3_010_000_000, fused_attention_us=None),
        DecodeRow("llama3.2-1b", "float16", 1, 1024, fused_us=400.0, unfused_us=900.0, hf_us=hf_us, floor_us=300.0,
                  bytes_per_token=1_290_000_000),
    ]


PARTS = [
    BreakdownRow("llama3.2-1b", "float16", 1, 1024, "fused", attention_us=90.0, mlp_us=250.0, rest_us=45.0,
                 step_us=400.0),
    BreakdownRow("llama3.2-1b", "float16", 1, 1024, "unfused", attention_us=560.0, mlp_us=251.0, rest_us=46.0,
                 step_us=900.0),
]


def test_table_gives_percent_of_floor_speedups_and_tokens_per_second():
    lines = format_table(rows(), 4.3e12).splitlines()
    assert "4.30 TB/s" in lines[0]
    first = lines[2].split()
    assert first[:4] == ["llama3-8b", "float16", "4", "1024"]
    # fused, fused attention only, unfused, hf, floor, % of floor, x unfused, x hf, tokens/s (4 sequences / 1 ms)
    assert first[4:] == ["1000.0", "1600.0", "2500.0", "8000.0", "500.0", "50.0", "2.50", "8.00", "4000"]
    skipped = format_table(rows(hf_us=None), 4.3e12).splitlines()[4].split()
    assert skipped[4:] == ["400.0", "-", "900.0", "-", "300.0", "75.0", "2.25", "-", "2500"]


def test_breakdown_table_sums_the_parts_beside_the_step():
    line = format_breakdown(PARTS).splitlines()[3].split()
    assert line[4:] == ["unfused", "560.0", "251.0", "46.0", "857.0", "900.0"]


INFO = {"gpu": "NVIDIA H200", "driver_cuda_version": "13.0", "numba-cuda": "0.30.4", "cuda-core": "1.2.2",
        "torch": "2.13.0", "transformers": "5.24.0"}


@pytest.mark.parametrize("hf_us", [8000.0, None])
def test_results_json_has_exactly_the_schema_and_the_picture_is_written(tmp_path, hf_us, monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_COMMIT", "0123456789abcdef")
    hf = "eager" if hf_us else "skipped: --no-hf"
    json_path, png_path = write_results(rows(hf_us), PARTS, 4.3e12, hf, INFO, tmp_path / "out", "test")
    assert (json_path, png_path) == (tmp_path / "out" / "decode_test.json", tmp_path / "out" / "decode_test.png")
    record = json.loads(json_path.read_text())
    assert set(record) == RECORD_KEYS
    assert record["card"] == "NVIDIA H200" and record["commit"] == "0123456789abcdef" and record["hf"] == hf
    assert record["handoff"] is True  # the model's default, unless the run says otherwise
    assert record["copy_bandwidth_tbps"] == pytest.approx(4.3)
    assert record["software"]["transformers"] == "5.24.0"
    assert [set(r) for r in record["rows"]] == [ROW_KEYS] * 3
    assert [r["hf_us"] for r in record["rows"]] == [hf_us] * 3
    assert record["rows"][1]["context"] == 4096 and record["rows"][1]["fused_us"] == 1250.0
    assert [set(p) for p in record["breakdown"]] == [BREAKDOWN_KEYS] * 2
    assert [p["model"] for p in record["breakdown"]] == ["fused", "unfused"]
    assert png_path.read_bytes()[:4] == b"\x89PNG" and png_path.stat().st_size > 20_000


# -- the models a benchmark builds -------------------------------------------------------------------


def test_random_caches_are_finite_and_shared_by_an_unfused_model():
    config = tiny()
    weights = random_weights(config, torch.float16, seed=3)
    fused = LlamaModel(config, weights)
    fused.random_caches(2, 24, seed=5)
    assert len(fused.caches) == 2 and tuple(fused.caches[0].k.shape) == (2, 2, 24, 64)
    assert all(torch.isfinite(c.k).all() and torch.isfinite(c.v).all() for c in fused.caches)
    assert not torch.equal(fused.caches[0].k, fused.caches[1].k)  # a seed per layer
    again = LlamaModel(config, weights)
    again.random_caches(2, 24, seed=5)
    assert torch.equal(again.caches[1].v, fused.caches[1].v)
    unfused = LlamaModel(config, weights, attention="unfused")
    unfused.use_caches(fused.caches)
    assert all(u is f for u, f in zip(unfused.caches, fused.caches))
    assert check_fused(fused, unfused, context=20, seed=1) < 1e-2  # the fused layer on the simulator


def test_check_fused_raises_when_the_models_disagree():
    config = tiny()
    fused = LlamaModel(config, random_weights(config, torch.float16, seed=3))
    other = LlamaModel(config, random_weights(config, torch.float16, seed=4), attention="unfused")
    fused.random_caches(1, 8, seed=5)
    other.use_caches(fused.caches)
    with pytest.raises(RuntimeError, match="differ from the unfused model's by"):
        check_fused(fused, other, context=6)


def test_use_caches_refuses_caches_of_another_shape():
    config = tiny()
    model = LlamaModel(config, random_weights(config, torch.float16, seed=3))
    model.random_caches(2, 16)
    caches = model.caches
    with pytest.raises(ValueError, match="1 caches for a model of 2 layers"):
        model.use_caches(caches[:1])
    other = LlamaModel(config, model.weights)
    other.random_caches(1, 16)
    with pytest.raises(ValueError, match=r"cache 1 holds a torch.float16 tensor of shape \(1, 2, 16, 64\)"):
        model.use_caches([caches[0], other.caches[1]])
    with pytest.raises(ValueError, match="batch must be an int in 1..8"):
        model.random_caches(9, 16)


@pytest.mark.parametrize("settings, words", [
    ({"presets": ("llama4",)}, "presets must be among ["),
    ({"presets": "llama3-8b"}, "presets must be among ["),
    ({"batches": (1, 9)}, "batches must be integers in 1..8, got [1, 9]"),
    ({"batches": ()}, "batches must be integers in 1..8, got []"),
    ({"contexts": (1024, 0)}, "contexts must be integers in 1..2147483631, got [1024, 0]"),
    ({"contexts": (2**31,)}, "contexts must be integers in 1..2147483631, got [2147483648]"),
    ({"dtype": "float32"}, "dtype must be one of ('float16', 'bfloat16'), got 'float32'"),
    ({"hf": "flash"}, "hf must be 'eager', 'compiled' or None, got 'flash'"),
    ({"repeats": 4}, "repeats must be an int >= 5, got 4"),
    ({"repeats": 5.5}, "repeats must be an int >= 5, got 5.5"),
    ({"seed": -1}, "seed must be an int >= 0, got -1"),
    ({"handoff": "no"}, "handoff must be True or False, got 'no'"),
])
def test_run_bench_refuses_settings_no_run_could_use_before_anything_runs(settings, words, tmp_path):
    with pytest.raises(ValueError) as info:
        run_bench(**{"out_dir": tmp_path / "out", **settings})
    assert words in str(info.value)
    assert not (tmp_path / "out").exists()


# -- the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "argument --batch: must be an integer in 1..8; got '0'"),
        (["--batch", "1", "9"], "argument --batch: must be an integer in 1..8; got '9'"),
        (["--context", "0"], "argument --context: must be an integer >= 1; got '0'"),
        (["--context", "long"], "argument --context: must be an integer >= 1; got 'long'"),
        (["--repeats", "3"], "argument --repeats: must be an integer >= 5; got '3'"),
        (["--seed", "-1"], "argument --seed: must be an integer in 0..9223372036854775807; got '-1'"),
        (["--preset", "llama4"], "argument --preset: invalid choice: 'llama4'"),
        (["--dtype", "float32"], "argument --dtype: invalid choice: 'float32'"),
        (["--no-hf", "--hf-compile"], "argument --hf-compile: not allowed with argument --no-hf"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "decode", "--out-dir", str(tmp_path / "out"), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err.rstrip("\n").splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@no_gpu
@pytest.mark.parametrize("extra", [[], ["--quick", "--no-hf"]])
def test_without_a_hopper_gpu_bench_decode_exits_1_naming_what_is_missing(extra, capsys, tmp_path):
    assert main(["bench", "decode", "--out-dir", str(tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clusterlab bench: a Hopper GPU is required")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_quick_run_writes_positive_finite_times(tmp_path, capsys):
    assert main(["bench", "decode", "--quick", "--out-dir", str(tmp_path), "--tag", "quick"]) == 0
    out = capsys.readouterr().out
    assert "fused logits vs unfused" in out and "decode TPOT" in out
    record = json.loads((tmp_path / "decode_quick.json").read_text())
    assert set(record) == RECORD_KEYS
    (row,) = record["rows"]
    assert (row["preset"], row["batch"], row["context"]) == ("llama3.2-1b", 1, 1024)
    for key in ("fused_us", "fused_attention_us", "unfused_us", "floor_us"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["fused_us"] > row["floor_us"]  # nothing beats moving its bytes at copy bandwidth
    if record["hf"] == "eager":
        assert math.isfinite(row["hf_us"]) and row["hf_us"] > 0
    else:
        assert record["hf"].startswith("skipped") and row["hf_us"] is None
    assert [p["model"] for p in record["breakdown"]] == ["fused", "fused_attention", "unfused"]
    for part in record["breakdown"]:
        assert all(math.isfinite(part[k]) and part[k] > 0 for k in ("attention_us", "mlp_us", "rest_us", "step_us"))
    assert (tmp_path / "decode_quick.png").stat().st_size > 20_000
