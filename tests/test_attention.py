"""The split attention path must equal transformers' eager attention when the document part is exact."""
import pytest
import torch


from nectar.providers.attention import NoContext
from nectar.providers.kernels import exact_attention, merge
from nectar.runtime.binding import bound, generation_inputs
from nectar.runtime.prefill import prefill, split_sinks
from conftest import DEVICES, assert_replay_matches_eager, full_logits, tiny_llama


def test_merge_of_two_halves_equals_attention_over_all_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    full_o, full_lse = exact_attention(q, k, v, 0.3)
    o_a, lse_a = exact_attention(q, k[:, :, :4], v[:, :, :4], 0.3)
    o_b, lse_b = exact_attention(q, k[:, :, 4:], v[:, :, 4:], 0.3)
    o, lse = merge(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, full_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-5)


def test_merge_with_empty_side_is_identity():
    o, lse = torch.randn(4, 8), torch.randn(4)
    out, out_lse = merge(o, lse, torch.zeros(4, 8), torch.full((4,), float("-inf")))
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(out_lse, lse)


@torch.no_grad()
def test_prefill_with_exact_document_matches_eager(model):
    doc, prompt = torch.randint(3, 300, (40,)), torch.randint(3, 300, (9,))
    reference = full_logits(model, doc, prompt)
    context = prefill(model, doc)
    with bound(model, context):
        logits = model(input_ids=prompt.view(1, -1), position_ids=len(doc) + torch.arange(9).view(1, -1)).logits[0]
    assert (logits - reference).abs().max() <= 1e-4


@torch.no_grad()
def test_exact_sinks_and_rest_as_context_matches_eager(model):
    doc, prompt = torch.randint(3, 300, (40,)), torch.randint(3, 300, (7,))
    reference = full_logits(model, doc, prompt)
    sinks, rest = split_sinks(prefill(model, doc), 4)
    with bound(model, rest, sinks=sinks):
        logits = model(input_ids=prompt.view(1, -1), position_ids=len(doc) + torch.arange(7).view(1, -1)).logits[0]
    assert (logits - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sink", [0, 4])
@torch.no_grad()
def test_step_by_step_decoding_matches_eager(device, sink):
    """Decode steps take the maskless path, with any sinks prepended to the local keys."""
    model = tiny_llama().to(device)
    doc, prompt = torch.randint(3, 300, (33,), device=device), torch.randint(3, 300, (12,), device=device)
    reference = full_logits(model, doc, prompt)
    n = len(doc)
    sinks, rest = split_sinks(prefill(model, doc), sink)
    positions = n + torch.arange(12, device=device).view(1, -1)
    with bound(model, rest, sinks=sinks if sink else None):
        out = model(input_ids=prompt[:4].view(1, -1), position_ids=positions[:, :4], use_cache=True)
        steps = [out.logits[0]]
        cache = out.past_key_values
        for i in range(4, 12):
            out = model(input_ids=prompt[i].view(1, 1), position_ids=positions[:, i:i + 1], past_key_values=cache)
            steps.append(out.logits[0])
    assert (torch.cat(steps) - reference).abs().max() <= (1e-4 if device == "cpu" else 1e-3)


@pytest.mark.parametrize("sink", [0, 4])
@torch.no_grad()
def test_generate_with_left_padding_matches_full_cache_generate(model, sink):
    """Sinks ride in a prefix cache (`generation_inputs`) rather than being prepended at every step."""
    doc = torch.randint(3, 300, (30,))
    prompts = [torch.randint(3, 300, (5,)), torch.randint(3, 300, (8,))]
    n = len(doc)
    expected = [
        model.generate(torch.cat([doc, p]).view(1, -1), max_new_tokens=6, do_sample=False)[0, n + len(p):]
        for p in prompts
    ]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 8 - len(p):], mask[row, 8 - len(p):] = p, 1
    sinks, rest = split_sinks(prefill(model, doc), sink)
    inputs = generation_inputs(model, ids, mask, n, sinks if sink else None)
    with bound(model, rest):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    start = inputs["input_ids"].shape[1]
    assert start == 8 + sink
    for row in range(2):
        assert out[row, start:].tolist() == expected[row].tolist()


@torch.no_grad()
def test_no_context_equals_running_without_the_document(model):
    prompt = torch.randint(3, 300, (6,))
    reference = model(input_ids=prompt.view(1, -1)).logits
    with bound(model, NoContext()):
        logits = model(input_ids=prompt.view(1, -1)).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_binding_is_removed_on_exit(model):
    with bound(model, NoContext()):
        assert model.config._attn_implementation == "nectar"
    assert model.config._attn_implementation == "eager"


