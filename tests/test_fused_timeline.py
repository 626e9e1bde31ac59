"""The timeline study's report (CPU): its summary and plot for either block, from recorded stamps."""

import json
from pathlib import Path

import numpy as np
import pytest

from clusterlab.bench.fused_timeline import MLA_ROLES, PHASE_COLOURS, mla_summary, plot, summary
from clusterlab.fused import kernel, mla_kernel, mlp_kernel

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _record(layer, phases, seed):
    """A record as the study writes it: two launch shapes of random blocks (fresh draws)."""
    rng = np.random.default_rng(seed)
    shapes = []
    for cluster_size, blocks in ((2, 12), (4, 8)):
        sms = rng.integers(0, 6, blocks)
        per_sm = np.bincount(sms)
        shape = {"cluster_size": cluster_size, "warps": 8, "blocks": blocks, "rel_err": 1e-4, "step_us": 30.0,
                 "instrumented_us": 30.5, "sm_clock_ghz": 1.8, "sms_used": int((per_sm > 0).sum()),
                 "blocks_per_sm": {str(k): int((per_sm == k).sum()) for k in range(1, int(per_sm.max()) + 1)},
                 "block": [{"sm": int(sm), "cluster": b // cluster_size, "rank": b % cluster_size,
                            "sm_blocks": int(per_sm[sm]), "crowded": bool(per_sm[sm] > 2),
                            "start_us": float(rng.uniform(0, 1)),
                            "phase_us": [float(x) for x in rng.uniform(0.1, 5, len(phases))]}
                           for b, sm in enumerate(sms)]}
        # the kernel options it ran with: the K/V rows asked for by name, or left to the rule (None)
        options = {"split_kv_rows": True} if cluster_size == 4 else {"split_kv_rows": None}
        shape.update({"head_split": 1, "batch_parts": cluster_size // 2, "options": options,
                      "kv_rows_split": True} if layer == "attention"
                     else {"clusters": blocks // cluster_size})
        shapes.append(shape)
    return {"card": "NVIDIA H200", "date": "2026-11-30T00:00:00+00:00", "layer": layer, "preset": "llama3-8b",
            "dtype": "float16", "batch": 1, "kv_len": 1024 if layer == "attention" else None,
            "phases": list(phases), "shapes": shapes}


@pytest.mark.parametrize("layer, phases", [("attention", kernel.TIMELINE_PHASES), ("mlp", mlp_kernel.TIMELINE_PHASES)])
def test_summary_and_plot_of_either_block(layer, phases, tmp_path):
    record = _record(layer, phases, seed=None)
    assert set(phases) <= set(PHASE_COLOURS)
    for shape in record["shapes"]:
        text = summary(shape, phases)
        assert all(name in text for name in phases) and f"blocks arrive after the {phases[-3]}" in text
        sets = shape.get("batch_parts", 1)
        assert (f", {sets} sets" in text.splitlines()[0]) == (sets > 1)
        asked = shape.get("options", {}).get("split_kv_rows") is True
        assert (", split_kv_rows=True," in text.splitlines()[0]) == asked
        # the rule's sharing out is told where no option asked for it by name
        assert (", K/V rows shared out," in text.splitlines()[0]) == (layer == "attention" and not asked)
        rows = [line.strip() for line in text.splitlines()[3:]]
        assert [row[:len(name)] for row, name in zip(rows, phases)] == list(phases)
        medians = [float(row[len(name):].split()[1]) for row, name in zip(rows, phases)]  # min, median, max
        want = np.median([[b["phase_us"][j] for b in shape["block"]] for j in range(len(phases))], axis=1)
        assert np.allclose(medians, want, atol=0.01)
    plot(record, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def _mla_record(one_launch, seed):
    """An MLA step as the study writes it: its blocks with roles, starts and phases (fresh draws)."""
    rng = np.random.default_rng(seed)
    phases = mla_kernel.MLA_TIMELINE_PHASES
    blocks = [{"sm": int(rng.integers(0, 132)), "cluster": c, "rank": r, "role": role,
               "start_us": float(at + rng.uniform(0, 2)), "phase_us": [float(x) for x in rng.uniform(0.1, 5, len(phases))]}
              for role, clusters, at in (("projections", 4, 0), ("attention", 6, 10), ("output", 4, 30))
              for c in range(clusters) for r in range(2)]
    shape = {"cluster_size": 2, "warps": 8, "attention_clusters": 3, "options": {"one_launch": True} if one_launch
             else {}, "blocks": len(blocks), "rel_err": 3e-4, "step_us": 40.0, "instrumented_us": 41.0,
             "sm_clock_ghz": 1.98, "sms_used": 20, "block": blocks}
    return {"card": "NVIDIA H200", "date": "2026-12-05T00:00:00+00:00", "layer": "mla", "preset": "deepseek-v2-lite",
            "dtype": "float16", "batch": 2, "kv_len": 1024, "phases": list(phases), "shapes": [shape]}


@pytest.mark.parametrize("one_launch", [False, True])
def test_the_mla_summary_gives_each_role_its_span_and_phases(one_launch, tmp_path):
    record = _mla_record(one_launch, seed=None)
    shape, phases = record["shapes"][0], record["phases"]
    assert set(phases) <= set(PHASE_COLOURS)
    lines = mla_summary(shape, phases).splitlines()
    assert lines[0].startswith("one_launch=True:" if one_launch else "three launches:")
    assert all(name in lines[1] for name in phases)
    for line, role in zip(lines[2:], MLA_ROLES, strict=True):
        mine = [b for b in shape["block"] if b["role"] == role]
        fields = line.split()
        assert fields[0] == role and int(fields[1]) == len(mine)
        first = min(b["start_us"] for b in mine)
        last_end = max(b["start_us"] + sum(b["phase_us"]) for b in mine)
        assert float(fields[2].split("/")[0]) == pytest.approx(first, abs=0.05)
        assert float(fields[3].split("/")[1]) == pytest.approx(last_end, abs=0.05)
        medians = [float(cell.split("/")[0]) for cell in fields[4:]]
        assert np.allclose(medians, np.median([b["phase_us"] for b in mine], axis=0), atol=0.005)
    plot(record, tmp_path / "mla.png")
    assert (tmp_path / "mla.png").stat().st_size > 10_000


@pytest.mark.parametrize("name, phases", [("fused_timeline_h200_llama3_b8_overlay.json", kernel.TIMELINE_PHASES),
                                          ("mla_timeline_h100_v71_b8_32k.json", mla_kernel.MLA_TIMELINE_PHASES)])
def test_a_recorded_timeline_plots_again(name, phases, tmp_path):
    record = json.loads((RESULTS / name).read_text())
    assert record["phases"] == list(phases)
    if record.get("layer") == "mla":  # both forms, every role
        assert [shape["options"] for shape in record["shapes"]] == [{}, {"one_launch": True}]
        for shape in record["shapes"]:
            assert len(mla_summary(shape, phases).splitlines()) == 2 + len(MLA_ROLES)
    plot(record, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, words", [
    (["--shape", "16x4x1x2x2"],
     "argument --shape: must look like CxW or CxWxS or CxWxSxP (cluster size x warps [x head split [x sets"),
    (["--shape", "16"], "argument --shape: must look like CxW"),
    (["--shape", "8x4", "16xfour"], "got '16xfour'"),
    (["--layer", "mlp", "--shape", "2x8x1"], "argument --shape: the MLP's launch shapes are cluster_size x warps"),
    (["--batch", "9"], "argument --batch: must be an integer in 1..8"),
    (["--kv", "0"], "argument --kv: must be an integer in 1..2147483647"),
    (["--spec", "split_kv_rows=1"], "argument --spec: kernel_options: split_kv_rows=1; allowed: None, True or False"),
    (["--layer", "mlp", "--spec", "split_kv_rows=True"],
     "argument --spec: kernel options are the attention or MLA block's"),
    (["--layer", "mla", "--preset", "llama2-7b"], "argument --preset: llama2-7b is not a preset of the mla block"),
    (["--preset", "deepseek-v2-lite"], "argument --preset: deepseek-v2-lite is not a preset of the attention block"),
    (["--layer", "mla", "--shape", "8x8"], "argument --shape: the MLA block runs its layer's launch rule"),
    (["--layer", "mla", "--spec", "default", "split_kv_rows=True"],
     "argument --spec: for the mla block: kernel_options: unknown name 'split_kv_rows'; allowed: one_launch"),
    (["--spec", "one_launch=True"], "argument --spec: for the attention block: kernel_options: unknown name "
                                    "'one_launch'"),
])
def test_the_study_refuses_arguments_it_cannot_use_before_touching_a_gpu(args, words, capsys):
    from clusterlab.bench.fused_timeline import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_launch_shapes_read_with_their_sets():
    from clusterlab.bench.fused_timeline import parse_shape

    assert parse_shape("4x8") == (4, 8) and parse_shape("16x4x1x4") == (16, 4, 1, 4)
