"""Variants of simulator programs for tests that show a line is needed (shared by the test modules)."""

import inspect
import sys
import textwrap


def without_line(program, marker: str):
    """``program`` (a simulator program, a module-level generator function) with the one line holding
    ``marker`` (say a cluster barrier) replaced by ``pass``, compiled in its module's namespace."""
    return with_replaced(program, {marker: "pass  # dropped:"})


def with_replaced(program, replacements: dict):
    """``program`` with each text of ``replacements`` (found exactly once) replaced by its value,
    compiled in its module's namespace."""
    source = textwrap.dedent(inspect.getsource(program))
    for old, new in replacements.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    namespace = dict(vars(sys.modules[program.__module__]))
    exec(compile(source, f"<{program.__name__} variant>", "exec"), namespace)
    return namespace[program.__name__]
