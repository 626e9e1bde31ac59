"""GPU detection never raises a raw driver error; HopperRequired says what is missing."""

import pytest

from clusterlab import HopperRequired, gpu


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ("no NVIDIA driver: libcuda could not be loaded", "no NVIDIA driver"),
        ("the NVIDIA driver sees no CUDA device", "no CUDA device"),
        ((None, 0, (8, 0)), "compute capability 8.0"),
    ],
)
def test_require_hopper_names_what_is_missing(monkeypatch, found, expected):
    monkeypatch.setattr(gpu, "_device0", lambda: found)
    with pytest.raises(HopperRequired, match=expected):
        gpu.require_hopper()


@pytest.mark.parametrize("cc", [(9, 0), (10, 0)])
def test_hopper_or_newer_is_accepted(monkeypatch, cc):
    monkeypatch.setattr(gpu, "_device0", lambda: (None, 0, cc))
    assert gpu.hopper_problem() is None
    gpu.require_hopper()


def test_device_info_without_gpu_lists_versions(monkeypatch):
    monkeypatch.setattr(gpu, "_device0", lambda: "the NVIDIA driver sees no CUDA device")
    info = gpu.device_info()
    assert info["gpu"] is None
    assert info["reason"] == "the NVIDIA driver sees no CUDA device"
    assert info["numba-cuda"].startswith("0.30")


def test_real_machine_is_described_consistently():
    info = gpu.device_info()
    if info["gpu"] is None:
        assert info["reason"] == gpu.hopper_problem() and info["reason"]
    else:
        assert isinstance(info["sm_count"], int) and info["sm_count"] > 0
        assert info["compute_capability"].count(".") == 1


@pytest.mark.gpu
def test_hopper_gpu_is_reported_with_its_name():
    info = gpu.device_info()
    assert info["reason"] is None
    assert tuple(map(int, info["compute_capability"].split("."))) >= (9, 0)
    assert info["max_cluster_size"].startswith("8 portable, 16")


@pytest.mark.gpu
def test_the_cards_limits_are_read_from_the_driver():
    # An H100 SXM and an H200 share HOPPER's SM; a card of another size differs only in what it reports.
    from clusterlab.fused.plan import HOPPER, DeviceLimits

    limits, info = DeviceLimits.of(0), gpu.device_info()
    assert (limits.sm_count, limits.l2_bytes) == (info["sm_count"], info["l2_bytes"])
    assert limits.shared_bytes_per_block <= limits.shared_bytes_per_sm <= 256 * 1024
    assert 16 * 2**20 <= limits.l2_bytes <= 4 * HOPPER.l2_bytes
    # GPCs hold whole clusters: the larger the cluster, the fewer SMs a grid of them fills (never more).
    assert limits.sms_for(1) == limits.sm_count and all(
        a >= b > 0 and b % size == 0 for a, b, size in zip(limits.cluster_sms, limits.cluster_sms[1:], (2, 4, 8, 16)))
    if limits.sm_count == HOPPER.sm_count:  # an H100 SXM or H200: the placement study's figures
        assert limits.cluster_sms == HOPPER.cluster_sms
