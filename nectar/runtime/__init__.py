"""Running a model with its document attention served by a context provider instead of a KV cache: the
binding into transformers' attention interface, the document's prefill, batched decoding, and `ask`."""
