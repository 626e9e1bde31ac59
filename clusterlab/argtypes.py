"""Argument types shared by clusterlab's command lines (``clusterlab`` and the benchmark suites)."""

from __future__ import annotations

import argparse


def integer(minimum: int, maximum: int | None = None):
    """An argparse ``type=``: the text as an integer in minimum..maximum (no maximum if None).

    Anything else raises ``ArgumentTypeError``, which argparse prints after the usage with the
    flag's name ("argument --n: must be an integer >= 1; got '-5'") before exiting with status 2.
    """
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


def number(minimum: float):
    """An argparse ``type=``: the text as a finite number >= minimum (``ArgumentTypeError``
    otherwise, printed as :func:`integer`'s)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}; got {text!r}") from None
        if not minimum <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}; got {text!r}")
        return value

    return parse
