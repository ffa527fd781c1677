"""The fidelity levers: exact most-attended tokens, the on-policy refit, and the Attention Matching baseline."""
from dataclasses import replace

import pytest
import torch

import nectar
from nectar.providers.attention import ExactContext, NoContext, WithExact
from nectar.providers.kernels import exact_attention, merge
from nectar.runtime.binding import bound, cacheable
from nectar.runtime.decode import generate_ids
from nectar.errors import NectarError
from nectar.providers.baselines import attention_matching, matched_bytes
from nectar.model.models import head_dim
from nectar.compiler.budget import uniform_exact
from nectar.providers.quant import CodedTokens, pack4, round_tokens, unpack4
from nectar.compiler.pipeline import compile_bank, plan_of
from nectar.compiler.workspace import Workspace
from nectar.runtime.prefill import prefill, split_exact
from nectar.compiler.selection import TokenChoice, choose_tokens
from nectar.cli.summary import summary
from conftest import FAST, assert_same_logits, sample_document, tiny_llama


@pytest.fixture(scope="module")
def ws(tokenizer):
    return Workspace(tiny_llama(), tokenizer, sample_document(1500), FAST)


def _parts_merge_to_the_whole(full, exact, rest, q):
    for layer in range(3):
        x = q[2 * layer: 2 * layer + 2].unsqueeze(0)
        want = full(layer, x, 0.25)
        got = merge(*exact(layer, x, 0.25), *rest(layer, x, 0.25))
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_exact_tokens_and_the_rest_merge_to_the_whole_document():
    torch.manual_seed(0)
    full = prefill(tiny_llama(), torch.randint(3, 300, (50,)))
    q = torch.randn(3 * 2, 40, 16)  # every module's queries
    chosen = choose_tokens(q, full, 0.25, skip=4, count=5)
    assert all(c.shape == (2, 5) and c.min() >= 4 for c in chosen)
    exact, rest = split_exact(full, 4, chosen)
    _parts_merge_to_the_whole(full, exact, rest, q)


@pytest.mark.parametrize("by", ["mass", "output"])
def test_the_ranking_does_not_depend_on_how_queries_are_chunked(by):
    torch.manual_seed(0)
    full = prefill(tiny_llama(), torch.randint(3, 300, (120,)))
    q = torch.randn(3 * 2, 300, 16)
    whole = choose_tokens(q, full, 0.25, skip=4, count=9, choice=TokenChoice(by), chunk=300)
    for chunk in (None, 7, 64):
        assert all(torch.equal(a, b) for a, b in zip(whole, choose_tokens(q, full, 0.25, skip=4, count=9,
                                                                         choice=TokenChoice(by), chunk=chunk)))


def test_heads_keep_unequal_exact_tokens_and_the_rest_still_merge_to_the_whole_document():
    """Counts per KV head: a head's row is padded with -1, its padding holds no token and evicts none."""
    torch.manual_seed(0)
    full = prefill(tiny_llama(), torch.randint(3, 300, (50,)))
    q = torch.randn(3 * 2, 40, 16)
    counts = [(7, 0), (3, 3), (0, 0)]
    chosen = choose_tokens(q, full, 0.25, skip=4, count=counts)
    assert [tuple((c >= 0).sum(-1).tolist()) for c in chosen] == [(7, 0), (3, 3), (0, 0)]
    exact, rest = split_exact(full, 4, chosen)
    assert [exact.head_counts(layer) for layer in range(3)] == [[11, 4], [7, 7], [4, 4]]
    assert exact.bias[0] is not None and exact.bias[1] is None  # only a ragged layer carries padding
    _parts_merge_to_the_whole(full, exact, rest, q)
    # The same tokens prepended to local keys (the compile's path) give what merging them apart gives.
    b, heads, L, d = 2, 4, 3, 16
    qh, k, v = torch.randn(b, heads, L, d), torch.randn(b, 2, L, d), torch.randn(b, 2, L, d)
    mask = torch.zeros(b, 1, L, L)
    mask[0, :, :, :1] = torch.finfo(torch.float32).min  # a left pad
    key, value, folded_mask = exact.prepend(0, k, v, mask)
    assert folded_mask.shape == (b, 2, L, key.shape[2])  # one mask per KV head
    folded = exact_attention(qh, key, value, 0.25, folded_mask)
    local = exact_attention(qh, k, v, 0.25, mask)
    o, lse = merge(local[0].reshape(b, 2, -1, d), local[1].reshape(b, 2, -1), *exact(0, qh.reshape(b, 2, -1, d), 0.25))
    torch.testing.assert_close(folded[0].reshape(b, 2, -1, d), o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded[1].reshape(b, 2, -1), lse, atol=1e-5, rtol=1e-5)


