import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random-weight Llama with GQA and RoPE, small enough for CPU tests in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform attention; sharper weights make the checks meaningful.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@pytest.fixture
def model():
    return tiny_llama()
