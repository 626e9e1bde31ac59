"""``clusterlab.models``: tiny random Llama / Mistral / Qwen2 checkpoints written by transformers, read back
and decoded with the fused layer (on the simulator here), checked against transformers itself.

The checkpoints: Llama float16 (one file; GQA, 4 query heads on 2 KV heads), the same as MHA (4
KV heads), Llama 3 RoPE scaling + ``attention_bias`` in bfloat16 saved in shards (an index file),
Mistral (no sliding window, RoPE theta 1e6) float16, Qwen2 (QKV bias, tied embeddings) float16.
head_dim is 64 (the fused kernel takes 64 or 128), everything else tiny, so the simulator's steps
stay fast. Decoding runs NEW_TOKENS = 8 steps.

Weights are redrawn at a trained model's scale (projections std ``1/sqrt(fan_in)``, unit
embeddings, gains around 1, lm_head x3): transformers' own init (std 0.02) gives near-flat
logits whose near-ties would make greedy tokens a coin toss. Every greedy comparison also
checks that transformers' top-2 logit gap at each step is well above the logit error.

Tolerance of the logits: transformers and we round to the model dtype at the same points
(matmul outputs, adds, RMSNorm), but not identically (our attention and RoPE run in float32), so
the logits differ by a few units of the dtype's rounding: float16 (2**-11 ~ 5e-4) measured ~1e-3
relative, bfloat16 (2**-8 ~ 4e-3) ~1e-2. LOGIT_TOLERANCE leaves about 3x headroom.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from clusterlab import HopperRequired
from clusterlab.fused import PRESETS, Llama3RopeScaling, plan
from clusterlab.gpu import hopper_problem
from clusterlab.models import (
    FUSED_MLP_MAX_BATCH,
    MODEL_PRESETS,
    Decoder,
    LlamaModel,
    ModelConfig,
    checkpoint_eos,
    fused_mlp_max_batch,
    load_weights,
    random,
    random_weights,
    to_transformers,
)
from clusterlab.models.decode import capture_lengths

transformers = pytest.importorskip("transformers", reason="the cross-check needs transformers (the test extra)")

LOGIT_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
#: transformers' top-2 logit gap at every greedy step must exceed this (logits are ~O(10) here), and
#: our logits must be within half of it of transformers' elementwise: then a greedy token cannot flip.
MIN_GAP = {torch.float16: 0.1, torch.bfloat16: 0.25}

SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=97, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

#: name: (config class, model class, dtype, extra config, save kwargs, weight seed). The seeds were
#: picked (out of 1..39) for top-2 gaps above 1.5 x MIN_GAP at every greedy step of PROMPTS.
CHECKPOINTS = {
    "llama-fp16": ("LlamaConfig", "LlamaForCausalLM", torch.float16, {}, {}, 9),
    "llama-mha-fp16": ("LlamaConfig", "LlamaForCausalLM", torch.float16, dict(num_key_value_heads=4), {}, 11),
    "llama3-bias-bf16-sharded": (
        "LlamaConfig", "LlamaForCausalLM", torch.bfloat16,
        dict(attention_bias=True, rms_norm_eps=1e-5, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        dict(max_shard_size="40KB"), 4,
    ),
    "mistral-fp16": ("MistralConfig", "MistralForCausalLM", torch.float16,
                     dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), {}, 7),
    "qwen2-fp16-tied": ("Qwen2Config", "Qwen2ForCausalLM", torch.float16,
                        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                        {}, 1),
}

#: A ragged batch.
PROMPTS = [[5, 17, 3, 88, 42, 9, 1], [60, 2, 33]]
NEW_TOKENS = 8


def rescale_(model, seed: int) -> None:
    """Redraw every parameter at a trained model's scale (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            elif p.dim() == 2:
                p.copy_(noise * p.shape[1] ** -0.5 * (3.0 if name == "lm_head.weight" else 1.0))
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:  # norm gains
                p.copy_(1.0 + 0.1 * noise)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """``(name, directory, transformers model in its dtype, dtype)``."""
    name = request.param
    config_class, model_class, dtype, extra, save, seed = CHECKPOINTS[name]
    config = getattr(transformers, config_class)(**{**SHAPES, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    rescale_(model, seed)
    model = model.to(dtype).eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, safe_serialization=True, **save)
    return name, directory, model, dtype


@pytest.fixture(scope="module")
def ours(checkpoint):
    return LlamaModel.from_pretrained(checkpoint[1])


def relative(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def test_checkpoints_cover_single_file_shards_and_ties(checkpoint):
    name, directory, _, dtype = checkpoint
    sharded = (directory / "model.safetensors.index.json").is_file()
    assert sharded == ("sharded" in name)
    config = ModelConfig.from_pretrained(directory)
    assert config.num_key_value_heads == (4 if "mha" in name else 2)  # MHA, else GQA: 2 query heads a KV head
    assert config.dtype == str(dtype).removeprefix("torch.")
    assert config.tie_word_embeddings == ("tied" in name)
    if "llama3" in name:
        assert config.rope_scaling is not None and config.rope_scaling.original_max_position == 16
        assert config.attention().rope_theta == 500000.0 and config.o_bias
        assert config.rms_norm_eps == config.attention().rms_eps == 1e-5  # the checkpoint's, not a default
    if "qwen2" in name:
        assert config.attention().qkv_bias and not config.o_bias and config.rms_norm_eps == 1e-6


def test_loaded_weights_equal_transformers_state_dict(checkpoint, ours):
    _, _, model, dtype = checkpoint
    sd = model.state_dict()
    w = ours.weights
    assert w.embed.dtype == dtype
    assert torch.equal(w.embed, sd["model.embed_tokens.weight"])
    assert torch.equal(w.norm, sd["model.norm.weight"])
    assert torch.equal(w.lm_head, sd["lm_head.weight"])
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        qkv = [sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        assert torch.equal(layer.attention.qkv, torch.cat(qkv))
        if ours.config.attention_bias:
            assert torch.equal(layer.attention.qkv_bias, torch.cat([sd[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"]))
        else:
            assert layer.attention.qkv_bias is None
        assert (layer.o_bias is None) == (f"{p}self_attn.o_proj.bias" not in sd)
        if layer.o_bias is not None:
            assert torch.equal(layer.o_bias, sd[f"{p}self_attn.o_proj.bias"])
        assert torch.equal(layer.attention.o, sd[f"{p}self_attn.o_proj.weight"])
        assert torch.equal(layer.attention.norm, sd[f"{p}input_layernorm.weight"])
        assert torch.equal(layer.post_norm, sd[f"{p}post_attention_layernorm.weight"])
        for ours_w, x in ((layer.gate, "gate"), (layer.up, "up"), (layer.down, "down")):
            assert torch.equal(ours_w, sd[f"{p}mlp.{x}_proj.weight"])


def test_load_casts_to_the_requested_dtype(checkpoint):
    _, directory, model, dtype = checkpoint
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    config = ModelConfig.from_pretrained(directory)
    weights = load_weights(directory, config, other)
    assert weights.embed.dtype == other
    assert torch.equal(weights.embed, model.state_dict()["model.embed_tokens.weight"].to(other))


def test_prefill_logits_and_cache_match_transformers(checkpoint, ours):
    _, _, model, dtype = checkpoint
    logits, positions = ours.prefill(PROMPTS, capacity=16)
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPTS), 97)
    assert positions.tolist() == [len(p) for p in PROMPTS] and positions.dtype == torch.int32
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
        assert relative(logits[b], out.logits[0, -1]) < LOGIT_TOLERANCE[dtype], b
        for layer, cache in enumerate(ours.caches):
            want = out.past_key_values.layers[layer]
            n = len(prompt)
            assert relative(cache.k[b, :, :n], want.keys[0]) < LOGIT_TOLERANCE[dtype], (b, layer)
            assert relative(cache.v[b, :, :n], want.values[0]) < LOGIT_TOLERANCE[dtype], (b, layer)
            assert cache.k[b, :, n:].isnan().all()  # nothing past the prompt written


def hf_greedy(model, prompt, new_tokens, min_gap):
    """transformers' greedy ids and raw logits ``[new_tokens, vocab]`` of one prompt."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    ids = out.sequences[0, len(prompt):].tolist()
    logits = torch.cat(out.logits).float()
    gaps = [float(g[0] - g[1]) for g in logits.topk(2, dim=-1).values]
    assert min(gaps) > min_gap, f"near-tie in transformers' greedy logits {gaps}: pick another seed"
    return ids, logits


def test_decode_steps_and_greedy_generate_match_transformers(checkpoint, ours):
    _, _, model, dtype = checkpoint
    want = [hf_greedy(model, p, NEW_TOKENS, MIN_GAP[dtype]) for p in PROMPTS]
    # decode_step on a ragged batch, fed transformers' own tokens: its logits step by step
    logits, positions = ours.prefill(PROMPTS, capacity=16)
    for step in range(NEW_TOKENS):
        for b in range(len(PROMPTS)):
            assert relative(logits[b], want[b][1][step]) < LOGIT_TOLERANCE[dtype], (b, step)
            assert (logits[b] - want[b][1][step]).abs().max() < MIN_GAP[dtype] / 2, (b, step)
        if step + 1 < NEW_TOKENS:
            logits = ours.decode_step([ids[step] for ids, _ in want], positions)
            positions += 1
    # and generate's greedy tokens
    assert ours.generate(PROMPTS, NEW_TOKENS) == [ids for ids, _ in want]


def test_one_sequence_decodes_through_the_fused_mlp_like_transformers(checkpoint, ours):
    """Batch 1 runs the MLP block as DecodeMLP too (on the simulator here): logits step by step."""
    _, _, model, dtype = checkpoint
    assert ours.mlp == "fused" and len(ours.mlps) == ours.config.num_hidden_layers
    assert ours.mlps[0].backend == "simulator" and fused_mlp_max_batch(ours.config) == 1  # a shape not measured
    ids, want = hf_greedy(model, PROMPTS[1], NEW_TOKENS, MIN_GAP[dtype])
    logits, positions = ours.prefill([PROMPTS[1]], capacity=16)
    for step in range(NEW_TOKENS):
        assert relative(logits[0], want[step]) < LOGIT_TOLERANCE[dtype], step
        if step + 1 < NEW_TOKENS:
            logits = ours.decode_step([ids[step]], positions)
            positions += 1


def test_a_batch_decodes_through_the_fused_mlp_where_its_shape_allows(checkpoint, ours, monkeypatch):
    """With the tiny shape listed for two sequences, a ragged batch of two runs DecodeMLP (on the
    simulator here; through its hand-off where the model hands the blocks' outputs on) and its
    logits still follow transformers' step by step."""
    _, _, model, dtype = checkpoint
    shape = (ours.config.hidden_size, ours.config.intermediate_size)
    monkeypatch.setitem(FUSED_MLP_MAX_BATCH, shape, 2)
    batches = []
    for name in ("__call__", "handoff"):
        original = getattr(type(ours.mlps[0]), name)

        def counted(self, hidden, *args, original=original, **kwargs):
            batches.append(hidden.shape[0])
            return original(self, hidden, *args, **kwargs)

        monkeypatch.setattr(type(ours.mlps[0]), name, counted)
    prompts = PROMPTS[:2]
    want = [hf_greedy(model, p, NEW_TOKENS, MIN_GAP[dtype]) for p in prompts]
    logits, positions = ours.prefill(prompts, capacity=16)
    for step in range(NEW_TOKENS):
        for b in range(len(prompts)):
            assert relative(logits[b], want[b][1][step]) < LOGIT_TOLERANCE[dtype], (b, step)
        if step + 1 < NEW_TOKENS:
            logits = ours.decode_step([ids[step] for ids, _ in want], positions)
            positions += 1
    assert batches == [2] * ((NEW_TOKENS - 1) * ours.config.num_hidden_layers)


def lockstep(models, prompts, steps, capacity=16):
    """Prefill every model with ``prompts``, then ``steps`` decode steps of each, all fed the first
    model's greedy tokens: yields each step's logits, one tensor a model."""
    first, positions = models[0].prefill(prompts, capacity=capacity)
    for model in models[1:]:
        model.prefill(prompts, capacity=capacity)
    tokens = first.argmax(-1)
    for _ in range(steps):
        logits = [model.decode_step(tokens, positions) for model in models]
        yield logits
        tokens, positions = logits[0].argmax(-1), positions + 1


def random_prompts(config, lengths):
    """One prompt of random token ids a length, drawn from a fresh seed."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("batch", [1, 2])
def test_handoff_steps_decode_as_the_plain_steps(checkpoint, ours, monkeypatch, batch):
    """Where every block is fused the model hands the blocks' outputs on as float32 sums through
    three buffers in turn (on the simulator here): the logits are the plain steps', the buffers
    zero again after each step; a batch beyond the fused MLP's, and a model whose attention adds
    an output bias after the block, take the plain steps."""
    shape = (ours.config.hidden_size, ours.config.intermediate_size)
    monkeypatch.setitem(FUSED_MLP_MAX_BATCH, shape, 2 if batch == 2 else 1)
    plain = LlamaModel(ours.config, ours.weights, handoff=False)
    assert ours.handoff == (not ours.config.o_bias) and not plain.handoff
    assert not LlamaModel(ours.config, ours.weights, mlp="unfused").handoff
    calls = []
    original = type(ours.mlps[0]).handoff
    monkeypatch.setattr(type(ours.mlps[0]), "handoff", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for want, got in lockstep([plain, ours], PROMPTS[:batch], 3):
        assert torch.equal(got, want)
        assert not ours._sums.any()
    assert len(calls) == 3 * ours.config.num_hidden_layers * ours.handoff
    if batch == 2:  # beyond the fused MLP's batches: the plain steps
        monkeypatch.setitem(FUSED_MLP_MAX_BATCH, shape, 1)
        calls.clear()
        logits, positions = ours.prefill(PROMPTS[:batch], capacity=16)
        ours.decode_step(logits.argmax(-1), positions)
        assert not calls


def test_fused_mlp_batches_follow_the_h200_measurement():
    assert {name: fused_mlp_max_batch(config) for name, config in MODEL_PRESETS.items()} == {
        "llama2-7b": 8, "llama3-8b": 8, "llama3.2-1b": 8, "qwen2.5-7b": 4}


def test_generate_stops_each_sequence_at_eos(ours):
    greedy = ours.generate(PROMPTS, 4)
    candidates = [t for t in greedy[0] if t not in greedy[1]]
    assert candidates, f"no token of {greedy[0]} is missing from {greedy[1]}: pick other prompts"
    eos = candidates[-1]
    got = ours.generate(PROMPTS, 4, eos_token_id=[eos, 96])
    assert got == [greedy[0][: greedy[0].index(eos) + 1], greedy[1]]


def test_unfused_attention_decodes_like_the_fused_layer(checkpoint, ours):
    _, directory, _, dtype = checkpoint
    unfused = LlamaModel(ours.config, ours.weights, attention="unfused")
    assert not unfused.layers and not unfused.on_simulator and ours.on_simulator
    for want, got in lockstep([ours, unfused], PROMPTS, 3):
        assert relative(got, want) < LOGIT_TOLERANCE[dtype]
    assert unfused.generate(PROMPTS, NEW_TOKENS) == ours.generate(PROMPTS, NEW_TOKENS)


# -- on a Hopper GPU: the cluster kernel, one CUDA graph per token -------------------------------------


@pytest.mark.gpu
def test_graph_decode_on_the_gpu_matches_transformers_greedy(checkpoint):
    _, directory, model, dtype = checkpoint
    want = [hf_greedy(model, p, NEW_TOKENS, MIN_GAP[dtype])[0] for p in PROMPTS]
    gpu = LlamaModel.from_pretrained(directory, device="cuda")
    assert gpu.generate(PROMPTS, NEW_TOKENS) == want
    assert gpu.last_stats["decode_steps"] == NEW_TOKENS - 1
    # the eager loop (no graph) gives the same tokens, and so does the unfused model's graph
    logits, positions = gpu.prefill(PROMPTS, capacity=16)
    eager = Decoder(gpu, NEW_TOKENS, graph=False)
    eager.start(logits, positions)
    eager.run()
    assert eager.new_tokens() == want
    unfused = LlamaModel(gpu.config, gpu.weights, attention="unfused")
    assert unfused.generate(PROMPTS, NEW_TOKENS) == want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_across_the_long_cache_shape_matches_transformers_greedy(checkpoint, monkeypatch, device):
    """LONG_CACHE and SHARED_QUERIES_ROWS lowered into the run: the decoder tells each step its length, so
    the steps from there on take the long-cache launch shape or the shared split (a GQA checkpoint's shapes
    differ; on a GPU each shape replays a graph of its own), and the tokens stay transformers' greedy ones."""
    _, directory, model, dtype = checkpoint
    want = [hf_greedy(model, p, NEW_TOKENS, MIN_GAP[dtype])[0] for p in PROMPTS]
    long = (max(map(len, PROMPTS)) + 4,) * len(plan.LONG_CACHE)
    monkeypatch.setattr(plan, "LONG_CACHE", long)
    monkeypatch.setattr(plan, "SHARED_QUERIES_ROWS", long)
    ours = LlamaModel.from_pretrained(directory, device=device)
    batch, first = len(PROMPTS), max(map(len, PROMPTS)) + 1
    gqa = ours.config.num_key_value_heads < ours.config.num_attention_heads
    assert (ours.step_shape(batch, first) != ours.step_shape(batch, first + NEW_TOKENS - 2)) == gqa
    assert ours.generate(PROMPTS, NEW_TOKENS) == want


@pytest.mark.gpu
def test_graph_sampling_repeats_with_a_seed_and_stops_at_eos(llama_dir):
    model = LlamaModel.from_pretrained(llama_dir, device="cuda")
    first = model.generate(PROMPTS, 6, temperature=1.5, seed=7)
    assert model.generate(PROMPTS, 6, temperature=1.5, seed=7) == first
    assert model.generate(PROMPTS, 6, temperature=1.5, top_k=1, seed=3) == model.generate(PROMPTS, 6)
    assert {len(ids) for ids in first} == {6}
    eos = first[0][2]
    got = model.generate(PROMPTS, 6, temperature=1.5, seed=7, eos_token_id=eos)
    assert got[0] == first[0][: first[0].index(eos) + 1]


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama3.2-1b", "qwen2.5-7b"])
def test_random_model_fused_and_unfused_steps_agree(preset):
    """Real shapes on the GPU: the fused model's logits against the unfused one's (the same
    weights, fed the same tokens) over a ragged batch, step after step; then a graph-replayed
    generate. float16 throughout (rounding 2**-11 per op, over 16-28 layers): 1e-2 relative allowed."""
    fused = random(preset, torch.float16, "cuda", seed=11)
    unfused = LlamaModel(fused.config, fused.weights, attention="unfused")
    prompts = random_prompts(fused.config, (5, 61, 23))
    for step, (got, want) in enumerate(lockstep([fused, unfused], prompts, 4, capacity=80)):
        assert relative(got, want) < 1e-2, step
    new = fused.generate(prompts, 7)
    assert [len(ids) for ids in new] == [7, 7, 7] and fused.last_stats["decode_steps"] == 6


@pytest.mark.gpu
@pytest.mark.parametrize("preset, lengths", [("llama3.2-1b", (5, 61, 23)), ("llama3-8b", (40,))])
def test_handoff_steps_on_the_gpu_decode_as_the_plain_steps(preset, lengths):
    """The kernels' float32 hand-off against the plain steps (each kernel converting its output),
    same weights and tokens, a batch the fused MLP takes: the logits agree within float16's 1e-2
    (the two runs' float32 additions run in orders no two launches share, and a value that rounds
    the other way in one of the 32-64 blocks carries on: 2.1e-3 measured on Llama-3-8B; a buffer
    out of turn would leave nothing alike), the three buffers are zero after every step, and a
    graph-replayed generate runs through the hand-off."""
    handoff = random(preset, torch.float16, "cuda", seed=13)
    plain = LlamaModel(handoff.config, handoff.weights, handoff=False)
    assert handoff.handoff and len(lengths) <= fused_mlp_max_batch(handoff.config)
    prompts = random_prompts(handoff.config, lengths)
    for step, (want, got) in enumerate(lockstep([plain, handoff], prompts, 4, capacity=80)):
        assert relative(got, want) < 1e-2, (step, relative(got, want))
        assert not handoff._sums.any(), step
    new = handoff.generate(prompts, 5)
    assert [len(ids) for ids in new] == [5] * len(lengths) and not handoff._sums.any()


@pytest.mark.gpu
def test_llama3_8b_shape_decodes_like_transformers_for_16_steps():
    """The Llama-3-8B shape with random weights on the GPU, 4 prompts of different lengths decoded
    together (the fused kernel per layer) against transformers' own LlamaForCausalLM over the same
    weights (:func:`to_transformers`), run one sequence at a time with its own cache and fed the
    same tokens: the logits of the prefill and of each of 16 steps. float16 through 32 layers (each
    op rounds to 2**-11): 1e-2 relative allowed."""
    model = random("llama3-8b", torch.float16, "cuda", seed=5)
    hf = to_transformers(model)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 50, 17, 120)]
    logits, positions = model.prefill(prompts, capacity=160)
    with torch.no_grad():
        runs = [hf(torch.tensor([p], device="cuda"), use_cache=True) for p in prompts]
        for step in range(17):
            for b, run in enumerate(runs):
                assert relative(logits[b], run.logits[0, -1]) < 1e-2, (step, b)
            if step == 16:
                break
            tokens = logits.argmax(-1)
            runs = [hf(tokens[b].view(1, 1), past_key_values=run.past_key_values, use_cache=True)
                    for b, run in enumerate(runs)]
            logits = model.forward_step(tokens, positions)
            positions += 1


@pytest.mark.gpu
def test_llama3_8b_shape_one_sequence_with_the_fused_mlp_decodes_like_transformers():
    """Batch 1, where both blocks of every layer are cluster kernels (DecodeAttention, DecodeMLP):
    the logits of 8 graph-free steps against transformers' LlamaForCausalLM over the same weights.
    float16 through 32 layers: 1e-2 relative allowed."""
    model = random("llama3-8b", torch.float16, "cuda", seed=7)
    assert model.mlp == "fused" and not model.on_simulator
    hf = to_transformers(model)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(0, model.config.vocab_size, (41,), generator=gen).tolist()
    logits, positions = model.prefill([prompt], capacity=64)
    with torch.no_grad():
        run = hf(torch.tensor([prompt], device="cuda"), use_cache=True)
        for step in range(9):
            assert relative(logits[0], run.logits[0, -1]) < 1e-2, step
            if step == 8:
                break
            token = logits.argmax(-1)
            run = hf(token.view(1, 1), past_key_values=run.past_key_values, use_cache=True)
            logits = model.forward_step(token, positions)
            positions += 1


def weight_storages(weights) -> set[int]:
    """The storage addresses of every weight tensor of ``weights``."""
    tensors = [weights.embed, weights.norm, weights.lm_head]
    for layer in weights.layers:
        a = layer.attention
        tensors += [a.norm, a.qkv, a.qkv_bias, a.o, layer.o_bias, layer.post_norm, layer.gate, layer.up, layer.down]
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=97)


def test_to_transformers_without_transformers_says_where_it_comes_from(monkeypatch):
    model = LlamaModel(ModelConfig(**TINY), random_weights(ModelConfig(**TINY), torch.float16, seed=1))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"to_transformers needs transformers, .*pip install 'clusterlab\[test\]'"):
        to_transformers(model)


@pytest.mark.parametrize(
    "changes",
    [dict(tie_word_embeddings=True, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)),
     dict(attention_bias=True, o_bias=True),
     dict(model_type="qwen2", attention_bias=True, rope_theta=1e6),
     dict(model_type="mistral", rope_theta=1e6)],
    ids=["llama3-rope-tied", "llama-bias", "qwen2", "mistral"],
)
def test_to_transformers_holds_views_of_our_weights_and_computes_our_logits(changes):
    config = ModelConfig(**(TINY | changes))
    ours = LlamaModel(config, random_weights(config, torch.float16, seed=2))
    hf = to_transformers(ours)
    classes = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert type(hf).__name__ == classes[config.model_type]
    params = dict(hf.named_parameters(remove_duplicate=False))
    storages = weight_storages(ours.weights)
    assert {name for name, p in params.items() if p.untyped_storage().data_ptr() not in storages} == set()
    k_proj = params["model.layers.1.self_attn.k_proj.weight"]
    assert k_proj.data_ptr() == ours.weights.layers[1].attention.qkv[256:].data_ptr()  # a row slice, no copy
    assert params["lm_head.weight"].data_ptr() == ours.weights.lm_head.data_ptr()
    assert ("model.layers.0.self_attn.o_proj.bias" in params) == config.o_bias
    assert not any(b.is_meta for b in hf.buffers())
    prompt = [5, 17, 3, 88, 42, 9, 1, 60, 2]
    want, _ = ours.prefill([prompt], capacity=16)
    with torch.no_grad():
        got = hf(torch.tensor([prompt])).logits[0, -1].float()
    assert relative(got, want[0]) < LOGIT_TOLERANCE[torch.float16]


# -- the decode loop and random models ---------------------------------------------------------------


def test_decoder_refuses_steps_before_start_and_past_max_new_tokens(ours):
    logits, positions = ours.prefill(PROMPTS, capacity=16)
    decoder = Decoder(ours, 2)
    with pytest.raises(ValueError, match="call start"):
        decoder.step()
    decoder.start(logits, positions)
    decoder.step()
    with pytest.raises(ValueError, match="max_new_tokens=2"):
        decoder.step()
    assert [len(ids) for ids in decoder.new_tokens()] == [2, 2]
    with pytest.raises(ValueError, match="graph=True needs the model on a CUDA device"):
        Decoder(ours, 2, graph=True)
    with pytest.raises(ValueError, match="call prefill"):
        Decoder(LlamaModel(ours.config, ours.weights), 2)


def test_decoder_start_checks_its_logits_positions_and_the_caches_room(ours):
    """The last step writes cache row max(positions) + max_new_tokens - 2: a run that would pass the
    caches' capacity is refused at start (a replayed graph could not say so), as are logits or
    positions of another shape, dtype or type, and positions below 0."""
    longest = max(map(len, PROMPTS))
    logits, positions = ours.prefill(PROMPTS, capacity=longest + 4)
    with pytest.raises(ValueError, match=rf"max_new_tokens=7 write cache rows up to {longest + 5}, but the caches "
                                         rf"hold rows 0..{longest + 3}"):
        Decoder(ours, 7).start(logits, positions)
    with pytest.raises(ValueError, match=rf"write cache rows up to {longest + 4}, but"):  # one row past the last
        Decoder(ours, 6).start(logits, positions)
    decoder = Decoder(ours, 5)
    with pytest.raises(ValueError, match=r"logits has shape \(2, 50\); expected \(2, 97\)"):
        decoder.start(logits[:, :50].contiguous(), positions)
    with pytest.raises(TypeError, match="positions must be a torch.Tensor, got list"):
        decoder.start(logits, positions.tolist())
    with pytest.raises(TypeError, match="positions has dtype torch.int64; expected torch.int32"):
        decoder.start(logits, positions.long())
    negative = positions.clone()
    negative[0] = -1
    with pytest.raises(ValueError, match=r"positions must be >= 0, got \[-1, "):
        decoder.start(logits, negative)
    decoder.start(logits, positions)  # rows up to longest + 3: room for 5 tokens
    decoder.run()
    assert [len(ids) for ids in decoder.new_tokens()] == [5, 5]


def test_the_decoder_tells_each_step_how_long_its_longest_cache_is(ours, monkeypatch):
    """The host counts the rows the longest sequence attends to (its prompt, then one more a step)
    and hands them to every step, without reading the positions again."""
    seen = []
    forward_step = ours.forward_step
    monkeypatch.setattr(ours, "forward_step", lambda *args: seen.append(args[2]) or forward_step(*args))
    logits, positions = ours.prefill(PROMPTS, capacity=16)
    decoder = Decoder(ours, 5)
    decoder.start(logits, positions)
    decoder.run()
    longest = max(map(len, PROMPTS)) + 1  # the first step attends to the prompt and its new token
    assert seen == [longest, longest + 1, longest + 2, longest + 3]


@pytest.mark.parametrize("batch, first, last", [(8, 1000, 20000), (4, 4096, 16384), (3, 100, 9000), (8, 5000, 6000),
                                               (2, 1000, 20000)])
def test_a_run_captures_a_graph_for_every_launch_shape_it_meets(batch, first, last):
    """The decoder's capture lengths name every step (the shared split or not, launch shape, sets) the
    run takes, for the GQA presets, whose steps change with the length: every length from first to
    last has the step of one of them, and each after the first a step new to one preset at least
    (Qwen2.5-7B's batch 2 shares out its queries from 4K, Llama-3-8B's takes its long-cache shape at
    8K, its batch 8 leaves clusters of 8 for clusters of 16 at 2K)."""
    lengths = capture_lengths(batch, first, last)
    assert lengths[0] == first and all(first < n <= last for n in lengths[1:])
    configs = (PRESETS["llama3-8b"], PRESETS["llama3.2-1b"], PRESETS["qwen2.5-7b"])

    def step(config, longest):
        return (plan.shares_queries(config, batch, longest), plan.launch_shape(config, batch, 132, longest=longest),
                plan.batch_sets(config, batch, longest))

    assert all(any(step(c, n) != step(c, before) for c in configs) for before, n in zip(lengths, lengths[1:]))
    for config in configs:
        captured = {step(config, n) for n in lengths}
        assert all(step(config, n) in captured for n in range(first, last + 1))


def test_model_presets_use_the_fused_presets_attention():
    assert set(MODEL_PRESETS) == set(PRESETS)
    for name, config in MODEL_PRESETS.items():
        assert config.attention() == PRESETS[name], name
    assert MODEL_PRESETS["llama3.2-1b"].tie_word_embeddings and MODEL_PRESETS["qwen2.5-7b"].attention_bias
    with pytest.raises(ValueError, match="preset must be one of"):
        random("llama-9b")


def test_random_weights_have_the_config_shapes_and_repeat_with_a_seed():
    tiny = ModelConfig(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                       rope_theta=1e6, vocab_size=50, attention_bias=True, tie_word_embeddings=True)
    a = random_weights(tiny, torch.bfloat16, seed=5)
    b = random_weights(tiny, torch.bfloat16, seed=5)
    c = random_weights(tiny, torch.bfloat16, seed=6)
    assert a.lm_head is a.embed and a.embed.shape == (50, 64) and a.embed.dtype == torch.bfloat16
    assert a.layers[0].attention.qkv.shape == (4 * 64 + 2 * 2 * 64, 64) and a.layers[1].down.shape == (64, 96)
    assert a.layers[0].attention.qkv_bias.shape == (512,) and a.layers[0].o_bias is None
    assert torch.equal(a.layers[1].up, b.layers[1].up) and not torch.equal(a.layers[1].up, c.layers[1].up)
    assert all(w.count_nonzero() == w.numel() for w in (a.embed, a.layers[0].gate, a.layers[0].attention.qkv_bias))
    model = LlamaModel(tiny, a)
    assert len(model.generate([[1, 2, 3]], 3)[0]) == 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(**SHAPES)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    rescale_(model, seed=4)
    directory = tmp_path_factory.mktemp("llama-plain")
    model.to(torch.float16).save_pretrained(directory, safe_serialization=True)
    return directory


def test_sampling_with_a_seed_repeats_another_seed_differs_and_top_k_1_is_greedy(llama_dir):
    model = LlamaModel.from_pretrained(llama_dir)
    prompts = [PROMPTS[1]]
    first = model.generate(prompts, 12, temperature=1.5, seed=7)
    assert model.generate(prompts, 12, temperature=1.5, seed=7) == first
    # 12 draws from the tiny model's spread-out distributions: two seeds, or a seed and the argmax, agreeing on
    # all of them would be a chance far below 1e-9
    assert model.generate(prompts, 12, temperature=1.5, seed=8) != first != model.generate(prompts, 12)
    assert model.generate(prompts, 3, temperature=1.5, top_k=1, seed=3) == model.generate(prompts, 3)


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, None), (1.0, 3)])
def test_sampling_picks_each_token_as_often_as_the_softmax_of_the_scaled_logits(llama_dir, temperature, top_k):
    """The sampling race (``Decoder.scores``, then the argmax) picks token i with the probability
    softmax(logits / T)_i over the ``top_k`` likeliest, none outside them: 40,000 draws on fresh
    logits of 10 tokens, each frequency within 5 standard deviations of its probability."""
    model = LlamaModel.from_pretrained(llama_dir)
    model.prefill(PROMPTS, capacity=16)
    decoder = Decoder(model, 2, temperature=temperature, top_k=top_k)
    decoder.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    logits = torch.randn(10) * 2
    want = torch.softmax(logits.double() / temperature, -1)
    if top_k is not None:
        want[want < want.topk(top_k).values[-1]] = 0
        want /= want.sum()
    draws = 40_000
    picks = decoder.scores(logits.expand(draws, -1).contiguous()).argmax(-1)
    got = torch.bincount(picks, minlength=10).double() / draws
    assert (got[want == 0] == 0).all()
    assert ((got - want).abs() <= 5 * (want * (1 - want) / draws).sqrt() + 1e-9).all(), (got, want)


