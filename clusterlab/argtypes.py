"""Argument types shared by clusterlab's command lines (``clusterlab`` and the benchmark suites)."""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

from .bench.timing import writable_dir


def integer(minimum: int, maximum: int | None = None, multiple_of: int = 1):
    """An argparse ``type=``: the text as an integer in minimum..maximum (no maximum if None), a
    multiple of ``multiple_of``.

    Anything else raises ``ArgumentTypeError``, which argparse prints after the usage with the
    flag's name ("argument --n: must be an integer >= 1; got '-5'") before exiting with status 2.
    """
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    if multiple_of != 1:
        allowed += f", a multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum) or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


def number(minimum: float, maximum: float | None = None):
    """An argparse ``type=``: the text as a finite number in minimum..maximum (no maximum if None;
    ``ArgumentTypeError`` otherwise, printed as :func:`integer`'s)."""
    allowed = f"a number >= {minimum:g}" if maximum is None else f"a number in {minimum:g}..{maximum:g}"
    top = float("inf") if maximum is None else maximum

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}") from None
        if not (minimum <= value <= top and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


def dimensions(letters: str, names: str, examples: str, required: int = 2):
    """An argparse ``type=``: ``required`` to ``len(letters)`` integers joined by ``x`` (``"16x4x2"``), as a
    tuple of ints; ``letters`` and ``names`` say what each stands for in the error (``ArgumentTypeError``,
    printed as :func:`integer`'s): ``dimensions("CWS", "cluster size x warps [x head split]", "8x4 or
    16x4x2")`` refuses ``"8xfoo"`` with "must look like CxW or CxWxS (cluster size x warps [x head
    split]), e.g. 8x4 or 16x4x2; got '8xfoo'"."""
    forms = " or ".join("x".join(letters[:n]) for n in range(required, len(letters) + 1))
    pattern = re.compile(r"\d+" + r"x\d+" * (required - 1) + r"(x\d+){0,%d}" % (len(letters) - required))

    def parse(text: str) -> tuple[int, ...]:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"must look like {forms} ({names}), e.g. {examples}; got {text!r}")
        return tuple(int(part) for part in text.split("x"))

    return parse


class Distinct(argparse.Action):
    """An argparse ``action=`` for an option of several values: each value once, in the order first
    given (``--batch 1 4 1`` runs batch 1 once)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(dict.fromkeys(values)))


def argument_type(parse):
    """``parse`` (text -> value, raising ``ValueError`` for what it refuses) as an argparse ``type=``:
    its ``ValueError`` becomes ``ArgumentTypeError``, printed as :func:`integer`'s."""

    @functools.wraps(parse)
    def checked(text, *args, **kwargs):
        try:
            return parse(text, *args, **kwargs)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


@argument_type
def results_folder(text: str) -> str:
    """An argparse ``type=``: a folder results may be written into, or created in
    (:func:`~clusterlab.bench.timing.writable_dir`), checked before any GPU time is spent."""
    writable_dir(text)
    return text


@argument_type
def results_tag(text: str) -> str:
    """An argparse ``type=``: the suffix of a run's results files (``fused_<tag>.json``): letters, digits,
    ``.``, ``_`` and ``-``, not starting with a dot, so that the files land in the results folder itself."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", text):
        raise ValueError(f"must be letters, digits, '.', '_' or '-' (not first a '.'), a file name's suffix; "
                         f"got {text!r}")
    return text


@argument_type
def results_file(text: str) -> str:
    """An argparse ``type=``: a file results may be written to: not a folder, in a folder they may be
    written into or created in."""
    writable_dir(Path(text).parent, "the folder of the output")
    if Path(text).is_dir():
        raise ValueError(f"{text!r} is a directory, not a file")
    return text
