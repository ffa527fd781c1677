"""The baselines nectar is judged against at the same bytes, by name: StreamingLLM, Attention Matching and
kvpress's presses, one file each, and `REGISTRY` from a method's name to the baseline that builds it.
(No document at all, the floor every method must beat, needs no building: nectar.providers.attention.NoContext.)
"""
from .attention_matching import AttentionMatching, attention_matching, matched_bytes
from .base import Inputs, context_tokens, tokens_for_budget
from .presses import PRESSES, Press, global_layers, press
from .streaming_llm import StreamingLLM, streaming_llm

REGISTRY = {b.name: b for b in (StreamingLLM(), AttentionMatching(), *(Press(name) for name in PRESSES))}

__all__ = ["REGISTRY", "Inputs", "AttentionMatching", "Press", "StreamingLLM", "PRESSES", "attention_matching",
           "context_tokens", "global_layers", "matched_bytes", "press", "streaming_llm", "tokens_for_budget"]
