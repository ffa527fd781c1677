"""Measuring a compiled document against the alternatives: `nectar eval` (every method at the same bytes:
runner, report) and `nectar bench` (decode speed and memory against the full cache)."""
