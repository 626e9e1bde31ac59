"""Test levels.

- unmarked: pure CPU (simulator, validation, CLI); run everywhere.
- ``ptx``: compile kernels to PTX for cc 9.0 and assemble them with ptxas; no GPU needed, runs in CI.
- ``gpu``: run on a Hopper GPU; skipped elsewhere with the reason (``pytest -m gpu`` on an H100).
"""

import pytest

from clusterlab.gpu import hopper_problem


def pytest_collection_modifyitems(config, items):
    problem = hopper_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"needs a Hopper GPU: {problem}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