def test_exact_tokens_by_head_go_where_the_kl_is_and_round_trip(ws, tokenizer, tmp_path):
    config = dict(allocation="gap", exact_share=0.3, probe_steps=20, head_gap_layers=2)
    art = compile_bank(ws, **config)
    per_head = art.manifest["metrics"]["exact_per_head"]
    gaps = ws.probe(replace(ws.config, **config), heads=True)
    layer_gaps, measured = gaps.layers, gaps.heads
    assert len(measured) == 2 and set(measured) <= set(range(len(layer_gaps)))
    assert "head gaps" in art.manifest["timings"]
    assert any(len(set(c)) > 1 for c in per_head)  # heads of one layer keep unequal numbers
    hardest = max(measured, key=lambda i: max(measured[i]))
    top = max(range(len(per_head[hardest])), key=measured[hardest].__getitem__)
    assert per_head[hardest][top] == max(per_head[hardest])
    assert sum(map(sum, per_head)) <= len(per_head) * len(per_head[0]) * uniform_exact(ws.n, replace(FAST, **config), head_dim(ws.model.config))
    assert art.memory_ratio() <= FAST.budget  # bytes count real tokens, not a head's padding
    worst = layer_gaps.index(max(layer_gaps))  # `info` names each head's tokens in the hardest layer
    assert f"{worst} ({max(layer_gaps):.3f}; exact tokens by KV head {'/'.join(map(str, per_head[worst]))})" in summary(art)
    path = art.save(tmp_path / "heads.nectar")
    loaded = nectar.Artifact.load(path)
    assert loaded.nbytes() == art.nbytes() and path.stat().st_size < art.nbytes() + 64_000
    assert [loaded.sinks.head_counts(i) for i in range(len(per_head))] == \
        [[FAST.sink_tokens + c for c in counts] for counts in per_head]
    assert_same_logits(ws.model, tokenizer, loaded, art)
    provider, sinks = loaded.providers(ws.model)
    assert isinstance(provider.exact, CodedTokens) and cacheable(ws.model, sinks)
    _exact_beside_answers_as_every_token_a_sink(ws, tokenizer, loaded, art, rows=2)


def test_chosen_tokens_are_the_choose_tokens():
    full = prefill(tiny_llama(), torch.randint(3, 300, (50,)))
    target = full.keys[0][:, 20:21] * 10  # queries aligned with token 20's key attend to it most
    q = target.expand(2, 30, 16).repeat(3, 1, 1)
    assert (choose_tokens(q, full, 0.25, skip=4, count=1)[0] == 20).all()


def test_exact_power_above_one_prefers_a_sharply_attended_token_to_a_diffusely_attended_one():
    """Token 1 draws 0.4 of ten queries' attention (mass 4.0), token 2 all of three queries' (mass 3.0):
    the summed mass keeps token 1, squared attention (1.6 against 3.0) keeps token 2."""
    keys = torch.zeros(1, 6, 3)
    keys[0, 1, 0] = keys[0, 2, 1] = 1.0
    full = ExactContext([keys], [torch.randn(1, 6, 3)])
    diffuse = torch.tensor([torch.log(torch.tensor(0.4 / 0.6 * 4)).item(), -30.0, 0.0]).expand(10, 3)
    sharp = torch.tensor([0.0, 12.0, 0.0]).expand(3, 3)
    q = torch.cat([diffuse, sharp])[None]
    assert choose_tokens(q, full, 1.0, skip=0, count=1)[0].item() == 1
    assert choose_tokens(q, full, 1.0, skip=0, count=1, choice=TokenChoice(power=2.0))[0].item() == 2