# -- directories that are not a supported model ------------------------------------------------------


def edited(llama_dir, tmp_path, **changes):
    """A copy of ``llama_dir`` with ``config.json`` keys changed (None: removed)."""
    directory = tmp_path / "model"
    shutil.copytree(llama_dir, directory)
    raw = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(model_type="mistral", sliding_window=4096), r"sliding_window 4096 is not supported \(every layer attends to "
                                                      r"all tokens\); a Mistral checkpoint without one"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_type 'yarn'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(head_dim=32), "head_dim must be one of"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3 RoPE scaling has no"),
    (dict(vocab_size=None), "no 'vocab_size'"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int, got 0"),
    (dict(num_hidden_layers="2"), "num_hidden_layers must be a positive int, got '2'"),
    (dict(intermediate_size=128.0), "intermediate_size must be a positive int, got 128.0"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a positive number, got '1e-6'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta must be a positive number"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}),
     r"a quantized checkpoint \(quantization_config, 'fp8'\) is not supported"),
    (dict(intermediate_size=100), r"the fused MLP cannot run this model: .*\(100\) must be multiples of 8"),
    (dict(intermediate_size=8 * 1009), r"the fused MLP cannot run this model on 132 SMs: hidden_size 64 and "
                                       r"intermediate_size 8072 have no split"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive int, got 0"),
    (dict(head_dim=0), "head_dim must be a positive int, got 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(attention_bias=1), "attention_bias must be true or false, got 1"),
    (dict(rope_parameters=None, rope_scaling="linear"), "rope_scaling must be an object, got 'linear'"),
    (dict(rope_parameters={**LLAMA3_ROPE, "factor": None}), "llama3 RoPE scaling has no 'factor'"),
    (dict(rope_parameters={**LLAMA3_ROPE, "factor": "x"}), "llama3 RoPE scaling's factor must be a positive number, "
                                                           "got 'x'"),
    (dict(rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 16.7}),
     "original_max_position_embeddings must be a positive int, got 16.7"),
    (dict(rope_parameters={**LLAMA3_ROPE, "factor": 0.5}), "config.json: llama3 RoPE scaling: .*factor"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive int, got 0"),
    (dict(max_position_embeddings=2048.0), "max_position_embeddings must be a positive int, got 2048.0"),
    (dict(use_sliding_window=True), r"use_sliding_window is not supported \(every layer attends to all tokens\)"),
    (dict(pretraining_tp=2), "pretraining_tp 2 is not supported; only 1"),
    (dict(rope_parameters=[1e4]), r"config.json: rope_parameters must be an object, got \[10000.0\]"),
], ids=["gpt2", "mistral-window", "yarn", "mlp_bias", "gelu", "head_dim", "llama3-incomplete", "no-vocab", "no-layers",
        "text-layers", "float-size", "text-eps", "negative-theta", "fp8", "mlp-rows", "mlp-split", "zero-kv-heads",
        "zero-head-dim", "text-tie", "int-bias", "text-scaling", "null-factor", "text-factor", "float-original",
        "small-factor", "zero-max-positions", "float-max-positions", "sliding-window", "pretraining-tp",
        "list-rope"])
def test_unsupported_configs_raise_naming_the_problem(llama_dir, tmp_path, changes, message):
    """Each is refused from ``config.json`` before any weight is read (the weights here keep the
    checkpoint's shapes, so a later check would fail on them instead)."""
    with pytest.raises(ValueError, match=message):
        LlamaModel.from_pretrained(edited(llama_dir, tmp_path, **changes))


def test_generating_past_max_position_embeddings_warns(llama_dir, tmp_path):
    """The positions a model was trained for are read; generating past them warns (its tokens are an
    extrapolation) and still generates, and a config without the key never warns."""
    assert LlamaModel.from_pretrained(llama_dir).config.max_position_embeddings == SHAPES["max_position_embeddings"]
    model = LlamaModel.from_pretrained(edited(llama_dir, tmp_path, max_position_embeddings=12))
    prompt = list(range(1, 11))  # 10 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        within = model.generate([prompt], 2)  # 12 positions
    past_it = r"max_new_tokens=3 reach 13 positions, past max_position_embeddings=12"
    with pytest.warns(UserWarning, match=past_it) as told:
        past = model.generate([prompt], 3)
    assert told[0].filename == __file__  # the caller's line, not the library's
    assert past[0][:2] == within[0] and len(past[0]) == 3
    unbounded = LlamaModel.from_pretrained(edited(llama_dir, tmp_path / "none", max_position_embeddings=None))
    assert unbounded.config.max_position_embeddings is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unbounded.generate([prompt], 3)


def test_old_style_rope_theta_and_rope_scaling_are_read(llama_dir, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    directory = edited(llama_dir, tmp_path, rope_parameters=None, rope_theta=500000.0, rope_scaling=scaling)
    config = ModelConfig.from_pretrained(directory).attention()
    assert config.rope_theta == 500000.0 and config.rope_scaling.factor == 8.0
    directory = edited(llama_dir, tmp_path / "2", rope_parameters=None, rope_theta=1234.0)
    config = ModelConfig.from_pretrained(directory).attention()
    assert config.rope_theta == 1234.0 and config.rope_scaling is None


def test_missing_files_raise(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        ModelConfig.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    directory = edited(llama_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors or model.safetensors.index.json"):
        LlamaModel.from_pretrained(directory)
    with pytest.raises(TypeError, match=r"directory must be a path \(a str or os.PathLike\), got None"):
        LlamaModel.from_pretrained(None)
    with pytest.raises(ValueError, match=r"device must be a torch.device or its name .*, got 'foo'"):
        LlamaModel.from_pretrained(llama_dir, device="foo")


def _sharded(llama_dir, tmp_path, misplace: str | None = None):
    """``llama_dir``'s tensors in two shards and an index (``misplace``: a tensor the index puts in the
    wrong shard), the single file gone."""
    from safetensors.torch import load_file, save_file

    directory = edited(llama_dir, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, held in shards.items():
        save_file({name: tensors[name] for name in held}, directory / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(held, shard)
    if misplace is not None:
        weight_map[misplace] = next(shard for shard in shards if weight_map[misplace] != shard)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_a_single_file_is_read_before_a_stale_index_beside_it(llama_dir, tmp_path):
    """As transformers reads a directory saved whole over a sharded save: the old index stays, its shards do not."""
    directory = edited(llama_dir, tmp_path)
    stale = {"weight_map": {"model.norm.weight": "model-00007-of-00011.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(stale))
    assert LlamaModel.from_pretrained(directory).generate(PROMPTS, 3) == LlamaModel.from_pretrained(
        llama_dir).generate(PROMPTS, 3)


def test_shards_an_index_lists_are_read_and_a_malformed_index_is_named(llama_dir, tmp_path):
    directory = _sharded(llama_dir, tmp_path / "whole")
    assert LlamaModel.from_pretrained(directory).generate(PROMPTS, 3) == LlamaModel.from_pretrained(
        llama_dir).generate(PROMPTS, 3)
    index = directory / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    assert (directory / shard).is_file() and (directory.parent / shard).exists() is False
    (directory.parent / shard).write_bytes((directory / shard).read_bytes())  # a shard outside is never read
    for weight_map in ([], {"model.norm.weight": None}, {"model.norm.weight": 3}, {"model.norm.weight": ""},
                       {"model.norm.weight": f"../{shard}"}, {"model.norm.weight": str(directory.parent / shard)},
                       {"model.norm.weight": f"sub/{shard}"}, {"model.norm.weight": ".."}, None):
        index.write_text(json.dumps({"weight_map": weight_map} if weight_map is not None else {"metadata": {}}))
        with pytest.raises(ValueError, match="index.json: its weight_map must map tensor names to the names of "
                                             "shard files beside it"):
            LlamaModel.from_pretrained(directory)
    for text, message in (("[]", "expected a JSON object"), ("{", "not valid JSON")):
        index.write_text(text)
        with pytest.raises(ValueError, match=f"index.json: {message}"):
            LlamaModel.from_pretrained(directory)
    directory = _sharded(llama_dir, tmp_path / "misplaced", misplace="model.norm.weight")
    with pytest.raises(ValueError, match=r"00002.safetensors: tensor 'model.norm.weight' cannot be read "
                                         r"\(model.safetensors.index.json places it there\)"):
        LlamaModel.from_pretrained(directory)
    directory = _sharded(llama_dir, tmp_path / "short")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"index.json lists shard 'model-00002-of-00002.safetensors', which is "
                                         r"missing"):
        LlamaModel.from_pretrained(directory)


def test_a_corrupt_safetensors_file_is_named(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        LlamaModel.from_pretrained(directory)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_weights_stored_in_a_quantized_dtype_are_refused_not_cast(llama_dir, tmp_path, dtype):
    """Quantized codes cast to floats (their scales ignored) would decode garbage without a word."""
    from safetensors.torch import load_file, save_file

    directory = edited(llama_dir, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].float().clamp(-1, 1).to(dtype)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' is {dtype}; the weights must be float16, bfloat16, "
                                         "float32 or float64"):
        LlamaModel.from_pretrained(directory)


@pytest.mark.parametrize("value", ["2", 2.0, [2, "x"], -1])
def test_a_checkpoints_malformed_eos_token_id_is_named(llama_dir, tmp_path, value):
    directory = edited(llama_dir, tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
        checkpoint_eos(directory)


def test_generation_config_s_eos_token_id_comes_before_config_json_s(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path, eos_token_id=3)
    assert checkpoint_eos(directory) == [3]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert checkpoint_eos(directory) == [2, 5]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert checkpoint_eos(directory) == [3]  # named nowhere there: config.json's


def test_an_eos_token_id_past_the_vocabulary_is_named_with_its_file(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 96]}))
    assert checkpoint_eos(directory, vocab_size=97) == [2, 96]  # the vocabulary's last id
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 97]}))
    with pytest.raises(ValueError, match=r"eos_token_id \[2, 97\] is past the vocabulary's ids 0..96"):
        checkpoint_eos(directory, vocab_size=97)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 500]}))
    assert checkpoint_eos(directory) == [2, 500]
    message = r"generation_config.json: eos_token_id \[2, 500\] is past the vocabulary's ids 0..96"
    with pytest.raises(ValueError, match=message):
        checkpoint_eos(directory, vocab_size=97)
    with pytest.raises(ValueError, match=r"'.*absent' is not a directory"):
        checkpoint_eos(tmp_path / "absent")
    result = cli("--model", directory, "--prompt-ids", 1, 2)
    assert result.returncode == 2 and result.stdout == ""
    assert re.search(message + "; --ignore-eos decodes without it", result.stderr), result.stderr
    assert cli("--model", directory, "--prompt-ids", 1, 2, "--max-new-tokens", 1, "--ignore-eos").returncode == 0


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[2]", "expected a JSON object")])
def test_an_unreadable_generation_config_is_named_not_passed_over(llama_dir, tmp_path, text, message):
    """transformers refuses it too; passing over it to config.json's eos could stop at another token."""
    directory = edited(llama_dir, tmp_path)
    (directory / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        checkpoint_eos(directory)


def test_float64_weights_and_swish_are_read_as_transformers_reads_them(llama_dir, tmp_path):
    """A float64 checkpoint is cast to the model's dtype (float16 weights widened and read back: the same
    model); ``hidden_act: "swish"`` is transformers' other name of SiLU."""
    from safetensors.torch import load_file, save_file

    directory = edited(llama_dir, tmp_path, hidden_act="swish", torch_dtype="float64", dtype=None)
    tensors = {name: t.double() for name, t in load_file(directory / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    want = LlamaModel.from_pretrained(llama_dir).generate(PROMPTS, 3)
    assert LlamaModel.from_pretrained(directory, dtype=torch.float16).generate(PROMPTS, 3) == want


def test_a_partial_rotary_factor_is_refused(llama_dir, tmp_path):
    """transformers rotates only that share of a head's dims; the fused layer rotates all of them."""
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
        LlamaModel.from_pretrained(edited(llama_dir, tmp_path, partial_rotary_factor=0.5))
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    with pytest.raises(ValueError, match="partial_rotary_factor 0.25 is not supported"):
        LlamaModel.from_pretrained(edited(llama_dir, tmp_path / "2", rope_parameters=rope))
    assert LlamaModel.from_pretrained(edited(llama_dir, tmp_path / "3", partial_rotary_factor=1.0))


def test_a_model_checks_its_options_and_device_before_any_weight(llama_dir, monkeypatch):
    from clusterlab.models import llama

    def never(*args, **kwargs):
        raise AssertionError("weights built or read before the options were checked")

    monkeypatch.setattr(llama, "load_weights", never)
    monkeypatch.setattr(llama, "random_weights", never)
    with pytest.raises(ValueError, match="attention must be one of"):
        random("llama3.2-1b", attention="x")
    with pytest.raises(ValueError, match="backend must be one of .*, got 'tpu'"):
        LlamaModel.from_pretrained(llama_dir, backend="tpu")
    if hopper_problem() is not None:
        with pytest.raises(HopperRequired, match="device 'cuda' needs a Hopper GPU"):
            random("llama3.2-1b", torch.float16, "cuda")
        with pytest.raises(HopperRequired, match="device 'cuda' needs a Hopper GPU"):
            LlamaModel.from_pretrained(llama_dir, device="cuda")


def test_caches_too_large_to_allocate_are_named(llama_dir, monkeypatch):
    from clusterlab.models import llama

    model = LlamaModel.from_pretrained(llama_dir)

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(llama.KVCache, "empty", refuse)
    with pytest.raises(ValueError, match=r"caches of 2 sequences x 1000002 rows x 2 layers need \d+\.\d GB, more than "
                                         r"cpu could allocate \(DefaultCPUAllocator"):
        with pytest.warns(UserWarning, match="past max_position_embeddings=256"):  # told before it allocates
            model.generate([[1, 2], [3]], 10**6)
    assert model.caches is None


def test_a_tiny_temperature_samples_the_likeliest_token(llama_dir):
    """softmax(logits / T) for T -> 0 is the argmax: taken from the row's largest logit, the scaled
    logits cannot overflow to inf (whose softmax is NaN, and a sample of token 0), and a temperature that
    float32 rounds to 0 (1e-46) divides them as float32's least normal number, not as 0 (0 / 0: NaN)."""
    model = LlamaModel.from_pretrained(llama_dir)
    greedy = model.generate(PROMPTS, 3)
    for temperature in (1e-40, 1e-46, 1e-300):
        assert model.generate(PROMPTS, 3, temperature=temperature, seed=5) == greedy, temperature


def test_a_missing_tensor_or_wrong_shape_is_named(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="no tensor 'model.layers.2.self_attn.q_proj.weight'"):
        LlamaModel.from_pretrained(directory)
    directory = edited(llama_dir, tmp_path / "2", intermediate_size=96)
    with pytest.raises(ValueError, match="gate_proj.weight' has shape"):
        LlamaModel.from_pretrained(directory)


@pytest.mark.parametrize("dtype", [torch.float32, "float64", "int8"])
def test_other_dtypes_are_refused(llama_dir, dtype):
    with pytest.raises(ValueError, match="dtype must be float16 or bfloat16"):
        LlamaModel.from_pretrained(llama_dir, dtype=dtype)


def test_bad_generate_arguments_raise(llama_dir):
    model = LlamaModel.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match=r"mlp must be one of .* \(or None: as attention\), got 'cuda'"):
        LlamaModel(model.config, model.weights, mlp="cuda")
    with pytest.raises(TypeError, match="handoff must be True or False, got 1"):
        LlamaModel(model.config, model.weights, handoff=1)
    with pytest.raises(ValueError, match="at most 8"):
        model.generate([[1]] * 9, 2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1], []], 2)
    with pytest.raises(ValueError, match="token ids must be in 0..96"):
        model.generate([[1, 97]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1]], 0)
    with pytest.raises(ValueError, match="call prefill first"):
        model.decode_step([1], [0])
    model.prefill([[1, 2], [3]], 8)
    with pytest.raises(ValueError, match=r"positions has shape \(2, 1\); expected \(2,\), one per sequence"):
        model.decode_step([1, 2], torch.tensor([[3], [2]], dtype=torch.int32))
    with pytest.raises(TypeError, match="positions has dtype torch.int64; expected torch.int32"):
        model.decode_step([1, 2], torch.tensor([3, 2]))
    with pytest.raises(TypeError, match=r"positions must be an int, a list of 2 ints .*got \[3.7, 2.2\]"):
        model.decode_step([1, 2], [3.7, 2.2])
    with pytest.raises(ValueError, match="positions has length 3; expected 2"):
        model.decode_step([1, 2], [3, 2, 1])
    with pytest.raises(ValueError, match="position 8 overflows the cache"):
        model.decode_step([1, 2], [8, 2])
    with pytest.raises(ValueError, match=r"tokens has shape \(3,\); expected \(2,\), one per sequence"):
        model.decode_step([1, 2, 3], [3, 2])
    with pytest.raises(ValueError, match=r"token ids must be in 0..96; got \[1, 97\]"):
        model.decode_step([1, 97], [3, 2])
    with pytest.raises(ValueError, match=r"token ids must be in 0..96; got \[-1, 2\]"):
        model.decode_step([-1, 2], [3, 2])
    with pytest.raises(ValueError, match="no prompts given"):
        model.prefill([], 8)
    for capacity in (2, 8.0, True):
        with pytest.raises(ValueError, match=rf"capacity must be an int > the longest prompt \(2 tokens\), got "
                                             rf"{capacity}"):
            model.prefill([[1, 2], [3]], capacity)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(prompts=["hello"]), TypeError, "prompt 0 is text, 'hello': give its token ids .* tokenizer"),
    (dict(prompts="hello"), TypeError, "prompts must be a sequence of prompts"),
    (dict(prompts=[[1, 2.0]]), TypeError, r"prompt 0 must be token ids \(ints\), got \[1, 2.0\]"),
    (dict(prompts=[[1, True]]), TypeError, r"prompt 0 must be token ids \(ints\), got \[1, True\]"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens must be a positive int, got True"),
    (dict(max_new_tokens=2**31 - 2), ValueError, r"max_new_tokens=2147483646 after the longest prompt \(2 tokens\) "
     r"needs caches of 2147483648 rows; the kernels take at most 2147483647 \(int32\)"),
    (dict(temperature=True), ValueError, "temperature must be a finite number >= 0, got True"),
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number >= 0, got inf"),
    (dict(prompts=[1, 2, 3]), TypeError, r"prompt 0 is one token id, 1: prompts is a list of prompts, each a list "
     r"of ids \(one prompt: \[\[1, 2, 3\]\]\)"),
    (dict(prompts=[[5, 2**70]]), ValueError, r"token ids must be in 0..96; got \[5, 1180591620717411303424\]"),
    (dict(temperature=1.0, top_k=True), ValueError, "top_k must be None or a positive int, got True"),
    (dict(top_k=5), ValueError, r"top_k=5 samples among the likeliest tokens, so it needs a temperature > 0"),
    (dict(temperature=1.0, seed="7"), TypeError, "seed must be None or an int, got '7'"),
    (dict(eos_token_id="2"), TypeError, r"eos_token_id \(one id or a sequence of them\) must be token ids"),
    (dict(eos_token_id=[2, 1.5]), TypeError, r"eos_token_id \(one id or a sequence of them\) must be token ids"),
    (dict(eos_token_id=True), TypeError, r"eos_token_id \(one id or a sequence of them\) must be token ids"),
    (dict(eos_token_id=97), ValueError, r"eos_token_id 97 is not a token id: the vocabulary has ids 0..96"),
    (dict(eos_token_id=[2, -5]), ValueError, r"eos_token_id -5 is not a token id"),
    (dict(eos_token_id=2**70), ValueError, r"eos_token_id 1180591620717411303424 is not a token id"),
    (dict(temperature=1.0, seed=2**70), ValueError, r"seed must be an int in -2\*\*63 .. 2\*\*64 - 1"),
])
def test_generate_names_a_bad_argument_before_any_work(llama_dir, kwargs, error, words):
    """Every argument of ``generate`` (and of the ``Decoder`` it builds) is checked before the
    prefill: the caches stay as they were."""
    model = LlamaModel.from_pretrained(llama_dir)
    call = dict(prompts=[[1, 2], [3]], max_new_tokens=2) | kwargs
    with pytest.raises(error, match=words):
        model.generate(**call)
    assert model.caches is None


