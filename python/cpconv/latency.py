"""``measure_latency``: wall time of one forward pass, batch 1 on one thread by default."""

from __future__ import annotations

import dataclasses
import numbers
import statistics
import time
from typing import List

import torch
from torch import nn

__all__ = ["LatencyStats", "measure_latency"]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Forward-pass times in milliseconds over ``repeats`` timed runs on ``threads`` threads."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int
    threads: int
    times_ms: List[float] = dataclasses.field(repr=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 30,
) -> LatencyStats:
    """Time ``model(example_input)`` in eval mode under ``torch.inference_mode``.

    Parameters
    ----------
    model
        Timed in eval mode; its train/eval mode is restored afterwards.
    example_input
        One input batch, e.g. shape ``(1, C, H, W)`` for batch-1 latency.
    threads
        ``torch.set_num_threads`` during the measurement; torch's previous thread count is restored.
    warmup
        Untimed runs first (allocator, oneDNN primitive caches, weight packing).
    repeats
        Timed runs; the statistics are over these.

    Returns
    -------
    LatencyStats
        Median, mean, min, max and quartiles in milliseconds. Compare models by their medians measured
        in the same process, interleaved; single numbers on a shared machine vary by +-25%.

    Raises
    ------
    ValueError
        ``threads < 1``, ``warmup < 0`` or ``repeats < 1``.
    """
    for value, name, low in ((threads, "threads", 1), (warmup, "warmup", 0), (repeats, "repeats", 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    previous_threads = torch.get_num_threads()
    was_training = model.training
    times: List[float] = []
    try:
        torch.set_num_threads(int(threads))
        model.eval()
        with torch.inference_mode():
            for _ in range(int(warmup)):
                model(example_input)
            for _ in range(int(repeats)):
                start = time.perf_counter()
                model(example_input)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return LatencyStats(
        median_ms=statistics.median(times), mean_ms=statistics.fmean(times), min_ms=min(times),
        max_ms=max(times), q25_ms=q[0], q75_ms=q[2], repeats=len(times), threads=int(threads), times_ms=times)
