"""The CLI on the tiny model: every user-fixable failure is one line on stderr and exit code 2, checked
before any slow work; the commands print what they promise."""
import os
import shutil
import subprocess
import sys

import pytest

import nectar
from nectar.model.documents import Pydoc, parse_source
from conftest import QUICK_CLI as QUICK, assert_one_line_error, run_cli, sample_document




@pytest.mark.parametrize("arg, expected", [("pydoc", Pydoc(4096)), ("pydoc:512", Pydoc(512))])
def test_pydoc_spec_is_an_exact_grammar(arg, expected):
    assert parse_source(arg) == expected


def test_a_file_whose_name_starts_with_pydoc_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pydoc_notes.txt").write_text("my notes")
    assert parse_source("pydoc_notes.txt") == tmp_path.joinpath("pydoc_notes.txt").relative_to(tmp_path)


def test_compile_of_pydoc_named_file_with_pydoc_text_compiles_that_text(tmp_path, cli_model, tokenizer, capsys):
    """The bug: `pydoc_notes.txt`, whose text starts with "pydoc:", was replaced by CPython's help topics."""
    text = "pydoc: " + sample_document(1500)
    path = tmp_path / "pydoc_notes.txt"
    path.write_text(text)
    out = tmp_path / "a.nectar"
    code, _, err = run_cli(capsys, "compile", path, "-o", out, *QUICK)
    assert code == 0, err
    art = nectar.Artifact.load(out)
    assert tokenizer.decode(art.document_ids).startswith("pydoc: The")
    assert art.n < 2000  # CPython's help would be 4096 tokens


@pytest.mark.parametrize("arg, pattern", [("pydoc_missing.txt", "no such file"), ("pydoc:abc", "pydoc:TOKENS"),
                                          ("pydoc:-5", "positive whole number"), ("pydoc:0", "positive")])
def test_bad_document_source_is_refused_before_loading(tmp_path, capsys, no_model, arg, pattern):
    assert_one_line_error(run_cli(capsys, "compile", arg, "-o", tmp_path / "a.nectar"), pattern)


def test_binary_document(tmp_path, capsys):
    path = tmp_path / "doc.bin"
    path.write_bytes(b"\x00\x01\x02garbage\x00")
    assert_one_line_error(run_cli(capsys, "compile", path, "-o", tmp_path / "a.nectar"), "binary")


def test_empty_document(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text("  \n ")
    assert_one_line_error(run_cli(capsys, "compile", path, "-o", tmp_path / "a.nectar"), "empty")


@pytest.mark.parametrize("flags, pattern", [(["--budget", "1.5"], "budget"),
                                            (["--set", "fit.steps=0"], "steps and batch must be >= 1"),
                                            (["--set", "prompts=x"], "not a valid prompts"),
                                            (["--set", "refine_steps=-3"], "refine_steps must be >= 0"),
                                            (["--set", "share_power=-1"], "share_power must be >= 0"),
                                            (["--set", "weight_bits=4"], "weight_bits must be 8 or 16"),
                                            (["--set", "exact_power=0"], "exact_power must be > 0"),
                                            (["--set", "exact_by=norm"], "exact_by must be one of"),
                                            (["--set", "exact_head_cap=1"], "exact_head_cap must be in"),
                                            (["--set", "no_such=1"], "no config field no_such"),
                                            (["--set", "budget"], "write FIELD=VALUE"),
                                            (["--effort", "turbo"], "unknown effort 'turbo': use one of quick, fast, default")])
def test_bad_numbers_are_refused_before_loading(doc, tmp_path, capsys, no_model, flags, pattern):
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", *flags), pattern)


@pytest.mark.parametrize("where, pattern", [("folder", "is a folder"), ("under_file", "is a file"),
                                            ("unwritable", "cannot write")])
def test_bad_output_path_is_refused_before_loading(doc, tmp_path, capsys, no_model, where, pattern):
    (tmp_path / "folder").mkdir()
    output = {"folder": tmp_path / "folder", "under_file": doc / "a.nectar", "unwritable": "/sys/a.nectar"}[where]
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", output), pattern)


def test_truncate_says_how_much_it_kept(tmp_path, cli_model, capsys):
    path = tmp_path / "long.txt"
    path.write_text(sample_document(100_000) * 3)
    code, _, err = run_cli(capsys, "compile", path, "-o", tmp_path / "a.nectar", "--truncate", *QUICK)
    assert code == 0, err
    assert "kept the first 1536 of its" in err


def test_artifact_written_with_the_umask(saved, tmp_path):
    art = nectar.Artifact.load(saved)
    old = os.umask(0o022)
    try:
        path = art.save(tmp_path / "b.nectar")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_eval_outputs_written_with_the_umask(tmp_path):
    from nectar.files import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "eval.json", {"x": float("nan")})
    finally:
        os.umask(old)
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "eval.json").read_text().split() == ["{", '"x":', "null", "}"]


