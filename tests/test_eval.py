"""`nectar eval` end to end on a tiny model: every method on one path, the report, the plots, the cache,
and the bad inputs the issue lists."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nectar.cli.commands as commands
from nectar.cli.main import main
from nectar.eval.report import spearman, table
from nectar.errors import NectarError
from nectar.questions import read_questions
from conftest import FAST, assert_one_line_error, run_cli, sample_document, tiny_llama

pytestmark = pytest.mark.integration  # servers, Ray, subprocesses or multi-compile workflows: make test, not test-fast

SMALL = ["--budget", "0.05", "--gap-prompts", "4", "--set", "fit.steps=60", "--set", "prompts=24", "--set", "onpolicy_steps=20"]


@pytest.fixture
def tiny(monkeypatch, tokenizer, tmp_path):
    """`nectar eval` loads the tiny model; its tokenizer is saved where kvpress's KVzip looks for it."""
    model = tiny_llama()
    tokenizer.save_pretrained(tmp_path / "tok")
    model.config.name_or_path = str(tmp_path / "tok")
    monkeypatch.setattr(commands, "_load", lambda name, dtype, device="auto": (model, tokenizer))
    return model



def test_eval_compares_every_method_and_caches(tiny, doc, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    import nectar.eval.runner as compare

    code = main(["eval", str(doc), "--out", str(out), *SMALL, "--sweep", "0.1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "eval.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert methods == set(compare.METHODS)
    assert {r["budget"] for r in report["rows"]} == {0.05, 0.1}
    for r in report["rows"]:
        assert r["method"] == "no_document" or 0 < r["bytes_ratio"] <= r["budget"] * 1.01, r
        assert len(r["layers"]["merged_rel"]) == tiny.config.num_hidden_layers
        assert set(r["questions"]) == {"question", "answer"}
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert rows[("no_document", 0.05)]["errors"]["lse_abs"] is None
    assert rows[("nectar", 0.05)]["errors"]["merged_rel"] < rows[("no_document", 0.05)]["errors"]["merged_rel"]
    assert "generation" in rows[("nectar", 0.05)] and "generation" not in rows[("nectar", 0.1)]
    assert len(rows[("nectar", 0.05)]["layer_gap"]) == tiny.config.num_hidden_layers
    assert (out / "fidelity_vs_bytes.png").stat().st_size > 0 and (out / "error_vs_gap.png").stat().st_size > 0
    stdout = capsys.readouterr().out
    assert "streaming_llm" in stdout and "Spearman" in stdout
    answer = rows[("nectar", 0.05)]["questions"]["answer"]
    assert 0 <= answer["decided_tokens"] <= answer["tokens"]
    assert answer["decided_agreement"] is None if not answer["decided_tokens"] else 0 <= answer["decided_agreement"] <= 1

    # A re-run refits nothing and re-evaluates nothing.
    import nectar.compiler.pipeline as pipeline
    import nectar.compiler.workspace as workspace

    monkeypatch.setattr(pipeline, "fit", lambda *a, **k: pytest.fail("refitted"))
    monkeypatch.setattr(workspace.P, "build_prompts", lambda *a, **k: pytest.fail("prompts made again"))
    monkeypatch.setattr(compare.Comparison, "evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    assert main(["eval", str(doc), "--out", str(out), *SMALL, "--sweep", "0.1"]) == 0


def test_eval_of_an_artifact_with_user_questions(tiny, doc, tmp_path, capsys, tokenizer):
    from nectar.compiler.pipeline import compile

    art = compile(tiny, tokenizer, doc.read_text(), FAST)
    path = art.save(tmp_path / "a.nectar")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"questions": ["What does assert do?", {"question": "What is pass?"}]}))
    out = tmp_path / "ev"
    code = main(["eval", str(path), "--questions", str(questions), "--out", str(out), "--methods",
                 "nectar,no_document,knorm", "--gap-prompts", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "per layer off (--gap-prompts 0)" in captured.out and "nan" not in captured.out
    report = json.loads((out / "eval.json").read_text())
    assert report["prompts"] == {"user": 2}
    assert [r["method"] for r in report["rows"]] == ["nectar", "no_document", "knorm"]
    assert report["rows"][0]["bytes_ratio"] == pytest.approx(art.memory_ratio())


def test_artifact_without_its_document_needs_one(tiny, doc, tmp_path, capsys, tokenizer, monkeypatch):
    from nectar.compiler.pipeline import compile

    art = compile(tiny, tokenizer, doc.read_text(), replace(FAST, keep_document=False))
    path = art.save(tmp_path / "a.nectar")
    capsys.readouterr()
    assert_one_line_error(run_cli(capsys, "eval", str(path)), "pass --document")
    other = tmp_path / "other.txt"
    other.write_text(sample_document(900))
    assert_one_line_error(run_cli(capsys, "eval", str(path), "--document", str(other)), "not the document")
    binary = tmp_path / "doc.bin"
    binary.write_bytes(b"\x00\x01garbage\x00")
    monkeypatch.setattr(commands, "_load", lambda *a, **k: pytest.fail("the model loaded before the file was read"))
    assert_one_line_error(run_cli(capsys, "eval", str(path), "--document", str(binary)), "binary")


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ("[]", "no questions"),
                                              ('{"questions": [""]}', "question 1 in"),
                                              ('["Why?", "How?", "Why?"]', "appears twice"),
                                              ("Why?\nHow?\nWhy?\n", "appears twice")])
def test_bad_question_file(tiny, doc, tmp_path, capsys, content, message):
    questions = tmp_path / "q.json"
    questions.write_text(content)
    assert_one_line_error(run_cli(capsys, "eval", str(doc), "--questions", str(questions)), message)


REGRESSION_SETS = sorted((Path(__file__).parent.parent / "benchmarks" / "data").glob("*.questions.json"))


@pytest.mark.parametrize("path", REGRESSION_SETS, ids=lambda p: p.name)
def test_each_bundled_regression_set_reads_and_has_its_document(path):
    """The hand-written sets are what fidelity is judged on: a repeated or empty question, or a set whose
    document went missing, would silently change what a benchmark measures."""
    assert len(read_questions(path)) >= 30
    if not path.name.startswith("pydoc"):  # pydoc's text comes from the standard library (pydoc:4096)
        assert (path.parent / path.name.replace(".questions.json", ".txt")).is_file()


def test_a_question_too_long_for_the_window_fails_before_any_compile(tiny, doc, tmp_path, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["What is this?", "Why is this so? " * 400]))
    out = tmp_path / "ev"
    err = run_cli(capsys, "eval", str(doc), "--questions", str(questions), "--out", str(out), *SMALL)
    assert_one_line_error(err, "question 2 is")
    assert not (out / "cache").exists()


