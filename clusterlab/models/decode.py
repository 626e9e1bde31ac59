"""The decode loop: one token of every sequence per step, one CUDA graph per step on a GPU.

A step feeds each sequence's last token through every layer, the final norm and the LM head,
picks the next token, records it and advances the positions, all on the device, from and into
static buffers (:class:`Decoder`)::

    tokens    [B] int64     the tokens this step feeds (picked by the step before)
    positions [B] int32     where each of them goes in the caches
        logits = model.forward_step(tokens, positions, longest)   [B, V] float32
        scores = logits, or the sampling race on them             greedy, or sampled on the device
        next   = argmax(scores)                                   one launch from here on:
        history[b, counts[b]] = next[b];  counts += 1             [B, max_new_tokens] int64, [B] int64
        done  |= next is an end-of-sequence id                    [B] bool
        tokens = next;  positions += 1

On a Hopper GPU the argmax and the lines after it are one kernel
(:func:`~clusterlab.models.argmax.pick_and_record`). Nothing in a step reads a value back to the
host, so on a CUDA device the whole step is captured
once as a CUDA graph and replayed per token; the host only looks at ``done`` now and then to stop
early. On the CPU the same step runs eagerly (the attention on the simulator).

The host still knows how long the caches are: the longest sequence attends to ``max(positions) + 1``
rows at the first step (read once, at :meth:`Decoder.start`) and one more each step. The fused
attention's launch shape depends on that length (long caches are read by fewer, larger clusters:
:func:`~clusterlab.fused.plan.launch_shape`), so the decoder captures a graph for each shape the
run will meet (:meth:`~clusterlab.models.LlamaModel.step_shape`; the shape changes only at
:func:`~clusterlab.fused.plan.shape_boundaries`, so the run's first step and each boundary it crosses
name every one: :func:`capture_lengths`) and replays the one of each step.

Sampling draws ``E ~ Exponential(1)`` per vocabulary entry and takes ``argmax(p / E)`` over the
probabilities ``p = softmax(logits / temperature)`` (restricted to the ``top_k`` likeliest): the
exponential race, a sample from ``p`` with no host round trip, drawn from the decoder's own seeded
generator (registered with the graph, so every replay draws fresh numbers).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import reprlib

import torch

from ..fused import plan
from ..fused.config import check_seed, is_int
from ..fused.validate import check_tensor
from .argmax import pick_and_record

#: How many steps :meth:`Decoder.run` replays between two looks at ``done`` (each one a host sync).
STOP_CHECK_EVERY = 8
#: The least temperature a sample divides the float32 logits by (smaller ones sample as this one: the argmax).
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def check_sampling(max_new_tokens, temperature, top_k, eos, seed, vocab_size: int) -> tuple[int, ...]:
    """How a decode picks and stops, checked before any work: ``max_new_tokens`` a positive int,
    ``temperature`` a finite number >= 0 (0: greedy), ``top_k`` None or a positive int (with a
    temperature > 0: greedy takes the likeliest token, there is nothing to restrict), ``eos`` None,
    a token id or a sequence of them (ints, NumPy integers; each in ``0 .. vocab_size - 1``),
    ``seed`` None or an int a generator takes. Returns the eos ids as a tuple of ints."""
    if not (is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and 0.0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_k is not None and temperature == 0:
        raise ValueError(f"top_k={top_k} samples among the likeliest tokens, so it needs a temperature > 0 "
                         "(temperature 0 is greedy)")
    check_seed(seed)
    if eos is None:
        return ()
    ids = None
    if not isinstance(eos, bool):
        try:
            ids = (operator.index(eos),)  # one id: an int, a NumPy integer, a 0-d integer tensor
        except TypeError:
            pass  # a sequence of ids, or something token_ids names
    if ids is None:
        ids = tuple(token_ids(eos, "eos_token_id (one id or a sequence of them)"))
    for token in ids:
        if not 0 <= token < vocab_size:
            raise ValueError(f"eos_token_id {token} is not a token id: the vocabulary has ids 0..{vocab_size - 1}")
    return ids


def token_ids(value, what: str) -> list[int]:
    """``value``, a sequence of token ids (ints, NumPy integers, an integer tensor), as a list of
    ints; a ``TypeError`` naming ``what`` for anything else (text, floats, bools)."""
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(t, bool) for t in value):
            raise TypeError
        return [operator.index(t) for t in value]
    except TypeError:
        raise TypeError(f"{what} must be token ids (ints), got {reprlib.repr(value)}") from None


def capture_lengths(batch: int, first: int, last: int) -> tuple[int, ...]:
    """Rows attended by the steps of a run whose first step attends ``first`` rows and last ``last``
    that name every launch shape it meets: ``first`` and each of
    :func:`~clusterlab.fused.plan.shape_boundaries` in ``(first, last]``."""
    return (first, *(length for length in plan.shape_boundaries(batch) if first < length <= last))


class Decoder:
    """Decode ``batch`` sequences of ``model`` (a :class:`~clusterlab.models.LlamaModel` whose
    caches hold the prompts) for up to ``max_new_tokens`` tokens each.

    ``temperature`` 0: greedy; else sample as the module docstring says, among the ``top_k``
    likeliest (all when None), seeded with ``seed`` (from the OS when None). ``eos``: the ids
    that end a sequence. ``graph``: capture the step as a CUDA graph (default: on a CUDA device).
    Bad settings raise before anything is allocated (:func:`check_sampling`).
    """

    def __init__(self, model, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 eos=(), seed: int | None = None, graph: bool | None = None):
        if model.caches is None:
            raise ValueError("a Decoder needs the model's caches; call prefill (or new_caches) first")
        eos = check_sampling(max_new_tokens, temperature, top_k, eos, seed, model.config.vocab_size)
        self.model, self.max_new_tokens = model, max_new_tokens
        self.temperature, self.top_k = float(temperature), top_k
        device, batch = model.device, model.caches[0].batch
        self.batch = batch
        self.graph = device.type == "cuda" if graph is None else graph
        if self.graph and device.type != "cuda":
            raise ValueError(f"graph=True needs the model on a CUDA device; it is on {device}")
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)
        self._eos_ids = self.eos if eos else torch.full((1,), -1, dtype=torch.long, device=device)  # -1: no token
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int32, device=device)
        self.history = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed
        self.generator = torch.Generator(device=device)
        self._graphs: dict = {}  # the attention's launch shape (LlamaModel.step_shape) -> CUDA graph
        self._recorded = 0  # tokens in history, known on the host without a sync
        self._first_longest = 0  # rows the longest sequence attends to at the first step after start

    # -- the step ------------------------------------------------------------------------------

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the next token is the argmax of, from float32 ``logits`` ``[B, V]``: the logits
        themselves (greedy), or the sampling race on them (see the module docstring)."""
        if self.temperature == 0.0:
            return logits
        # From the row's largest, so that a small temperature cannot overflow the logits to inf (softmax: NaN);
        # and no smaller than float32's least normal number, which a temperature divides the logits as: one
        # that rounds to 0 there would make the largest 0 / 0 (NaN) too. Either way the sample is the argmax.
        temperature = max(self.temperature, FLOAT32_TINY)
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        race = torch.empty_like(logits).exponential_(generator=self.generator)
        return logits.softmax(-1) / race

    def pick_and_record(self, logits: torch.Tensor, advance: int) -> None:
        """The next token of each sequence from float32 ``logits`` ``[B, V]``, appended to the
        history and fed next; sequences that emitted an eos id marked done; ``positions`` advanced
        by ``advance`` (:func:`~clusterlab.models.argmax.pick_and_record`)."""
        pick_and_record(self.scores(logits), self.tokens, self.history, self.counts, self.done, self._eos_ids,
                        self.positions, advance)

    def _step(self, longest: int) -> None:
        logits = self.model.forward_step(self.tokens, self.positions, longest)
        self.pick_and_record(logits, advance=1)

    # -- driving it ----------------------------------------------------------------------------

    def start(self, logits: torch.Tensor, positions: torch.Tensor) -> None:
        """Take the first token from the prefill's ``logits`` ``[B, V]`` float32; ``positions`` ``[B]``
        int32: where it goes (each prompt's length; read to the host once, see the module
        docstring), both on the model's device. The run writes cache rows up to ``max(positions) +
        max_new_tokens - 2``, which the caches must hold. Captures the graphs of the steps' shapes not
        captured before."""
        model, device = self.model, self.model.device
        vocab = model.config.vocab_size
        check_tensor("logits", logits, (self.batch, vocab), torch.float32, device, "a decode's logits")
        check_tensor("positions", positions, (self.batch,), torch.int32, device, "a decode's positions")
        values, capacity = positions.tolist(), model.caches[0].capacity
        last = max(values) + self.max_new_tokens - 2  # the cache row the last step writes
        if min(values) < 0:
            raise ValueError(f"positions must be >= 0, got {values}")
        if last >= capacity:
            raise ValueError(f"positions {values} with max_new_tokens={self.max_new_tokens} write cache rows up to "
                             f"{last}, but the caches hold rows 0..{capacity - 1}")
        self._first_longest = max(values) + 1
        if self.graph:
            last = self._first_longest + max(self.max_new_tokens - 2, 0)
            for longest in capture_lengths(self.batch, self._first_longest, last):
                if self.model.step_shape(self.batch, longest) not in self._graphs:
                    self.positions.copy_(positions)
                    self._capture(longest)
        self.generator.manual_seed(self.seed)
        self.counts.zero_()
        self.done.zero_()
        self.positions.copy_(positions)
        self.pick_and_record(logits, advance=0)
        self._recorded = 1

    def _capture(self, longest: int) -> None:
        """Capture one step of the launch shape of ``longest`` rows as a CUDA graph. A warm-up
        step runs first on a side stream (kernels compile, the allocator settles); it writes cache
        rows ``positions[b]``, which the first replay writes again before anything reads them.
        :meth:`start` resets what it advanced."""
        device = self.model.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._step(longest)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self._step(longest)
        self._graphs[self.model.step_shape(self.batch, longest)] = graph

    def step(self) -> None:
        """One token more for every sequence: a graph replay on a GPU, the eager step elsewhere."""
        if self._recorded == 0:
            raise ValueError("call start with the prefill's logits and positions before step")
        if self._recorded >= self.max_new_tokens:
            raise ValueError(f"every sequence already has max_new_tokens={self.max_new_tokens} tokens")
        longest = self._first_longest + self._recorded - 1  # the step after start attends first_longest rows
        if self.graph:
            self._graphs[self.model.step_shape(self.batch, longest)].replay()
        else:
            self._step(longest)
        self._recorded += 1

    def finished(self) -> bool:
        """Whether every sequence has emitted an eos id (reads ``done``: one host sync)."""
        return bool(self.done.all())

    def run(self) -> int:
        """Step until every sequence has ``max_new_tokens`` tokens or emitted an eos; the number of steps."""
        steps = 0
        while self._recorded < self.max_new_tokens:
            if steps % STOP_CHECK_EVERY == 0 and self.eos.numel() and self.finished():
                break
            self.step()
            steps += 1
        return steps

    def new_tokens(self) -> list[list[int]]:
        """Each sequence's tokens, up to and including its first eos id (one host sync)."""
        eos = set(self.eos.tolist())
        result = []
        for row in self.history[:, : self._recorded].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            result.append(row[:end])
        return result