def test_prompts_and_eos_ids_take_integer_types_of_numpy_and_torch(llama_dir):
    model = LlamaModel.from_pretrained(llama_dir)
    want = model.generate([[1, 2, 3], [4, 5]], 3)
    assert model.generate([np.array([1, 2, 3]), torch.tensor([4, 5])], 3) == want
    stop = want[0][0]  # ends the first sequence at once

    def cut(ids):
        return ids[: ids.index(stop) + 1] if stop in ids else ids

    for eos in (stop, np.int64(stop), [stop], torch.tensor([stop, 96])):
        assert model.generate([[1, 2, 3], [4, 5]], 3, eos_token_id=eos) == [cut(ids) for ids in want], eos


# -- the command line -----------------------------------------------------------------------------------


def cli(*args):
    return subprocess.run([sys.executable, "-m", "clusterlab", "generate", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=120)


def test_cli_generate_prints_a_warning_as_one_line_naming_the_command(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path, max_position_embeddings=12)
    result = cli("--model", directory, "--prompt-ids", *range(1, 11), "--max-new-tokens", 3)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "clusterlab generate: warning: generate: the longest prompt and max_new_tokens=3 reach 13 positions, past "
        "max_position_embeddings=12 of the model's config: the tokens from there on are the model's extrapolation"]


