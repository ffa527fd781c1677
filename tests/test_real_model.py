"""Checks on the real default model; deselected by default (`make test-slow` runs them)."""
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    import nectar

    try:
        return nectar.load_model("smollm2-135m", dtype=torch.float32)
    except nectar.NectarError as e:
        pytest.skip(str(e))


@torch.no_grad()
def test_split_attention_with_exact_document_matches_full_cache_on_smollm2(smollm):
    from nectar.runtime.binding import bound
    from nectar.runtime.prefill import prefill
    from nectar.model.documents import pydoc_document

    model, tokenizer = smollm
    doc = tokenizer(pydoc_document(tokenizer, 600), add_special_tokens=False, return_tensors="pt").input_ids[0]
    prompt = tokenizer("\n\nQuestion: What does assert do?", add_special_tokens=False, return_tensors="pt").input_ids[0]
    model.set_attn_implementation("eager")
    reference = model(input_ids=torch.cat([doc, prompt]).view(1, -1)).logits[0, len(doc):]
    with bound(model, prefill(model, doc)):
        logits = model(input_ids=prompt.view(1, -1),
                       position_ids=len(doc) + torch.arange(len(prompt)).view(1, -1)).logits[0]
    assert (logits - reference).abs().max() <= 1e-4