def test_ranking_by_output_prefers_a_token_whose_value_stands_out_to_one_read_more():
    """Every query gives token 1 half its attention and token 2 a fifth; only token 2's value differs from
    what the query reads (o = 0.2 e1). By mass token 1 stays exact; by output error (0.5 x 0.2 against 0.2 x
    0.8) token 2 does."""
    p = torch.tensor([0.1, 0.5, 0.2, 0.1, 0.05, 0.05])
    values = torch.zeros(1, 6, 3)
    values[0, 2, 0] = 1.0
    full = ExactContext([torch.eye(6)[None]], [values])
    q = p.log().expand(1, 4, 6)
    assert choose_tokens(q, full, 1.0, skip=0, count=1)[0].item() == 1
    assert choose_tokens(q, full, 1.0, skip=0, count=1, choice=TokenChoice("output"))[0].item() == 2


@pytest.mark.parametrize("other", [TokenChoice(power=4.0), TokenChoice("output")])
def test_the_workspace_keeps_a_split_per_token_choice(ws, other):
    """Splits are cached by (counts, choice): another choice ranks its own tokens, the same one reuses its split."""
    counts = plan_of(ws, replace(ws.config, exact_share=0.3)).counts
    assert ws.split(counts, TokenChoice())[0] is ws.split(counts, TokenChoice())[0]
    first, second = ws.split(counts, TokenChoice())[0], ws.split(counts, other)[0]
    assert first is not second
    assert not all(torch.equal(a, b) for a, b in zip(first.keys, second.keys))


def test_exact_share_keeps_the_budget_and_beats_no_document(ws, tmp_path):
    art = compile_bank(ws, exact_share=0.3)
    assert art.manifest["metrics"]["exact_tokens"] == uniform_exact(ws.n, replace(FAST, exact_share=0.3), head_dim(ws.model.config)) > 0
    assert art.sinks.keys[0].shape[1] == FAST.sink_tokens + art.manifest["metrics"]["exact_tokens"]
    assert art.memory_ratio() <= FAST.budget
    for fid in art.manifest["metrics"]["fidelity"].values():
        assert fid["nectar"]["answer"]["kl"] < fid["no_document"]["answer"]["kl"]
    loaded = nectar.Artifact.load(art.save(tmp_path / "e.nectar"))
    torch.testing.assert_close(loaded.sinks.keys[1], art.sinks.keys[1].float(), atol=1e-2, rtol=1e-2)
    provider, sinks = loaded.providers(ws.model)  # 8-bit tokens stay coded, even when every layer keeps as many
    assert isinstance(provider, WithExact) and isinstance(provider.exact, CodedTokens)
    assert [k.shape[1] for k in sinks.keys] == [FAST.sink_tokens] * len(sinks.keys)


@pytest.mark.parametrize("bits, value_bits, more, stored, read", [
    (8, 8, 2.0, torch.int8, "8-bit"),
    (8, None, 2.4, torch.int8, "8-bit keys, 4-bit values"),  # the default: values 4-bit, a scale per token
    (4, 4, 3.5, torch.uint8, "4-bit"),
])
def test_quantised_exact_tokens_hold_more_in_the_same_bytes(ws, tmp_path, bits, value_bits, more, stored, read):
    wide = compile_bank(ws, exact_share=0.3, exact_bits=bits, exact_value_bits=value_bits)
    narrow = compile_bank(ws, exact_share=0.3, exact_bits=16, exact_value_bits=16)
    tokens = [a.manifest["metrics"]["exact_tokens"] for a in (wide, narrow)]
    # 16-bit K and V take 2d numbers a token; 8 + 4 bits with a scale per token 0.75d + 1 (d = 16 here: 2.46x).
    assert tokens[0] >= more * tokens[1] - 4 and tokens[1] > 0
    assert wide.exact_bits == bits and narrow.exact_bits == narrow.exact_value_bits == 16
    assert f"up to {tokens[0]} chosen ({read})" in summary(wide)
    assert wide.memory_ratio() <= FAST.budget and narrow.memory_ratio() <= FAST.budget
    tensors = wide.tensors()
    assert tensors["exact.keys"].dtype == stored and tensors["sinks.keys"].shape[2] == FAST.sink_tokens
    assert ("exact.values.row_scale" in tensors) == (wide.exact_value_bits == 4)  # one scale per value token
    # 4-bit codes go two to a byte: the file holds the bytes the budget counts.
    assert tensors["exact.keys"].shape[-1] == ws.model.config.head_dim * bits // 8
    # What the compile evaluated is what the file reads back: the tokens already sit on their grid.
    loaded = nectar.Artifact.load(wide.save(tmp_path / "w.nectar"))
    for a, b in zip(loaded.sinks.keys + loaded.sinks.values, wide.sinks.keys + wide.sinks.values):
        torch.testing.assert_close(a, b.float(), atol=1e-3, rtol=1e-2)
    assert loaded.nbytes() == wide.nbytes()