@pytest.mark.parametrize("sweep", ["0,0.02", "0.02,1.5", "-0.1"])
def test_sweep_outside_zero_one(tiny, doc, capsys, sweep):
    assert_one_line_error(run_cli(capsys, "eval", str(doc), "--sweep", sweep), "budgets must be in (0, 1)")


def test_unknown_method(tiny, doc, capsys):
    assert_one_line_error(run_cli(capsys, "eval", str(doc), "--methods", "nectar,h2o"), "unknown method")


def test_ablation_names_parse_every_tunable_field():
    """exact_share defaults to None (resolved per model): its ablation still reads as a float."""
    from nectar.eval.runner import nectar_changes

    assert nectar_changes("nectar+exact_share=0.3+refine_steps=150+variant=quadrature") == {
        "exact_share": 0.3, "refine_steps": 150, "variant": "quadrature"}
    with pytest.raises(NectarError, match="not a valid refine_steps"):
        nectar_changes("nectar+refine_steps=many")
    assert nectar_changes("nectar+weight_bits=16+probe_prompts=16") == {"weight_bits": 16, "probe_prompts": 16}
    assert nectar_changes("nectar+probe_recall=4") == {"probe_recall": 4}
    assert nectar_changes("nectar+refine_lr=0.001") == {"refine_lr": 0.001}
    with pytest.raises(NectarError, match="refine_lr must be > 0"):
        nectar_changes("nectar+refine_lr=0")
    assert nectar_changes("nectar+refine_recall=0.1") == {"refine_recall": 0.1}
    with pytest.raises(NectarError, match="refine_recall must be >= 0"):
        nectar_changes("nectar+refine_recall=-1")
    with pytest.raises(NectarError, match="weight_bits must be 8 or 16"):
        nectar_changes("nectar+weight_bits=4")
    assert nectar_changes("nectar+target_softmax=0") == {"target_softmax": False}  # bool("0") would be True
    # exact_value_bits defaults to None too, but reads as a whole number of bits
    assert nectar_changes("nectar+exact_value_bits=8") == {"exact_value_bits": 8}
    assert type(nectar_changes("nectar+exact_value_bits=8")["exact_value_bits"]) is int
    assert nectar_changes("nectar+target_softmax=true") == {"target_softmax": True}
    with pytest.raises(NectarError, match="not a valid target_softmax"):
        nectar_changes("nectar+target_softmax=maybe")
    # fit fields travel apart: eval changes them inside its own fit (its --steps stays unless named)
    assert nectar_changes("nectar+share_power=2+steps=600+depth=3") == {
        "depth": 3, "fit": {"share_power": 2.0, "steps": 600}}
    with pytest.raises(NectarError, match="share_power must be >= 0"):
        nectar_changes("nectar+share_power=-1")


