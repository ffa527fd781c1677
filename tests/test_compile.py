"""End to end on a tiny random model: compile, save, load, attach, ask, and the artifact's integrity."""
import json
from dataclasses import replace

import pytest
import torch

import nectar
from nectar.compiler.pipeline import compile_bank
from nectar.compiler.plan import mlp_bank
from nectar.compiler.workspace import Workspace
from nectar.measure.fidelity import warn_if_useless
from nectar.compiler.budget import params_per_module, uniform_exact
from nectar.config import EXACT_SHARE, EXACT_SHARE_EVEN, MIN_MODULE_WIDTH, VALUES_4BIT_UP_TO
from nectar.model.documents import document_ids
from nectar.model.models import head_dim, attention_layers
from nectar.runtime.prefill import prefill, split_sinks
from nectar.model.templates import templates_for
from conftest import FAST, assert_same_logits, sample_document, tiny_llama


def test_compile_meets_its_budget_and_beats_no_document(compiled):
    _, art = compiled
    assert art.memory_ratio() <= FAST.budget
    for fid in art.manifest["metrics"]["fidelity"].values():
        assert fid["nectar"]["answer"]["kl"] < fid["no_document"]["answer"]["kl"]
    assert set(art.manifest["timings"]) >= {"prefill", "prompts", "capture", "fit", "evaluate", "total"}


def test_artifact_round_trips_exactly(compiled, saved, tokenizer):
    model, art = compiled
    loaded = nectar.Artifact.load(saved)
    assert loaded.manifest == art.manifest
    assert loaded.document_ids == art.document_ids
    q = torch.randn(2, model.config.num_key_value_heads, 5, 16)
    # Saved weights are fp16: the loaded bank equals the original up to that rounding.
    for a, b in zip(loaded.bank(1, q), art.bank(1, q)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert_same_logits(model, tokenizer, loaded, art)


def test_attach_leaves_no_document_cache_and_restores_model(compiled):
    model, art = compiled
    with nectar.attach(model, art):
        out = model(input_ids=torch.randint(3, 300, (1, 4)), position_ids=art.n + torch.arange(4).view(1, -1),
                    use_cache=True)
        assert out.past_key_values.get_seq_length() == 4  # only the local tokens are cached
    assert model.config._attn_implementation == "eager"


class _ExactArtifact:
    """The shared artifact with the exact document in place of its modules: `ask` must then answer
    exactly as `ask_full` does, which checks the templating, positions and sinks of the ask path."""

    def __init__(self, art, model):
        self.art, self.providers_ = art, split_sinks(prefill(model, torch.tensor(art.document_ids)), 4)[::-1]

    def __getattr__(self, name):
        return getattr(self.art, name)

    def providers(self, model):
        return self.providers_


def test_ask_with_the_exact_document_answers_as_the_full_cache(compiled, tokenizer):
    model, art = compiled
    questions = ["What is assert?", "And if?", "When does the else clause run?"]
    exact = nectar.ask(model, tokenizer, _ExactArtifact(art, model), questions, max_new_tokens=8)
    assert exact == nectar.ask_full(model, tokenizer, art, questions, max_new_tokens=8)
    assert all(exact)


def test_custom_templates_reach_the_artifact_and_ask(tokenizer):
    model = tiny_llama()
    config = replace(FAST, document_template="DOC: {document} END", question_template="\nQ: {question}\nA:")
    art = nectar.compile(model, tokenizer, sample_document(1500), config)
    assert art.question_template == "\nQ: {question}\nA:"
    assert tokenizer.decode(art.document_ids).startswith("DOC: ")
    questions = ["What is assert?", "What is if?"]
    exact = nectar.ask(model, tokenizer, _ExactArtifact(art, model), questions, max_new_tokens=6)
    assert exact == nectar.ask_full(model, tokenizer, art, questions, max_new_tokens=6)


def test_artifact_for_another_model_is_refused(compiled):
    _, art = compiled
    with pytest.raises(nectar.NectarError, match="compiled for model"):
        with nectar.attach(tiny_llama(seed=1), art):
            pass


def test_truncated_artifact_is_refused(saved, tmp_path):
    path = tmp_path / "doc.nectar"
    data = saved.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(nectar.NectarError, match="truncated or corrupted"):
        nectar.Artifact.load(path)


def test_corrupted_tensor_bytes_are_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "doc.nectar").write_bytes(bytes(data))
    with pytest.raises(nectar.NectarError, match="corrupted"):
        nectar.Artifact.load(tmp_path / "doc.nectar")


@pytest.mark.parametrize("field", ["tokens", "sha256"])
def test_a_changed_manifest_byte_is_refused(compiled, saved, tmp_path, field):
    """The header is under the checksum: one edited digit of the document's length or hash is caught."""
    art = compiled[1]
    data = saved.read_bytes()
    if field == "tokens":
        old = f'\\"tokens\\": {art.n}'.encode()
        new = f'\\"tokens\\": {art.n + 1}'.encode() if len(str(art.n + 1)) == len(str(art.n)) else None
    else:
        digest = art.manifest["document"]["sha256"]
        old, new = digest.encode(), ("0" if digest[0] != "0" else "1").encode() + digest[1:].encode()
    assert data.count(old) == 1
    (tmp_path / "doc.nectar").write_bytes(data.replace(old, new))
    with pytest.raises(nectar.NectarError, match="corrupted"):
        nectar.Artifact.load(tmp_path / "doc.nectar")


