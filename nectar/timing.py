"""Stage timing: each named stage of a compile says that it starts, and adds its seconds to a record."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class StageRun:
    """One run of a stage: wall-clock bounds (perf_counter) and the process's CPU seconds, all threads."""

    name: str
    start: float
    end: float
    cpu: float


RUNS: list[StageRun] = []  # every stage this process ran, in order: what benchmarks/compile_cost.py reads


@contextmanager
def stage(timings: dict, name: str):
    start, cpu = time.perf_counter(), time.process_time()
    print(f"[nectar] {name}...", flush=True)
    yield
    end = time.perf_counter()
    RUNS.append(StageRun(name, start, end, time.process_time() - cpu))
    timings[name] = round(timings.get(name, 0.0) + end - start, 1)  # rounds add up