def test_a_fit_ablation_keeps_the_rest_of_the_evaluations_fit(tmp_path, monkeypatch):
    from nectar.eval.runner import Comparison
    from nectar.config import CompileConfig, FitConfig

    class Workspace:  # only its config is read before the compile, whose arguments are the point
        config = CompileConfig(fit=FitConfig(steps=60, eval_every=20))

    def compile_bank(ws, **changes):
        raise StopIteration(changes)

    monkeypatch.setattr("nectar.eval.runner.compile_bank", compile_bank)
    comparison = Comparison.__new__(Comparison)  # only what _compiled reads
    comparison.ws, comparison.artifact, comparison.out, comparison.key = Workspace(), None, tmp_path, "k"
    with pytest.raises(StopIteration) as stop:
        comparison._compiled("nectar+share_power=2", 0.02)
    assert stop.value.value["fit"] == FitConfig(steps=60, eval_every=20, share_power=2.0)


def test_the_judge_answers_for_every_method_while_the_workspace_compiles(tokenizer, tmp_path):
    """`nectar eval` compiles in one dtype and judges in another (fp32, as `ask` answers): the reference
    answers, the full cache and every method's numbers come from the judge."""
    from nectar.eval.runner import Comparison, EvalConfig
    from nectar.runtime.prefill import prefill
    from nectar.compiler.workspace import Workspace

    model = tiny_llama()
    judge = tiny_llama(seed=1)  # other weights, so that whose numbers they are shows
    ws = Workspace(model, tokenizer, sample_document(1500), FAST)
    config = EvalConfig(methods=("no_document",), generate=False, gap_prompts=0)
    mine = Comparison(ws, None, ["What does assert do?"], tmp_path / "a", config, judge)
    torch.testing.assert_close(mine.full.keys[0], prefill(judge, torch.tensor(ws.document.ids)).keys[0])
    theirs = Comparison(ws, None, ["What does assert do?"], tmp_path / "b", config)
    assert mine.full is not ws.document.full and theirs.full is ws.document.full
    assert mine.prompts[0].answer_ids != theirs.prompts[0].answer_ids  # the judge wrote the reference answer
    rows = [c.run()["rows"][0]["questions"]["answer"]["kl"] for c in (mine, theirs)]
    assert rows[0] != rows[1]


