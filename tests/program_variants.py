"""Variants of simulator programs for tests that show a line is needed (shared by the test modules)."""

import inspect
import sys
import textwrap


def without_line(program, marker: str):
    """``program`` (a simulator program, a module-level generator function) with the one line holding
    ``marker`` (say a cluster barrier) replaced by ``pass``, compiled in its module's namespace."""
    source = textwrap.dedent(inspect.getsource(program))
    assert source.count(marker) == 1, marker
    namespace = dict(vars(sys.modules[program.__module__]))
    exec(compile(source.replace(marker, "pass  # dropped:"), f"<{program.__name__} variant>", "exec"), namespace)
    return namespace[program.__name__]
