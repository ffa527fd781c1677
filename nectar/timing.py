"""Stage timing: each named stage of a compile says that it starts, and adds its seconds to a record."""
from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def stage(timings: dict, name: str):
    start = time.perf_counter()
    print(f"[nectar] {name}...", flush=True)
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)  # rounds add up
