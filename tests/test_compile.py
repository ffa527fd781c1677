"""End to end on a tiny random model: compile, save, load, attach, and every bad input the issue lists."""
import json

import pytest
import torch

import nectar
from nectar.attach import attention_layers
from nectar.compiler import document_ids, templates_for
from conftest import sample_document, tiny_llama

FAST = nectar.CompileConfig(
    prompts=nectar.PromptConfig(recall=12, self_study=4, generic=6, chunk_tokens=64, answer_tokens=12),
    fit=nectar.FitConfig(steps=60, eval_every=20),
)


@pytest.fixture(scope="module")
def compiled(tokenizer):
    model = tiny_llama()
    return model, nectar.compile(model, tokenizer, sample_document(1500), FAST)


def test_compile_meets_its_budget_and_beats_no_document(compiled):
    _, art = compiled
    assert art.memory_ratio() <= FAST.budget
    for fid in art.manifest["metrics"]["fidelity"].values():
        assert fid["nectar"]["answer"]["kl"] < fid["no_document"]["answer"]["kl"]
    assert set(art.manifest["timings"]) >= {"prefill", "prompts", "capture", "fit", "evaluate", "total"}


def test_artifact_round_trips_exactly(compiled, tmp_path, tokenizer):
    model, art = compiled
    path = art.save(tmp_path / "doc.nectar")
    loaded = nectar.Artifact.load(path)
    assert loaded.manifest == art.manifest
    assert loaded.document_ids == art.document_ids
    q = torch.randn(2, model.config.num_key_value_heads, 5, 16)
    # Saved weights are fp16: the loaded bank equals the original up to that rounding.
    for a, b in zip(loaded.bank(1, q), art.bank(1, q)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    ids = torch.randint(3, 300, (1, 6))
    pos = art.n + torch.arange(6).view(1, -1)
    with nectar.attach(model, loaded, tokenizer):
        out = model(input_ids=ids, position_ids=pos).logits
    with nectar.attach(model, art, tokenizer):
        ref = model(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_attach_leaves_no_document_cache_and_restores_model(compiled):
    model, art = compiled
    with nectar.attach(model, art):
        out = model(input_ids=torch.randint(3, 300, (1, 4)), position_ids=art.n + torch.arange(4).view(1, -1),
                    use_cache=True)
        assert out.past_key_values.get_seq_length() == 4  # only the local tokens are cached
    assert model.config._attn_implementation == "eager"


def test_ask_returns_text(compiled, tokenizer):
    model, art = compiled
    answers = nectar.ask(model, tokenizer, art, ["What is assert?", "And if?"], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_artifact_for_another_model_is_refused(compiled):
    _, art = compiled
    with pytest.raises(nectar.NectarError, match="compiled for model"):
        with nectar.attach(tiny_llama(seed=1), art):
            pass


def test_truncated_artifact_is_refused(compiled, tmp_path):
    path = compiled[1].save(tmp_path / "doc.nectar")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(nectar.NectarError, match="truncated or corrupted"):
        nectar.Artifact.load(path)


def test_corrupted_artifact_is_refused(compiled, tmp_path):
    path = compiled[1].save(tmp_path / "doc.nectar")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(nectar.NectarError, match="corrupted"):
        nectar.Artifact.load(path)


def test_interrupted_save_leaves_nothing_that_loads(compiled, tmp_path, monkeypatch):
    import nectar.artifact as artifact_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compiled[1].save(tmp_path / "doc.nectar")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.0, 2.0])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(nectar.NectarError, match="budget must be in"):
        nectar.CompileConfig(budget=budget)


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_document_is_refused(tokenizer, text):
    with pytest.raises(nectar.NectarError, match="empty"):
        nectar.compile(tiny_llama(), tokenizer, text, FAST)


def test_too_long_document_is_refused_or_truncated(tokenizer):
    model = tiny_llama()
    text = sample_document(100_000) * 3
    template = templates_for(tokenizer, FAST)["document"]
    with pytest.raises(nectar.NectarError, match="--truncate"):
        document_ids(text, tokenizer, model, FAST, template)
    cut = nectar.CompileConfig(truncate=True)
    ids = document_ids(text, tokenizer, model, cut, template)
    assert len(ids) == model.config.max_position_embeddings - model.config.max_position_embeddings // 4


def test_token_id_context_is_used_verbatim(tokenizer):
    model = tiny_llama()
    ids = torch.randint(3, 300, (700,))
    assert document_ids(ids, tokenizer, model, FAST, "{document}") == ids.tolist()
    with pytest.raises(nectar.NectarError, match="1-D integer"):
        document_ids(ids.view(7, 100), tokenizer, model, FAST, "{document}")


def test_question_template_needs_its_slot():
    with pytest.raises(nectar.NectarError, match="question"):
        nectar.CompileConfig(question_template="no slot here")


def test_manifest_is_json(compiled):
    json.dumps(compiled[1].manifest)


def test_attention_layers_found_in_order(compiled):
    assert [m.layer_idx for m in attention_layers(compiled[0])] == [0, 1, 2]
