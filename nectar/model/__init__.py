"""The language model's side of nectar: loading the models it knows offline (GGUF from PyPI packages, or a
local folder), the token layout around a document and its questions, documents as token ids, and the
padding and positions of sequences that follow a document."""