def test_interrupted_save_leaves_nothing_that_loads(compiled, tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.write_bytes

    def interrupted(self, data):  # half the bytes reach the disk, then Ctrl-C
        real(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted)
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


def test_too_long_document_is_refused_or_truncated(tokenizer, capsys):
    model = tiny_llama()
    text = sample_document(100_000) * 3
    template = templates_for(tokenizer, FAST)["document"]
    with pytest.raises(nectar.NectarError, match="--truncate"):
        document_ids(text, tokenizer, model, False, template)
    ids = document_ids(text, tokenizer, model, True, template)
    assert len(ids) == model.config.max_position_embeddings - model.config.max_position_embeddings // 4
    assert "kept the first 1536 of its" in capsys.readouterr().err


def test_token_id_context_is_used_verbatim(tokenizer):
    model = tiny_llama()
    ids = torch.randint(3, 300, (700,))
    assert document_ids(ids, tokenizer, model, False, "{document}") == ids.tolist()
    with pytest.raises(nectar.NectarError, match="1-D integer"):
        document_ids(ids.view(7, 100), tokenizer, model, False, "{document}")


def test_target_softmax_must_be_a_boolean():
    # A config read from JSON could carry "false", which would otherwise switch it on.
    with pytest.raises(nectar.NectarError, match="target_softmax must be true or false"):
        nectar.CompileConfig(target_softmax="false")


def test_question_template_needs_its_slot():
    with pytest.raises(nectar.NectarError, match="question"):
        nectar.CompileConfig(question_template="no slot here")


def test_manifest_survives_json_and_says_what_loading_checks(compiled):
    manifest = compiled[1].manifest
    assert json.loads(json.dumps(manifest)) == manifest
    assert {"model", "tokenizer", "document", "templates", "modules", "config", "metrics", "timings"} <= set(manifest)
    assert manifest["document"]["tokens"] == compiled[1].n and manifest["model"]["fingerprint"]["weights"]
    # The config as asked, with the bits its exact values were stored at written out.
    assert nectar.CompileConfig.from_dict(manifest["config"]) == replace(FAST, exact_value_bits=FAST.value_bits)
    # An artifact written before tokens were ranked by output error chose them by attention mass.
    older = {k: v for k, v in manifest["config"].items() if k != "exact_by"}
    assert FAST.exact_by == "output" and nectar.CompileConfig.from_dict(older).exact_by == "mass"
    # One written before the gap probe weighed recall prompts measured questions only.
    older = {k: v for k, v in manifest["config"].items() if k != "probe_recall"}
    assert FAST.probe_recall == 4 and nectar.CompileConfig.from_dict(older).probe_recall == 0


def test_a_useless_compile_says_so(capsys):
    fid = {"agreement": 0.6, "kl": 1.0, "tokens": 10}
    warn_if_useless({"nectar": fid, "no_document": dict(fid, agreement=0.7)})
    assert "no better than no document" in capsys.readouterr().err
    warn_if_useless({"nectar": dict(fid, agreement=0.8), "no_document": fid})
    assert capsys.readouterr().err == ""


def test_a_training_set_counts_its_prompt_kinds(tokenizer):
    training = Workspace(tiny_llama(), tokenizer, sample_document(1500), FAST).training
    assert training.kinds == {"recall": 12, "self_study": training.kinds["self_study"], "generic": 6, "direct": 0}
    assert sum(training.kinds.values()) == len(training.prompts)


def test_attention_layers_found_in_order(compiled):
    assert [m.layer_idx for m in attention_layers(compiled[0])] == [0, 1, 2]


def test_the_default_exact_share_is_decided_per_model_and_document(tokenizer):
    """The manifest holds the share used: the default where it fits, none where the budget cannot hold it."""
    default = replace(FAST, exact_share=None, budget=0.05)
    long = Workspace(tiny_llama(), tokenizer, sample_document(3000), default)
    short = Workspace(tiny_llama(), tokenizer, sample_document(400), replace(default, budget=0.012))
    assert long.config.exact_share == EXACT_SHARE_EVEN and short.config.exact_share == 0.0  # FAST: uniform
    gap = Workspace(tiny_llama(), tokenizer, sample_document(3000), replace(default, allocation="gap"))
    assert gap.config.exact_share == EXACT_SHARE  # more where the gap allocation places them by KV head


def _uniform_width(ws: Workspace, share: float) -> int:
    config, cfg = replace(ws.config, exact_share=share), ws.model.config
    numbers = params_per_module(cfg, ws.n, config, uniform_exact(ws.n, config, head_dim(cfg)))
    return min(mlp_bank(config, cfg, numbers).target_widths)


def test_a_small_budget_gives_exact_tokens_no_more_than_keeps_the_modules_useful(tokenizer):
    """At 2% of this document the full default share would leave the modules narrower than MIN_MODULE_WIDTH:
    the share steps down to the largest that keeps them that wide, and not below it."""
    ws = Workspace(tiny_llama(), tokenizer, sample_document(3000), replace(FAST, exact_share=None, budget=0.02,
                                                                             allocation="gap"))
    share = ws.config.exact_share
    assert 0.0 < share < EXACT_SHARE and _uniform_width(ws, EXACT_SHARE) < MIN_MODULE_WIDTH
    assert _uniform_width(ws, share) >= MIN_MODULE_WIDTH > _uniform_width(ws, round(share + 0.05, 2))


def test_each_budget_of_a_sweep_decides_its_own_default_share(tokenizer):
    """A workspace made at one budget and asked for another decides the default share at that budget, and the
    artifact says the share was a default, so that an evaluation's sweep from it decides again."""
    ws = Workspace(tiny_llama(), tokenizer, sample_document(3000), replace(FAST, exact_share=None, budget=0.05))
    small = compile_bank(ws, budget=0.02)
    assert ws.config.exact_share == EXACT_SHARE_EVEN > small.manifest["config"]["exact_share"] > 0.0
    assert small.manifest["defaulted"] == ["exact_share", "exact_value_bits"]
    assert compile_bank(ws, budget=0.02, exact_share=0.1, exact_value_bits=8).manifest["defaulted"] == []
    # Exact values: 4 bits (a scale per token) at small budgets, where more tokens pay; 8 above.
    assert small.manifest["config"]["exact_value_bits"] == 4 == replace(FAST, budget=VALUES_4BIT_UP_TO).value_bits
    assert replace(FAST, budget=0.1).value_bits == 8 and replace(FAST, budget=0.1, exact_value_bits=4).value_bits == 4


@pytest.mark.parametrize("holdout", ["chunks", "prompts"])
def test_validation_holds_out_prompts_by_its_holdout(tokenizer, holdout):
    config = replace(FAST, prompts=replace(FAST.prompts, holdout=holdout, val_fraction=0.2, chunk_tokens=256))
    ws = Workspace(tiny_llama(), tokenizer, sample_document(1500), config)
    train, val = ws.training.train, ws.training.val
    assert len(train) + len(val) == len(ws.training.prompts) and not {id(p) for p in train} & {id(p) for p in val}
    train_chunks, val_chunks = {p.chunk for p in train}, {p.chunk for p in val}
    if holdout == "chunks":  # no held-out chunk is ever trained on
        assert val_chunks and not train_chunks & val_chunks
    else:  # every chunk of the document trains, and every kind is validated
        assert train_chunks == {p.chunk for p in ws.training.prompts}
        assert {p.kind for p in val} == {p.kind for p in ws.training.prompts}


def test_an_unknown_holdout_is_refused():
    with pytest.raises(nectar.NectarError, match="holdout must be one of chunks, prompts"):
        nectar.PromptConfig(holdout="questions")


def test_a_second_compile_in_one_workspace_fits_the_same_bank(tokenizer):
    """Bank initialisation draws from the config's seed, not from the global generator that earlier stages
    advanced: an ablation compiled after another in `nectar eval` differs by its change alone."""
    ws = Workspace(tiny_llama(), tokenizer, sample_document(1500), FAST)
    first = compile_bank(ws).bank.state_dict()
    torch.rand(1000)  # whatever else draws in between
    second = compile_bank(ws).bank.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


@pytest.mark.parametrize("effort", ["quick", "fast", "default"])
def test_a_budget_too_small_for_any_module_is_refused_before_any_work(tokenizer, effort, monkeypatch):
    from nectar.config import at_effort
    from nectar.compiler.workspace import Document

    monkeypatch.setattr(Document, "full", property(lambda self: pytest.fail("prefilled before refusing")))
    config = replace(at_effort(effort), budget=1e-4)
    with pytest.raises(nectar.NectarError, match="leaves no room for modules"):
        nectar.compile(tiny_llama(), tokenizer, sample_document(600), config)


def test_stage_times_do_not_overlap(tokenizer):
    """Each stage's seconds are its own: none runs inside another's clock (choosing the exact tokens once
    counted in the capture's too), so the stages add up to the compile."""
    from nectar import timing

    first = len(timing.RUNS)
    config = replace(FAST, allocation="gap", exact_share=0.3, probe_steps=10)
    nectar.compile(tiny_llama(), tokenizer, sample_document(1500), config)
    runs = timing.RUNS[first:]
    assert {"capture", "choose exact tokens"} <= {r.name for r in runs}
    for a, b in zip(runs, runs[1:]):  # recorded as each ends: a stage nested in another ends first
        assert a.end <= b.start + 1e-6, f"{a.name} overlaps {b.name}"