def test_8_bit_tokens_keep_the_sinks_and_round_the_rest_per_channel():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 16) * torch.logspace(-2, 1, 16)  # channels of very different scales, as keys have
    y = round_tokens(x, skip=4)
    assert torch.equal(y[:, :4], x[:, :4]) and not torch.equal(y, x)
    # Per channel, the error is within half a step of that channel's own scale, not the largest channel's.
    step = x[:, 4:].abs().amax(1, keepdim=True) / 127
    assert ((y - x)[:, 4:].abs() <= step / 2 + 1e-6).all()
    assert torch.equal(round_tokens(x, skip=4, bits=16), x)


def test_4_bit_codes_pack_two_to_a_byte_and_unpack_exactly():
    codes = torch.randint(-7, 8, (3, 5, 16), dtype=torch.int8)
    packed = pack4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack4(packed), codes)


@torch.no_grad()
def test_uneven_exact_tokens_and_the_rest_generate_as_the_full_cache(tokenizer):
    """Layers keeping different numbers of exact tokens cannot share a prefix cache: they are bound instead."""
    torch.manual_seed(0)
    model = tiny_llama()
    doc = torch.randint(3, 300, (40,))
    full = prefill(model, doc)
    chosen = choose_tokens(torch.randn(3 * 2, 30, 16), full, 0.25, skip=4, count=[0, 7, 2])
    exact, rest = split_exact(full, 4, chosen)
    assert [k.shape[1] for k in exact.keys] == [4, 11, 6] and not cacheable(model, exact)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 9)]
    want = generate_ids(model, tokenizer, prompts, len(doc), full, max_new_tokens=6)
    assert generate_ids(model, tokenizer, prompts, len(doc), rest, exact, max_new_tokens=6) == want


def test_no_head_keeps_more_of_the_document_exact_than_the_cap(ws):
    config = replace(ws.config, allocation="gap", exact_share=0.3, probe_steps=20, head_gap_layers=2)
    loose = plan_of(ws, config).counts
    top, even = max(map(max, loose)), uniform_exact(ws.n, config, head_dim(ws.model.config))
    assert top > even + 1  # the KL is uneven enough for a cap between the two to bind
    cap = (top + even) // 2
    tight = plan_of(ws, replace(config, exact_head_cap=cap / (ws.n - config.sink_tokens))).counts
    assert max(map(max, tight)) <= cap < top
    assert sum(map(sum, tight)) >= sum(map(sum, loose)) - len(loose) * len(loose[0])  # the rest moves elsewhere
    with pytest.raises(NectarError, match="exact_head_cap must be in"):
        replace(FAST, exact_head_cap=1.0)


def test_gap_allocation_puts_the_exact_tokens_where_the_kl_is(ws, tokenizer, tmp_path):
    config = dict(allocation="gap", exact_share=0.3, probe_steps=20, head_gap_layers=0)
    art = compile_bank(ws, **config)
    counts = art.manifest["metrics"]["exact_per_layer"]
    gaps = ws.probe(replace(ws.config, **config)).layers
    assert len(set(counts)) > 1 and counts.index(max(counts)) == gaps.index(max(gaps))
    assert sum(counts) <= len(counts) * uniform_exact(ws.n, replace(FAST, **config), head_dim(ws.model.config))
    assert [k.shape[1] for k in art.sinks.keys] == [FAST.sink_tokens + c for c in counts]
    assert art.memory_ratio() <= FAST.budget
    top = gaps.index(max(gaps))
    assert f"{top} ({max(gaps):.3f}; {counts[top]} exact tokens per head)" in summary(art)
    loaded = nectar.Artifact.load(art.save(tmp_path / "gap.nectar"))
    assert [k.shape[1] for k in loaded.sinks.keys] == [k.shape[1] for k in art.sinks.keys]
    assert_same_logits(ws.model, tokenizer, loaded, art)
    provider, sinks = loaded.providers(ws.model)  # sinks alike in every layer: a prefix cache holds them
    assert isinstance(provider, WithExact) and cacheable(ws.model, sinks)
    assert isinstance(provider.exact, CodedTokens)  # 8-bit tokens stay 8-bit in memory
    assert loaded.resident_bytes(ws.model) < 2 * loaded.nbytes()
    _exact_beside_answers_as_every_token_a_sink(ws, tokenizer, loaded, art, rows=1)