def test_cli_generate_prints_the_greedy_ids(llama_dir):
    want = LlamaModel.from_pretrained(llama_dir).generate(PROMPTS, 3)
    args = ["--model", llama_dir, "--max-new-tokens", 3]
    for prompt in PROMPTS:
        args += ["--prompt-ids", *prompt]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("attention runs on the DSMEM simulator")
    assert lines[1] == "prompt 0: " + " ".join(map(str, want[0]))
    assert lines[2] == "prompt 1: " + " ".join(map(str, want[1]))
    assert "tokens/s" in lines[3]


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/absent", "--prompt-ids", 1], "is neither a directory nor a preset (llama2-7b, llama3-8b"),
    (["--model", "{llama}", "--prompt-ids", 1, "--dtype", "float32"], "invalid choice"),
    (["--model", "{llama}", "--prompt", "hello"], "tokenizer.json"),
    (["--model", "llama3.2-1b", "--prompt", "hello"], "the preset 'llama3.2-1b' takes --prompt-ids"),
    (["--model", "{llama}"], "give at least one prompt"),
])
def test_cli_generate_errors_are_one_line_with_status_2(llama_dir, tmp_path, args, message):
    args = [str(a).format(tmp=tmp_path, llama=llama_dir) for a in args]
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    if "invalid choice" not in message:  # argparse prints its usage first
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("args, eos, message", [
    ([arg for _ in range(9) for arg in ("--prompt-ids", 1)], None, "9 prompts; the fused layer takes at most 8"),
    (["--prompt-ids", 1, 500], None, "prompt 0: token ids must be in 0..96; got [1, 500]"),
    (["--prompt-ids", 1], 500,
     "generation_config.json: eos_token_id 500 is past the vocabulary's ids 0..96; --ignore-eos decodes without it"),
    (["--prompt-ids", 1, "--temperature", 1, "--seed", 2**70], None,
     "argument --seed: must be an integer in 0..9223372036854775807"),
])
def test_cli_generate_checks_prompts_and_sampling_before_reading_any_weight(llama_dir, tmp_path, args, eos, message):
    """The weights file is corrupt: a check made after reading it would name the file instead."""
    directory = edited(llama_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"not a checkpoint")
    if eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    result = cli("--model", directory, *args)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert message in result.stderr