def test_truncated_artifact(saved, tmp_path, capsys):
    path = tmp_path / "a.nectar"
    path.write_bytes(saved.read_bytes()[:100])
    assert_one_line_error(run_cli(capsys, "info", path), "truncated or corrupted")


def test_missing_artifact(tmp_path, capsys):
    assert_one_line_error(run_cli(capsys, "info", tmp_path / "none.nectar"), "nectar compile")


def test_ctrl_c_during_compile_writes_nothing(doc, tmp_path, capsys, cli_model, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nectar.compiler.pipeline.compile", interrupted)
    code, _, err = run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar")
    assert code == 130 and "no half-written file" in err
    assert list(tmp_path.iterdir()) == [doc]


def test_info_prints_a_brief_and_verbose_prints_every_measurement(saved, compiled, capsys):
    code, out, _ = run_cli(capsys, "info", saved)
    art = compiled[1]
    assert code == 0 and len(out.splitlines()) == 4  # model, size, fidelity, time
    assert f"{art.memory_ratio():.4f} x the" in out and f"KV cache of its {art.n} tokens" in out
    assert "answer tokens of held-out prompts: agreement with the full cache" in out and "--verbose" in out
    code, out, _ = run_cli(capsys, "info", saved, "--verbose")
    assert f"document: {art.n} tokens" in out and f"{art.memory_ratio():.4f} x the KV cache" in out
    assert "questions,      nectar: agreement" in out and "timings (s): prefill" in out
    assert f"{art.manifest['modules']['weight_bits']}-bit weights" in out


def test_info_names_agreement_where_the_full_cache_had_decided(compiled):
    """Printed where the manifest has it (compiles from 2026-12-05 on), left out where it does not."""
    import copy

    from nectar.cli.summary import summary

    art = copy.copy(compiled[1])
    art.manifest = copy.deepcopy(art.manifest)
    questions = art.manifest["metrics"]["questions"]["nectar"]
    questions.update(decided_agreement=0.99, decided_tokens=120)
    assert "; 0.990 where the full cache had decided (120 tokens)" in summary(art)
    questions.update(decided_agreement=None, decided_tokens=0)
    assert "where the full cache had decided" not in summary(art)


@pytest.mark.integration  # a subprocess
def test_info_json_into_a_closed_pipe_is_quiet(saved):
    """`nectar info --json | head -1`: the reader leaving early is not an error."""
    shell = f"{shutil.which('python3') and sys.executable} -m nectar.cli info --json {saved} | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "{"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["compile", "ask", "info", "demo", "bench", "eval"])
def test_every_command_and_option_has_help(command, capsys):
    from nectar.cli.main import parser

    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "usage" in out
    sub = next(a for a in parser()._actions if a.dest == "command").choices[command]
    missing = [a.dest for a in sub._actions if a.option_strings and a.dest != "help" and not a.help]
    assert not missing, f"{command}: options without help text: {missing}"


@pytest.mark.parametrize("device, pattern", [("tpu7", "unknown device"), ("cuda", "no GPU")])
def test_bad_device(doc, tmp_path, capsys, device, pattern):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", "--device", device), pattern)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_hardware_runs_it(monkeypatch, native):
    """An AVX2-only CPU emulates bf16 matmuls ~30x slower than fp32: "auto" must not pick them there."""
    import torch

    from nectar.model import models

    monkeypatch.setattr(models, "has_fast_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert models.resolve_dtype("float32", cpu) == torch.float32 and models.resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16


def test_compile_takes_auto_dtype_by_default(doc, tmp_path, monkeypatch, capsys):
    seen = []

    def load(name, dtype, device="auto"):
        seen.append(dtype)
        raise nectar.NectarError("stop here")
    monkeypatch.setattr("nectar.cli.commands._load", load)
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar"), "stop here")
    assert seen == ["auto"]
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", "--dtype", "fp16"), "invalid choice")


def test_a_compile_in_fp32_by_auto_says_why_it_is_slow(model, capsys):
    from nectar.cli.commands import _note_dtype

    _note_dtype(model, "auto")  # a CPU model in fp32: auto found no bf16 units
    assert "no bf16 units" in capsys.readouterr().out
    _note_dtype(model, "auto", expect="the demo: ~14 min")  # the demo says what it will take
    assert "(the demo: ~14 min)" in capsys.readouterr().out
    _note_dtype(model, "float32")  # asked for: nothing to explain
    assert capsys.readouterr().out == ""


def test_ask_compares_several_questions_with_the_full_cache(saved, cli_model, capsys):
    code, out, err = run_cli(capsys, "ask", saved, "What is a list?", "How does del work?", "--compare",
                             "--max-new-tokens", "8")
    assert code == 0, err
    assert out.count("Q: ") == 2 and out.count("  full cache: ") == 2
    assert "MiniLM cosine of the answers" in out and "memory for the document" in out and "identical answers" in out


def test_ask_reads_questions_from_stdin(saved, cli_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is a list?\n\nWhat is a tuple?\n"))
    code, out, _ = run_cli(capsys, "ask", saved, "-", "--max-new-tokens", "4")
    assert code == 0 and out.count("Q: ") == 2


@pytest.mark.parametrize("stdin, pattern", [("\n  \n", "no questions"), ("Why?\nWhy?\n", "appears twice")])
def test_ask_with_bad_questions(saved, no_model, capsys, monkeypatch, stdin, pattern):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert_one_line_error(run_cli(capsys, "ask", saved, "-"), pattern)


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_ask_needs_a_positive_answer_length(saved, no_model, capsys, tokens):
    assert_one_line_error(run_cli(capsys, "ask", saved, "Why?", "--max-new-tokens", tokens), "at least 1")


def test_answers_are_laid_out_even_when_empty_or_multiline():
    from nectar.cli.summary import indent

    assert indent("") == "(empty answer)" and indent("  \n") == "(empty answer)"
    assert indent("one\ntwo") == "one\n" + " " * 14 + "two"


def test_a_question_longer_than_the_window_after_the_document(saved, cli_model, capsys):
    long_question = "Why is this so? " * 400
    assert_one_line_error(run_cli(capsys, "ask", saved, long_question), "passes the model's window")


def test_a_local_model_folder_compiles_and_answers(tmp_path, doc, tokenizer, capsys):
    """`--model PATH`: a folder written by save_pretrained goes through the real loader, no monkeypatch."""
    from conftest import tiny_llama

    folder = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "a.nectar"
    code, _, err = run_cli(capsys, "compile", doc, "-o", out, "--model", folder, "--dtype", "float32", *QUICK)
    assert code == 0, err
    assert nectar.Artifact.load(out).manifest["model"]["fingerprint"]["name"] == str(folder)
    code, answer, err = run_cli(capsys, "ask", out, "What does assert do?", "--max-new-tokens", "4")
    assert code == 0 and answer.startswith("Q: What does assert do?"), err


@pytest.mark.parametrize("where, pattern", [("missing", "no model folder"), ("empty", "holds no config.json"),
                                            ("llama-9000", "unknown model")])
def test_a_model_that_is_not_there_is_refused(tmp_path, doc, capsys, where, pattern):
    folder = tmp_path / where if where != "llama-9000" else where
    if where == "empty":
        folder.mkdir()
    assert_one_line_error(run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", "--model", folder), pattern)


@pytest.mark.integration
def test_python_dash_m_nectar_is_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "nectar", "info", "missing.nectar"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("nectar: error: no artifact at missing.nectar")