def _exact_beside_answers_as_every_token_a_sink(ws, tokenizer, loaded, art, rows: int):
    """Exact tokens held beside the modules give the logits of prepending them all as sinks, and `ask`
    answers from the loaded file as from the compile's own artifact."""
    provider, sinks = loaded.providers(ws.model)
    ids, positions = torch.randint(3, 300, (rows, 6)), loaded.n + torch.arange(6).expand(rows, 6)
    with torch.no_grad(), bound(ws.model, provider, sinks=sinks):
        beside = ws.model(input_ids=ids, position_ids=positions).logits
    with torch.no_grad(), bound(ws.model, loaded.bank, sinks=loaded.sinks):
        prepended = ws.model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(beside, prepended, atol=1e-4, rtol=1e-4)
    questions = ["What is assert?", "When does the else clause run?"]
    assert nectar.ask(ws.model, tokenizer, loaded, questions, max_new_tokens=6) == \
        nectar.ask(ws.model, tokenizer, art, questions, max_new_tokens=6)


def test_onpolicy_refit_runs_after_the_fit_and_keeps_the_best(ws):
    art = compile_bank(ws, onpolicy_steps=20)
    timings = art.manifest["timings"]
    assert "capture on-policy" in timings and "fit on-policy" in timings
    assert art.manifest["metrics"]["onpolicy"]["steps"] >= 1


def test_each_onpolicy_round_captures_with_the_latest_modules(ws, monkeypatch):
    drivers = []
    real = ws.capture_driven

    def capture_driven(counts, choice, bank, timings):
        drivers.append(bank.target.weights[0].detach().clone())
        return real(counts, choice, bank, timings)

    monkeypatch.setattr(ws, "capture_driven", capture_driven)
    compile_bank(ws, onpolicy_steps=20, onpolicy_rounds=2)
    assert len(drivers) == 2 and not torch.equal(*drivers)  # the second round sees the first round's refit


def test_more_exact_tokens_than_the_budget_holds_is_refused(ws):
    with pytest.raises(nectar.NectarError, match="exact tokens"):
        compile_bank(ws, budget=0.003, exact_share=0.9)
    with pytest.raises(nectar.NectarError, match="exact_share"):
        nectar.CompileConfig(exact_share=1.0)


def test_attention_matching_with_room_for_every_token_is_exact():
    torch.manual_seed(0)
    full = prefill(tiny_llama(), torch.randint(3, 300, (24,)))
    q = torch.randn(6, 300, 16)
    matched = attention_matching(full, q, budget=0.999, scaling=0.25, ridge=1e-6)
    assert matched.keys[0].shape[1] == 24 - 1 or matched.keys[0].shape[1] == 24
    x = torch.randn(1, 2, 7, 16)
    for layer in range(3):
        want, got = full(layer, x, 0.25), matched(layer, x, 0.25)
        torch.testing.assert_close(got[1], want[1], atol=0.2, rtol=0.05)


def test_attention_matching_beats_a_window_of_the_same_bytes():
    from nectar.providers.baselines import streaming_llm

    torch.manual_seed(1)
    full = prefill(tiny_llama(), torch.randint(3, 300, (80,)))
    q = torch.randn(6, 600, 16) * 2
    matched = attention_matching(full, q[:, :400], budget=0.2, scaling=0.25)
    window = streaming_llm(full, 0.2, sinks=4)
    assert 0 < matched_bytes(matched, 80) <= 0.2
    errors = {"matched": 0.0, "window": 0.0}
    for layer in range(3):
        x = q[2 * layer: 2 * layer + 2, 400:].unsqueeze(0)  # queries the fit never saw
        want = full(layer, x, 0.25)[0]
        errors["matched"] += (matched(layer, x, 0.25)[0] - want).norm().item()
        errors["window"] += (window(layer, x, 0.25)[0] - want).norm().item()
    assert errors["matched"] < errors["window"]