def test_the_ceiling_is_the_compile_models_full_cache_against_the_judge(tokenizer, tmp_path):
    """With a judge of another dtype, eval also reports how the compile model's own full cache answers
    against the judge's answers: the similarity an all-but-exact method can reach."""
    from nectar.eval.runner import Comparison, EvalConfig
    from nectar.eval.report import plot_fidelity
    from nectar.compiler.workspace import Workspace

    wb = Workspace(tiny_llama(), tokenizer, sample_document(1500), FAST)
    config = EvalConfig(methods=("no_document",), gap_prompts=0, max_new_tokens=6)
    same = Comparison(wb, None, ["What does assert do?"], tmp_path / "a", config, tiny_llama()).run()["ceiling"]
    other = Comparison(wb, None, ["What does assert do?"], tmp_path / "b", config, tiny_llama(seed=1)).run()
    assert same["exact_match"] == 1.0 and same["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert other["ceiling"]["exact_match"] == 0.0 and "the full cache itself in float32" in table(other)
    # And teacher-forced, in a method's units: the same weights read exact, other weights do not.
    assert same["questions"]["answer"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["questions"]["answer"]["agreement"] == 1.0
    assert same["questions"]["answer"]["decided_agreement"] in (None, 1.0)  # a random tiny model decides little
    assert other["ceiling"]["questions"]["answer"]["kl"] > 0.01 and "teacher-forced, the same rounding" in table(other)
    plot_fidelity(other, tmp_path / "with_ceiling.png")  # drawn as a dotted line beside the methods
    assert (tmp_path / "with_ceiling.png").stat().st_size > 0
    # Each method's answers also read against the ceiling's, question by question.
    row = other["rows"][0]["generation"]
    assert len(row["cosines"]) == len(other["ceiling"]["cosines"]) == 1
    assert "no_document at 0.02: " in table(other) and "against it" in table(other)
    assert Comparison(wb, None, ["What does assert do?"], tmp_path / "c", config).run()["ceiling"] is None


def test_the_cosine_report_says_how_few_questions_carry_the_gap():
    from nectar.eval.report import cosine_intervals
    cosines = [0.9, 0.9, 0.1, 0.9, 0.2]
    row = {"method": "nectar", "budget": 0.02,
           "generation": {"cosines": cosines, "cosine": sum(cosines) / 5, "cosine_interval": [0.2, 0.9]}}
    report = {"rows": [row], "ceiling": {"dtype": "bfloat16", "cosines": [0.95, 0.85, 0.9, 0.9, 0.9]}}
    line = cosine_intervals(report)[1]
    assert "against it -0.300" in line and "2 of 5 questions, each more than 0.3 below it, carry -0.300" in line
    report["ceiling"]["cosines"] = cosines  # level with the ceiling: no question far below it
    assert "questions" not in cosine_intervals(report)[1]


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_questions():
    from nectar.measure.metrics import bootstrap_interval

    torch.manual_seed(0)
    few, many = torch.rand(10).tolist(), torch.rand(400).tolist()
    (lo, hi), (lo_many, hi_many) = bootstrap_interval(few), bootstrap_interval(many)
    assert lo < sum(few) / 10 < hi and lo_many < sum(many) / 400 < hi_many
    assert hi_many - lo_many < (hi - lo) / 3  # width ~ 1 / sqrt(questions)
    assert bootstrap_interval([0.5] * 8) == pytest.approx([0.5, 0.5])  # no spread, no doubt
    assert bootstrap_interval(few) == bootstrap_interval(few)  # seeded: a report reads the same twice


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert abs(spearman([1, 2, 3, 4, 5], [2, 5, 1, 4, 3])) < 0.5


KVPRESS_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import tiny_llama
from nectar.runtime.binding import bound
from nectar.runtime.prefill import prefill
assert "kvpress" not in sys.modules
model = tiny_llama()
ids = torch.randint(3, 300, (2, 40))
full = prefill(model, ids[0, :30])
pos = 30 + torch.arange(10).expand(2, -1)
with bound(model, full):
    before = model(input_ids=ids[:, 30:], position_ids=pos).logits
import kvpress

with bound(model, full):
    after = model(input_ids=ids[:, 30:], position_ids=pos).logits
torch.testing.assert_close(after, before)
print("unchanged")
"""


def test_importing_kvpress_leaves_nectar_attention_unchanged():
    """kvpress wraps transformers' attention functions on import. In a fresh interpreter, so that the
    'before' really runs without it (earlier tests of this process import it)."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", KVPRESS_CHECK, str(Path(__file__).parent)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "unchanged" in run.stdout, run.stderr[-2000:]


def test_layer_errors_are_zero_for_the_exact_document_and_total_for_none():
    from nectar.runtime.prefill import prefill, split_sinks
    from nectar.providers.attention import NoContext
    from nectar.compiler.capture import capture
    from nectar.measure.fidelity import layer_errors

    model = tiny_llama()
    doc = torch.randint(3, 300, (60,))
    full = prefill(model, doc)
    store = capture(model, [torch.randint(3, 300, (9,)).tolist()], 60, full, None, desc=None)
    sinks, rest = split_sinks(full, 4)
    kv, scaling = model.config.num_key_value_heads, model.config.head_dim ** -0.5
    exact = layer_errors((rest, sinks), store, kv, scaling)  # sinks + the rest: the whole document
    assert max(exact["o_rel"]) < 2e-2 and max(exact["lse_abs"]) < 2e-2 and max(exact["merged_rel"]) < 2e-2
    none = layer_errors((NoContext(), None), store, kv, scaling)
    assert none["o_rel"] == pytest.approx([1.0] * 3) and none["lse_abs"] == [None] * 3
    assert min(none["merged_rel"]) > 0.05


def test_eval_on_a_model_with_sliding_layers(monkeypatch, tokenizer, doc, tmp_path, capsys):
    """Every method keeps the sliding layers' exact tails, and bytes count against the model's real cache."""
    from test_families import SUPPORTED, tiny as tiny_family
    from nectar.model.models import cache_tokens

    model = tiny_family(*SUPPORTED["gemma3"])
    monkeypatch.setattr(commands, "_load", lambda name, dtype, device="auto": (model, tokenizer))
    out = tmp_path / "ev"
    code = main(["eval", str(doc), "--out", str(out), *SMALL, "--no-generate",
                 "--methods", "nectar,streaming_llm,attention_matching,no_document"])
    assert code == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    n = json.loads((out / "eval.json").read_text())["document_tokens"]
    tails = 2 * 7 / cache_tokens(model.config, n)  # two sliding layers keep 7 tokens each
    assert rows["no_document"]["bytes_ratio"] == 0
    for name in ("nectar", "streaming_llm", "attention_matching"):
        assert tails < rows[name]["bytes_ratio"] < tails + 0.05 * 1.01
        assert len(rows[name]["layers"]["merged_rel"]) == 1  # the one global layer
    assert rows["nectar"]["errors"]["merged_rel"] < rows["no_document"]["errors"]["merged_rel"]
    code = main(["eval", str(doc), "--out", str(out), *SMALL, "--no-generate", "--methods", "knorm,snapkv"])
    assert code == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    for name in ("knorm", "snapkv"):  # a press keeps its tokens in the global layer, and the tails
        assert tails < rows[name]["bytes_ratio"] < tails + 0.05 * 1.01


def test_answers_as_long_as_asked_and_rows_kept_apart(tiny, doc, tmp_path, capsys, tokenizer):
    """--max-new-tokens sets the full cache's answers every method is judged on; rows judged on other
    lengths are not reused."""
    from nectar.compiler.pipeline import compile

    path = compile(tiny, tokenizer, doc.read_text(), FAST).save(tmp_path / "a.nectar")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["What does assert do?", "What is pass?"]))
    out = tmp_path / "ev"
    lengths = {}
    for tokens in (3, 12):
        code = main(["eval", str(path), "--questions", str(questions), "--out", str(out), "--methods", "no_document",
                     "--gap-prompts", "0", "--no-generate", "--max-new-tokens", str(tokens)])
        assert code == 0, capsys.readouterr().err
        rows = json.loads((out / "rows.json").read_text())
        lengths[tokens] = [len(p["answer_ids"]) for p in rows["prompts"]]
    assert max(lengths[3]) == 3 and max(lengths[12]) > 3, lengths
    assert_one_line_error(run_cli(capsys, "eval", str(path), "--max-new-tokens", "0"),
                          "--max-new-tokens: '0': must be at least 1")


