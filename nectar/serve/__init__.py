"""`nectar serve`: compiled documents behind an OpenAI-compatible HTTP API (server, api), with one decode
batch shared across documents (engine, rowbanks)."""