@pytest.mark.skipif(hopper_problem() is None, reason="a Hopper GPU is usable here: the preset would run")
def test_cli_generate_a_preset_needs_a_hopper_gpu():
    result = cli("--model", "llama3.2-1b", "--prompt-ids", 1, 2)
    assert result.returncode == 1 and result.stdout == ""
    assert "the preset 'llama3.2-1b' (random weights in its real shapes) needs a Hopper GPU" in result.stderr


@pytest.mark.gpu
def test_cli_generate_decodes_a_presets_random_weights_on_the_gpu():
    """The preset's real shapes with random weights (``models.random``, seed 0): the command prints
    the same greedy ids as the model does."""
    want = random("llama3.2-1b", torch.float16, "cuda", seed=0).generate([[1, 2, 3], [4, 5]], 4)
    result = cli("--model", "llama3.2-1b", "--prompt-ids", 1, 2, 3, "--prompt-ids", 4, 5, "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("llama3.2-1b: random weights in the real shapes")
    assert lines[1:3] == [f"prompt {i}: " + " ".join(map(str, ids)) for i, ids in enumerate(want)]


def write_tokenizer(directory, words: int = 97):
    """A ``tokenizer.json`` in ``directory`` whose token ``i`` is the word ``w{i}``, ``i < words``."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(words)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tokenizer.save(str(directory / "tokenizer.json"))


def test_cli_generate_encodes_text_prompts_with_tokenizer_json(llama_dir, tmp_path):
    directory = edited(llama_dir, tmp_path)
    write_tokenizer(directory)
    want = LlamaModel.from_pretrained(directory).generate([PROMPTS[1]], 3)[0]
    result = cli("--model", directory, "--max-new-tokens", 3, "--prompt", " ".join(f"w{i}" for i in PROMPTS[1]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "prompt 0: " + " ".join(map(str, want))
    assert lines[2] == "  text: " + repr(" ".join(f"w{i}" for i in want))


def test_cli_generate_encodes_each_prompt_whole_whatever_padding_and_truncation_tokenizer_json_keeps(
        llama_dir, tmp_path):
    """A tokenizer saved for batches of one length pads and cuts what it encodes; transformers' tokenizer of
    the same file encodes one text as it is, and so does the command."""
    import tokenizers

    directory = edited(llama_dir, tmp_path)
    write_tokenizer(directory)
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_padding(length=6, pad_id=0, pad_token="w0")
    tokenizer.enable_truncation(max_length=6)
    tokenizer.save(str(directory / "tokenizer.json"))
    prompt = PROMPTS[0] + [11]  # 8 tokens: truncated to 6 by the saved settings
    want = LlamaModel.from_pretrained(directory).generate([prompt, PROMPTS[1]], 3)
    result = cli("--model", directory, "--max-new-tokens", 3, "--prompt", " ".join(f"w{i}" for i in prompt),
                 "--prompt", " ".join(f"w{i}" for i in PROMPTS[1]))  # 3 tokens: padded to 6 by them
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [lines[1], lines[3]] == [f"prompt {i}: " + " ".join(map(str, ids)) for i, ids in enumerate(want)]


def test_cli_generate_numbers_prompts_in_the_order_given_and_names_ids_the_tokenizer_lacks(llama_dir, tmp_path):
    """A text prompt first, then ids: prompt 0 is the text's. The tokenizer knows ids 0..39 of the
    model's 97: the text line says which new ids it could not show."""
    directory = edited(llama_dir, tmp_path)
    write_tokenizer(directory, words=40)
    text, ids = [5, 17, 3], [60, 2]
    want = LlamaModel.from_pretrained(directory).generate([text, ids], 4)
    result = cli("--model", directory, "--max-new-tokens", 4, "--prompt", " ".join(f"w{i}" for i in text),
                 "--prompt-ids", *ids)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "prompt 0: " + " ".join(map(str, want[0]))
    unknown = [token for token in want[0] if token >= 40]
    shown = " ".join(f"w{token}" for token in want[0] if token < 40)
    note = f" (ids the tokenizer lacks, left out: {' '.join(map(str, unknown))})" if unknown else ""
    assert lines[2] == f"  text: {shown!r}{note}"
    assert lines[3] == "prompt 1: " + " ".join(map(str, want[1]))


@pytest.mark.parametrize("tokenizer_json, prompts, message", [
    ('{"version": "1.0", "truncation"', ["w1 w2"], "tokenizer.json: not a tokenizer the tokenizers library reads"),
    (None, ["w1", "   "], "prompt 1 (--prompt '   ') encodes to no tokens"),
    # a word-level vocabulary without its unknown token: the library raises a bare Exception for a word it lacks
    ('{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
     '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, '
     '"model": {"type": "WordLevel", "vocab": {"w1": 1}, "unk_token": "[UNK]"}}', ["w1", "zzz"],
     "tokenizer.json cannot encode it (WordLevel error: Missing [UNK] token from the vocabulary)"),
])
def test_cli_generate_names_a_tokenizer_it_cannot_read_and_a_prompt_of_no_tokens(llama_dir, tmp_path, tokenizer_json,
                                                                                 prompts, message):
    directory = edited(llama_dir, tmp_path)
    write_tokenizer(directory)
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    result = cli("--model", directory, *[arg for text in prompts for arg in ("--prompt", text)])
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