def test_decided_positions_are_those_whose_top_two_lie_a_margin_apart():
    """Log-probs differ as logits do: the margin reads the same before and after the softmax, and pooling
    weighs each part's decided agreement by its decided tokens."""
    from nectar.eval.report import decided_lines
    from nectar.measure.fidelity import decided
    from nectar.measure.metrics import pooled

    logits = torch.tensor([[2.0, 1.9, 0.0], [3.0, 1.0, 2.4], [0.0, 0.0, 5.0]])
    assert decided(torch.log_softmax(logits, -1)).tolist() == [False, True, True]
    assert decided(logits, margin=0.05).tolist() == [True, True, True]
    parts = [{"agreement": 0.5, "kl": 0.1, "tokens": 10, "decided_agreement": 1.0, "decided_tokens": 2},
             {"agreement": 1.0, "kl": 0.0, "tokens": 10, "decided_agreement": 0.5, "decided_tokens": 6}]
    out = pooled(parts)
    assert out["decided_tokens"] == 8 and out["decided_agreement"] == pytest.approx(5 / 8)
    assert "decided_agreement" not in pooled([{"agreement": 1.0, "kl": 0.0, "tokens": 3}])  # rows from before
    assert pooled([{**parts[0], "decided_agreement": None, "decided_tokens": 0}])["decided_agreement"] is None
    report = {"rows": [{"method": "nectar", "budget": 0.02, "questions": {"answer": out}}]}
    assert decided_lines(report)[1] == "  nectar at 0.02: 0.625 over 8 of 20 tokens"


def test_eval_takes_the_compile_options_and_refuses_settings_for_an_artifact(saved, capsys):
    from nectar.cli.main import parser

    compile_options = {a.dest for a in parser()._subparsers._group_actions[0].choices["compile"]._actions}
    eval_options = {a.dest for a in parser()._subparsers._group_actions[0].choices["eval"]._actions}
    corpus = {"output", "out", "no_ray", "ray_address", "cpus_per_task", "document", "no_document"}  # outputs
    assert compile_options - corpus <= eval_options
    assert_one_line_error(run_cli(capsys, "eval", saved, "--set", "depth=3"), "eval the document instead")