def test_a_refining_gap_compile_captures_nothing_twice(tokenizer, monkeypatch):
    """The exact tokens are chosen with the probe's queries, and the teacher comes from a capture: neither
    needs a pass of its own."""
    import nectar.compiler.workspace as workspace

    real = workspace.capture
    descs, sizes = [], []

    def capture(*args, **kwargs):
        descs.append(args[6] if len(args) > 6 else kwargs.get("desc"))
        sizes.append((descs[-1], len(args[1]), kwargs.get("drive") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(workspace, "capture", capture)
    monkeypatch.setattr(workspace, "teacher", lambda *a, **k: pytest.fail("a separate teacher pass"))
    config = replace(FAST, allocation="gap", exact_share=0.3, probe_steps=20, refine_steps=4)
    ws = Workspace(tiny_llama(), tokenizer, sample_document(1500), config)
    art = compile_bank(ws)
    assert "choose exact tokens" not in descs and "teacher" not in art.manifest["timings"]
    assert len(set(art.manifest["metrics"]["exact_per_layer"])) > 1 and art.manifest["metrics"]["refine"]
    # The short fits (probe, on-policy refit) capture every other training sequence; the main fit all.
    train = len(ws.training.train_sequences)
    assert [size for desc, size, _ in sizes if desc == "capture train"] == [(train + 1) // 2, train, (train + 1) // 2]
    # Each capture is timed under its own stage (values round to 0.1 s, so a tiny model's may read 0.0).
    assert {"capture (probe)", "capture", "capture on-policy"} <= set(art.manifest["timings"])


@pytest.fixture
def gap_batches(monkeypatch):
    """How many prompts each call of the probe's `layer_gaps` measured, in order."""
    import nectar.compiler.probe as probe

    seen, real = [], probe.layer_gaps

    def layer_gaps(model, pairs, *args, **kwargs):
        seen.append(len(pairs))
        return real(model, pairs, *args, **kwargs)

    monkeypatch.setattr(probe, "layer_gaps", layer_gaps)
    return seen


def test_the_gap_allocation_measures_on_probe_prompts_questions(tokenizer, gap_batches):
    ws = Workspace(tiny_llama(), tokenizer, sample_document(1500),
                   replace(FAST, allocation="gap", probe_prompts=3, probe_recall=0))
    ws.probe(ws.config)
    ws.probe(replace(ws.config, probe_prompts=2))  # another probe setting: measured anew
    assert gap_batches == [3, 2]
    with pytest.raises(NectarError, match="probe_prompts must be >= 1"):
        replace(FAST, probe_prompts=0)
    with pytest.raises(NectarError, match="head_gap_layers must be >= 0"):
        replace(FAST, head_gap_layers=-1)
    with pytest.raises(NectarError, match="probe_recall must be >= 0"):
        replace(FAST, probe_recall=-1)


def test_recall_prompts_join_the_probe_as_a_share_of_their_own_total(tokenizer, gap_batches):
    import nectar.compiler.probe as probe

    assert probe.mixed_gaps(lambda pairs: [1.0, 3.0], ["q"], []) == [1.0, 3.0]  # off: the questions' KL as it was
    # Recall's KL, 100x larger, moves the shares without drowning the questions: the total stays theirs.
    kl = {"q": [3.0, 1.0], "r": [100.0, 300.0]}
    mixed = probe.mixed_gaps(lambda pairs: kl[pairs[0]], ["q"], ["r"])
    assert mixed == pytest.approx([4 * (0.75 + 0.25) / 2, 4 * (0.25 + 0.75) / 2])
    ws = Workspace(tiny_llama(), tokenizer, sample_document(1500),
                   replace(FAST, allocation="gap", probe_prompts=3, probe_recall=2))
    ws.probe(ws.config)
    assert gap_batches == [3, 2]  # the questions, then the recall prompts


def test_values_at_4_bits_hold_a_scale_per_token_and_artifacts_from_before_read_as_their_keys(ws, tmp_path):
    art = compile_bank(ws, exact_share=0.3)  # the default: 8-bit keys, 4-bit values with a scale per token
    assert art.exact_value_bits == 4 and art.manifest["config"]["exact_value_bits"] == 4
    s = art.manifest["sink_tokens"]
    values = art.sinks.values[1][:, s:].float()
    scales = values.abs().amax(-1, keepdim=True) / 7  # each token's own grid: 7 levels each side
    torch.testing.assert_close(values / scales, (values / scales).round(), atol=2e-2, rtol=0)
    old = nectar.Artifact.load(compile_bank(ws, exact_share=0.3, exact_value_bits=8).save(tmp_path / "old.nectar"))
    del old.manifest["config"]["exact_value_bits"]  # as written before values had bits of their own
    assert old.exact_value_bits == old.exact_bits == 8


@pytest.mark.parametrize("bits", [4, 8])
def test_coded_tokens_answer_as_the_tokens_they_read_back_as(bits):
    torch.manual_seed(0)
    tokens = [torch.randn(3, t, 16) * torch.logspace(-1, 1, 16) for t in (0, 5, 9)]  # a layer may keep none
    on_grid = ExactContext([round_tokens(x, 0, bits) for x in tokens], [round_tokens(x * 2, 0, bits, values=True) for x in tokens])
    coded = CodedTokens.of(on_grid, bits)
    q = torch.randn(2, 3, 4, 16)
    for layer in (1, 2):
        for got, want in zip(coded(layer, q, 0.25), on_grid(layer, q, 0.25)):
            torch.testing.assert_close(got, want)
        # In bf16 the scales fold into the query, so it rounds q * scale where a dequantised copy rounds the
        # keys: as close as bf16 itself, not bitwise the same.
        for got, want in zip(coded(layer, q.bfloat16(), 0.25), on_grid(layer, q, 0.25)):
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    # Memory holds the codes, a byte per number (4-bit ones unpacked: no unpacking at each call), not the
    # model dtype's two.
    assert [coded.count(layer) for layer in range(3)] == [0, 5, 9]
    assert all(c.dtype == torch.int8 for c, _ in coded.keys + coded.values)
    assert sum(c.numel() for c, _ in coded.keys) == sum(x.numel() for x in tokens)


@pytest.mark.parametrize("bits", [4, 8])
def test_coded_tokens_hold_only_real_rows_where_heads_keep_unequal_numbers(bits):
    """One head keeps 7 tokens, its neighbours 1 and 3: memory holds 11 rows, not 3 x 7, and answers as the
    padded tokens do."""
    torch.manual_seed(0)
    pad = torch.arange(7) >= torch.tensor([7, 1, 3])[:, None]
    x = (torch.randn(3, 7, 16) * torch.logspace(-1, 1, 16)).masked_fill(pad[..., None], 0.0)  # zeros, as stored
    bias = torch.zeros(3, 7).masked_fill(pad, float("-inf"))
    on_grid = ExactContext([round_tokens(x, 0, bits)], [round_tokens(x * 2, 0, bits, values=True)], [bias])
    coded = CodedTokens.of(on_grid, bits)
    q = torch.randn(2, 6, 4, 16)  # two query heads per KV head
    for got, want in zip(coded(0, q, 0.25), on_grid(0, q, 0.25)):
        torch.testing.assert_close(got, want)
    assert coded.count(0) == 7 and coded.keys[0][0].shape[0] == 11


@pytest.mark.parametrize("bits", [8, 16])
def test_a_head_that_keeps_no_tokens_adds_nothing(bits):
    """Its neighbours keep some, so its keys are all padding. The kernel gives such a head lse 0 and output 0;
    merged so, a zero vector would take a share of the module's attention (MPL's 0.5% artifact has four)."""
    torch.manual_seed(0)
    x = round_tokens(torch.randn(3, 5, 16), 0, bits).index_fill(0, torch.tensor([1]), 0.0)
    bias = torch.zeros(3, 5).index_fill(0, torch.tensor([1]), float("-inf"))
    exact = ExactContext([x], [x * 2], [bias])
    tokens = exact if bits == 16 else CodedTokens.of(exact, bits)
    q = torch.randn(2, 3, 4, 16)
    _, lse = tokens(0, q, 0.25)
    assert torch.isneginf(lse[:, 1]).all() and torch.isfinite(lse[:, [0, 2]]).all()
    module = (torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4))
    merged, merged_lse = WithExact(lambda *_: module, tokens)(0, q, 0.25)
    torch.testing.assert_close(merged[:, 1], module[0][:, 1])
    torch.testing.assert_close(merged_lse[:, 1], module[1][:, 1])


def test_the_screening_nnls_finds_the_exact_solution():
    from scipy.optimize import nnls

    from nectar.providers.baselines.attention_matching import _projected_nnls

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(300, 40, dtype=torch.float64) * 3, -1)
    want = torch.from_numpy(nnls(probs.numpy(), torch.ones(300, dtype=torch.float64).numpy())[0])
    got = _projected_nnls(probs, steps=3000)
    ones = torch.ones(300, dtype=torch.float64)
    assert (got >= 0).all()
    assert (probs @ got - ones).norm() <= (probs @ want - ones).norm() * 1.01 + 1e-9


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding layers around one global layer
def test_gap_cells_read_the_reference_back_up_to_their_layer_with_the_same_kl(family):
    """The probe's fast path (up to a cell's layer, the reference's outputs read back) against every layer
    attending over the document again."""
    from nectar.providers.attention import NoContext
    from nectar.measure.fidelity import layer_gaps
    from nectar.model.models import modeled_layers
    from nectar.runtime.prefill import split_sinks, window_tails
    from test_families import SUPPORTED, tiny as tiny_family

    model = tiny_llama(num_hidden_layers=4) if family == "llama" else tiny_family(*SUPPORTED["gemma3"])
    torch.manual_seed(0)
    full = prefill(model, torch.randint(3, 300, (80,)))
    sinks, _ = split_sinks(full, 4)
    pairs = [(torch.randint(3, 300, (9 + i,)).tolist(), torch.randint(3, 300, (6,)).tolist()) for i in range(5)]
    modeled, kv = modeled_layers(model.config), model.config.num_key_value_heads
    layers = modeled + [layer for layer in modeled for _ in range(kv)]  # every layer, then each head of each
    heads = [None] * len(modeled) + list(range(kv)) * len(modeled)
    slow, fast = (layer_gaps(model, pairs, 80, full, (NoContext(), sinks), layers, window_tails(full), batch_size=2,
                             heads=heads, replay=replay) for replay in (False, True))
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=1e-5, atol=1e-7)
    assert min(slow) > 1e-4  # every cell measured something


