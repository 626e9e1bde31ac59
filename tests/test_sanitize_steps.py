"""The sanitizer scripts' step loop, run on the simulator backend (CPU): it counts a step that misses; and the
group of shapes their command line names."""

import pytest
import torch
from sanitize_steps import chosen_group, run_steps

from clusterlab.fused import (AttentionConfig, AttentionWeights, DecodeAttention, DecodeMLA, KVCache, LatentCache,
                              MLAConfig, MLAWeights, mla_reference_step)
from clusterlab.fused.reference import reference_step

ATTENTION = [(AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64), {"cluster_size": 2}, [0, 9],
              torch.bfloat16)]
MLA = [(MLAConfig(hidden_size=256, heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32), {"cluster_size": 2, "attention_clusters": 2}, [3, 0], torch.float16)]


def _off(reference):
    """``reference`` with its output 1.5 times too large."""
    def wrong(*args):
        want = reference(*args)
        want.out.mul_(1.5)
        return want
    return wrong


def test_steps_match_their_reference_and_a_wrong_reference_is_counted(capsys):
    assert run_steps(ATTENTION, AttentionWeights, KVCache, DecodeAttention, reference_step, device="cpu") == 0
    assert run_steps(MLA, MLAWeights, LatentCache, DecodeMLA, mla_reference_step, device="cpu") == 0
    assert run_steps(ATTENTION + ATTENTION, AttentionWeights, KVCache, DecodeAttention, _off(reference_step),
                     device="cpu") == 2
    assert run_steps(MLA, MLAWeights, LatentCache, DecodeMLA, _off(mla_reference_step), device="cpu") == 1
    printed = capsys.readouterr().out
    assert printed.count("rel err") == 5 and "positions [3, 0] torch.float16" in printed


def test_the_command_line_names_one_group_or_none_and_anything_else_leaves_with_the_groups():
    groups = ("steps", "handoff")
    assert chosen_group(groups, ["sanitize_fused.py"]) is None
    assert chosen_group(groups, ["sanitize_fused.py", "handoff"]) == "handoff"
    for argv in (["sanitize_fused.py", "hand"], ["sanitize_fused.py", "steps", "handoff"]):
        with pytest.raises(SystemExit, match=r"usage: python sanitize_fused.py \[steps \| handoff\], got"):
            chosen_group(groups, argv)