def test_fused_kernel_matches_reference_with_mask_and_fully_masked_rows():
    from nectar.providers.kernels import reference_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = torch.zeros(2, 1, 6, 10)
    mask[0, 0, :, 7:] = torch.finfo(torch.float32).min
    mask[1, 0, 2] = torch.finfo(torch.float32).min  # a left-pad query that sees nothing
    fast, ref = exact_attention(q, k, v, 0.35, mask), reference_attention(q, k, v, 0.35, mask)
    keep = torch.ones(2, 3, 6, dtype=torch.bool)
    keep[1, :, 2] = False
    torch.testing.assert_close(fast[0][keep], ref[0][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1][keep], ref[1][keep], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fast[0]).all()


def test_blend_is_merge_without_lse():
    from nectar.providers.kernels import blend

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    full = reference_attention_(q, k, v)
    a, b = reference_attention_(q, k[:, :, :5], v[:, :, :5]), reference_attention_(q, k[:, :, 5:], v[:, :, 5:])
    torch.testing.assert_close(blend(*a, *b), full[0], atol=1e-6, rtol=1e-5)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(blend(*a, *empty), a[0])
    torch.testing.assert_close(blend(*empty, *a), a[0])


def test_prepended_sinks_equal_a_separate_exact_part():
    """Sinks folded into the local keys give what merging them as their own part gives."""
    from nectar.providers.attention import ExactContext
    from nectar.providers.kernels import exact_attention, merge

    torch.manual_seed(2)
    b, heads, kv, L, s, d = 2, 6, 3, 3, 5, 8
    q, k, v = torch.randn(b, heads, L, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    mask = torch.zeros(b, 1, L, s)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # row 0 is left-padded
    sinks = ExactContext([torch.randn(kv, 4, d)], [torch.randn(kv, 4, d)])
    folded = exact_attention(q, *sinks.prepend(0, k, v, mask)[:2], 0.3, sinks.prepend(0, k, v, mask)[2])
    grouped = q.reshape(b, kv, -1, d)
    local = exact_attention(q, k, v, 0.3, mask)
    local = local[0].reshape(b, kv, -1, d), local[1].reshape(b, kv, -1)
    o, lse = merge(*local, *sinks(0, grouped, 0.3))
    torch.testing.assert_close(folded[0].reshape(b, kv, -1, d), o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded[1].reshape(b, kv, -1), lse, atol=1e-5, rtol=1e-5)


def reference_attention_(q, k, v):
    from nectar.providers.kernels import reference_attention

    return reference_attention(q, k, v, 0.4)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_grouped_kernel_matches_reference(padded):
    """One query per head runs with the query heads of a KV head as rows of one head."""
    from nectar.providers.kernels import reference_attention

    torch.manual_seed(3)
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 11, 8), torch.randn(3, 2, 11, 8)
    mask = None
    if padded:
        mask = torch.zeros(3, 1, 1, 11)
        mask[1, :, :, :4] = torch.finfo(torch.float32).min
    with torch.no_grad():
        fast = exact_attention(q, k, v, 0.3, mask)
    grouped = q.view(3, 2, 3, 8)
    ref = reference_attention(grouped, k, v, 0.3, None if mask is None else mask.expand(3, 1, 3, 11))
    torch.testing.assert_close(fast[0], ref[0].view(3, 6, 1, 8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], ref[1].view(3, 6, 1), atol=1e-5, rtol=1e-5)


def test_gqa_reference_path_matches_fused_kernel():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.zeros(2, 1, 5, 9)
    mask[:, :, :, 6:] = torch.finfo(torch.float32).min
    with torch.no_grad():
        fused = exact_attention(q, k, v, 0.3, mask)
    reference = exact_attention(q.clone().requires_grad_(True), k, v, 0.3, mask)  # grad: reference path
    torch.testing.assert_close(fused[0], reference[0].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], reference[1].detach(), atol=1e-5, rtol=1e-5)


def test_prefill_in_chunks_equals_one_pass(model):
    from nectar.runtime.prefill import prefill

    doc = torch.randint(3, 300, (50,))
    whole, chunked = prefill(model, doc, chunk=64), prefill(model, doc, chunk=7)
    for a, b in zip(whole.keys + whole.values, chunked.keys + chunked.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_through_traced_steps_matches_eager_and_traces_each_layer_once(compiled):
    """On a CPU a decode step's document part runs as a traced graph per (layer, shape): the same ops as
    the eager path, without the Python between them."""
    from nectar.providers.attention import WithExact

    model, art = compiled
    provider = art.providers(model)[0]
    assert_replay_matches_eager(model, art, provider.provider if isinstance(provider, WithExact) else provider,
                                "traceable")