def test_scoring_the_answers_alone_gives_the_same_answer_numbers():
    """The gap probe scores answers only (no vocabulary-wide work at question or padding positions): each
    answer number must be the one a full scoring reports, to the bit."""
    from nectar.measure.fidelity import next_token_fidelity
    from nectar.runtime.prefill import split_sinks

    model = tiny_llama(num_hidden_layers=3)
    torch.manual_seed(0)
    full = prefill(model, torch.randint(3, 300, (60,)))
    sinks, _ = split_sinks(full, 4)
    pairs = [(torch.randint(3, 300, (5 + 3 * i,)).tolist(), torch.randint(3, 300, (2 + i,)).tolist()) for i in range(5)]
    methods = {"sinks": (NoContext(), sinks), "none": (NoContext(), None)}
    both, answers = (next_token_fidelity(model, pairs, 60, (full, None), methods, batch_size=3, progress=False,
                                         parts=parts) for parts in (("question", "answer"), ("answer",)))
    for name in methods:
        assert set(answers[name]) == {"answer"}
        assert answers[name]["answer"] == both[name]["answer"]
    assert both["none"]["answer"]["kl"] > 0 and both["none"]["question"]["tokens"] == sum(len(q) - 1 for q, _ in pairs)


@torch.no_grad()
@pytest.mark.parametrize("context", ["none", "document"])
def test_repeated_prompts_read_once_generate_as_each_row_alone(tokenizer, context):
    """A batch that repeats prompts (a chunk's study requests) prefills each once and shares its cache."""
    torch.manual_seed(0)
    model = tiny_llama()
    doc = torch.randint(3, 300, (30,))
    n, provider = (0, NoContext()) if context == "none" else (len(doc), prefill(model, doc))
    a, b = (torch.randint(3, 300, (k,)).tolist() for k in (5, 9))
    batch = [a, b, a, a, b]
    alone = [generate_ids(model, tokenizer, [p], n, provider, max_new_tokens=6)[0] for p in batch]
    assert generate_ids(model, tokenizer, batch, n, provider, max_new_tokens=6) == alone
