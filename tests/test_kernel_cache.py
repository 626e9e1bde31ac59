"""clusterlab.kernel_cache: where compiled kernels are kept and the key they are found under.

CPU tests pin the key and the folder; the GPU test runs a fused step in two processes and checks
that the second loads the kernel the first compiled and computes the same bits.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from clusterlab import kernel_cache


@dataclasses.dataclass(frozen=True)
class Spec:
    batch: int
    dtype: str = "float16"


def build(spec):
    def kernel(x):
        x[0] = spec.batch

    return kernel


def other_build(spec):
    return build(spec)


def test_the_key_names_spec_builder_bounds_and_source(monkeypatch):
    key = kernel_cache.kernel_key(build, Spec(1), (128, 1))
    assert len(key) == 64 and key == kernel_cache.kernel_key(build, Spec(1), (128, 1))
    changed = [kernel_cache.kernel_key(build, Spec(2), (128, 1)),
               kernel_cache.kernel_key(build, Spec(1, "bfloat16"), (128, 1)),
               kernel_cache.kernel_key(build, Spec(1), (256, 1)),
               kernel_cache.kernel_key(other_build, Spec(1), (128, 1))]
    monkeypatch.setattr(kernel_cache, "source_digest", lambda: "0" * 64)  # any clusterlab source edited
    changed.append(kernel_cache.kernel_key(build, Spec(1), (128, 1)))
    assert len({key, *changed}) == 6


def test_the_source_digest_covers_every_module_of_the_package():
    digest = kernel_cache.source_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    kernel_cache.source_digest.cache_clear()
    assert kernel_cache.source_digest() == digest  # the same files, the same digest


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert kernel_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", "")
    assert kernel_cache.cache_dir() is None
    monkeypatch.delenv("CLUSTERLAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache.cache_dir() == tmp_path / "xdg" / "clusterlab" / "kernels"


def test_jit_keeps_the_kernel_in_the_folder_unless_the_cache_is_off(monkeypatch, tmp_path):
    from numba.cuda.core.caching import NullCache

    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path))
    kernel = kernel_cache.jit(build, Spec(3), (32, 1))
    assert kernel._cache.cache_path == str(tmp_path)
    assert kernel.targetoptions["launch_bounds"] == (32, 1)
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", "")
    assert isinstance(kernel_cache.jit(build, Spec(3), (32, 1))._cache, NullCache)


def test_entries_are_the_kept_kernels_files_and_clear_removes_only_them(monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path))
    index = tmp_path / "clusterlab.fused_mlp-0a1b.py312.nbi"  # names as numba writes them (test_numba_private)
    data = tmp_path / "clusterlab.fused_mlp-0a1b.py312.0.nbc"
    other = tmp_path / "notes.txt"
    for path, size in ((index, 10), (data, 2000), (other, 5)):
        path.write_bytes(os.urandom(size))
    assert kernel_cache.entries() == sorted([index, data]) == kernel_cache.entries(tmp_path)
    assert kernel_cache.clear() == (2, 2010)
    assert kernel_cache.entries() == [] and other.read_bytes()
    assert kernel_cache.entries(tmp_path / "missing") == []
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", "")
    assert kernel_cache.entries() == [] and kernel_cache.clear() == (0, 0)


SCRIPT = textwrap.dedent("""
    import json
    import torch
    from clusterlab import _numba_private
    from clusterlab.fused import AttentionConfig, AttentionWeights, DecodeAttention, KVCache
    from clusterlab.fused.layer import kernel_launcher
    from clusterlab.fused.reference import reference_step, relative_error

    config = AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64)
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=1)
    layer = DecodeAttention(config, weights)
    cache = KVCache.random(config, 2, 64, torch.float16, "cuda", seed=2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    hidden, residual = (torch.randn(2, 512, generator=gen, device="cuda").half() for _ in range(2))
    positions = torch.tensor([40, 7], dtype=torch.int32, device="cuda")
    want = reference_step(config, weights, hidden, residual, cache, positions)  # float64, before the append
    out, new_residual = layer(hidden, residual, cache, positions)
    torch.cuda.synchronize()
    launcher = kernel_launcher(layer.kernel_spec(torch.float16, 2))
    print(json.dumps({"hits": _numba_private.cache_hits(launcher.kernel), "err": relative_error(out, want.out)}))
""")


@pytest.mark.gpu
def test_a_second_process_loads_the_kernel_the_first_compiled(tmp_path):
    env = dict(os.environ, CLUSTERLAB_CACHE_DIR=str(tmp_path / "kernels"))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[1]["hits"] == 1
    # The loaded kernel computes the step as the compiled one did: both within float16's tolerance of the
    # float64 reference (not bit for bit: the W_o sums of the clusters land with atomic adds in arrival order).
    assert runs[0]["err"] < 1e-2 and runs[1]["err"] < 1e-2, runs
    assert any((tmp_path / "kernels").iterdir())
