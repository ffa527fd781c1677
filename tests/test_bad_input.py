"""Bad input a new user tried (issue 55's matrix), each refused in one line before any slow work, or
warned about where the result would mislead; and what an artifact may leave out (its document)."""
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save
import torch

import nectar
from nectar.manifest import check_model_for, read_header
from conftest import FAST, QUICK_CLI, assert_one_line_error, run_cli, sample_document




def header_only(path: Path, model: str = "smollm2-135m", **metrics) -> Path:
    """A file whose header names `model` (no tensors to speak of): what the torch-free checks read."""
    manifest = {"model": {"fingerprint": {"name": model}, "layers": 30, "kv_heads": 3}, "metrics": metrics}
    path.write_bytes(save({"x": torch.zeros(1)}, metadata={"nectar": json.dumps(manifest)}))
    return path


def test_a_file_named_pydoc_is_not_silently_ignored(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    Path("pydoc:512").write_text("my own notes")
    assert_one_line_error(run_cli(capsys, "compile", "pydoc:512", "-o", "a.nectar"), "./pydoc:512")


def test_a_document_too_short_to_validate_is_refused_before_writing_questions(model, tokenizer, monkeypatch):
    def write(*args, **kwargs):
        pytest.fail("wrote questions for a document that cannot be split")
    monkeypatch.setattr("nectar.compiler.prompts.build_prompts", write)
    config = replace(FAST, prompts=replace(FAST.prompts, chunk_tokens=256))
    with pytest.raises(nectar.NectarError, match="too few to hold out a 256-token chunk"):
        nectar.compile(model, tokenizer, sample_document(120), config)


def test_a_model_folder_with_a_broken_config_is_one_line(tmp_path, doc, capsys, no_model):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    result = run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", "--model", tmp_path / "m")
    assert_one_line_error(result, "not a readable JSON model config")


def test_a_model_folder_transformers_cannot_load_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    with pytest.raises(nectar.NectarError, match="could not load the model"):
        nectar.load_model(str(tmp_path))


def test_asking_with_another_known_model_is_refused_before_it_loads(tmp_path, capsys, no_model):
    art = header_only(tmp_path / "a.nectar")
    result = run_cli(capsys, "ask", art, "Why?", "--model", "gemma3-270m")
    assert_one_line_error(result, "compiled for model 'smollm2-135m', not gemma3-270m")


def test_a_model_folder_of_another_shape_is_refused_before_it_loads(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 3, "num_key_value_heads": 2}')
    manifest, _ = read_header(header_only(tmp_path / "a.nectar"))
    with pytest.raises(nectar.NectarError, match="not " + str(tmp_path)):
        check_model_for(manifest, str(tmp_path))


def test_compile_reads_the_document_from_stdin(tmp_path, cli_model, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(sample_document(1500).encode())))
    out = tmp_path / "a.nectar"
    code, _, err = run_cli(capsys, "compile", "-", "-o", out, *QUICK_CLI)
    assert code == 0, err
    assert nectar.Artifact.load(out).n > 100


@pytest.mark.parametrize("stdin, pattern", [("", "standard input is empty"), (None, "pipe one in")])
def test_compile_from_an_empty_or_absent_stdin(tmp_path, capsys, monkeypatch, no_model, stdin, pattern):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdin", Terminal() if stdin is None else io.TextIOWrapper(io.BytesIO(b"")))
    assert_one_line_error(run_cli(capsys, "compile", "-", "-o", tmp_path / "a.nectar"), pattern)


def test_stdin_is_not_a_corpus_member(tmp_path, doc, capsys, no_model):
    assert_one_line_error(run_cli(capsys, "compile", "-", doc, "--out", tmp_path / "out"), "standard input")


def test_pydoc_past_the_window_is_refused_before_the_model_loads(tmp_path, capsys, no_model):
    code, _, err = result = run_cli(capsys, "compile", "pydoc:99999999", "-o", tmp_path / "a.nectar")
    assert_one_line_error(result, "pydoc:7680 or fewer, or pass --truncate")
    assert "truncate=True" not in err


def test_a_budget_near_the_whole_cache_is_warned_about(doc, tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise nectar.NectarError("stopped")
    monkeypatch.setattr("nectar.cli.commands._load", stop)
    _, _, err = run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar", "--budget", "0.999")
    assert "warning: --budget 0.999" in err and "as large as the cache" in err


def test_empty_questions_on_stdin_say_stdin(saved, capsys, monkeypatch, no_model):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n \n"))
    assert_one_line_error(run_cli(capsys, "ask", saved, "-"), "no questions in standard input")


@pytest.mark.parametrize("cut", [1, 100])
def test_a_cut_artifact_is_refused_from_its_header(saved, tmp_path, cut, capsys, no_model):
    """An interrupted copy: the header still reads, so the file's size against it is what shows the cut."""
    short = tmp_path / "cut.nectar"
    short.write_bytes(saved.read_bytes()[:-cut])
    with pytest.raises(nectar.NectarError, match="truncated or corrupted"):
        read_header(short)
    assert_one_line_error(run_cli(capsys, "info", short), "truncated")


def test_asking_a_folder_says_to_name_a_file_in_it(saved, capsys, no_model):
    assert_one_line_error(run_cli(capsys, "ask", saved.parent, "Why?"), f"is a folder: name an artifact file in it, "
                          f"e.g. {saved}")


def test_an_artifact_worse_than_no_document_is_flagged_on_use(compiled, tmp_path, capsys):
    artifact = compiled[1]
    bad = nectar.Artifact(json.loads(json.dumps(artifact.manifest)), artifact.bank, artifact.sinks)
    bad.manifest["metrics"]["questions"] = {"nectar": {"tokens": 50, "agreement": 0.2, "kl": 2.0},
                                            "no_document": {"tokens": 50, "agreement": 0.4, "kl": 1.0}}
    code, _, err = run_cli(capsys, "info", bad.save(tmp_path / "bad.nectar"))
    assert code == 0 and "no better than no document at all" in err


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--batch", "1,0"), ("--n", "8"), ("--new-tokens", "1")])
def test_bench_names_the_option_out_of_range(saved, capsys, no_model, flag, value):
    code, _, err = run_cli(capsys, "bench", saved, flag, value)
    assert code == 2 and f"argument {flag}" in err and "must be at least" in err


def test_serving_only_corrupt_artifacts_says_why(tmp_path, capsys, no_model):
    (tmp_path / "junk.nectar").write_bytes(b"\x00" * 64)
    assert_one_line_error(run_cli(capsys, "serve", tmp_path), "not a readable nectar artifact")


def test_serving_a_folder_of_two_models_is_refused(tmp_path, capsys, no_model):
    header_only(tmp_path / "a.nectar", "smollm2-135m")
    header_only(tmp_path / "b.nectar", "gemma3-270m")
    assert_one_line_error(run_cli(capsys, "serve", tmp_path), "a server runs one model")


def test_serving_artifacts_with_another_model_is_refused_before_it_loads(tmp_path, capsys, no_model):
    header_only(tmp_path / "a.nectar", "gemma3-270m")
    assert_one_line_error(run_cli(capsys, "serve", tmp_path, "--model", "smollm2-135m"),
                          "no artifact here was compiled for smollm2-135m")


def test_serving_on_every_interface_without_a_key_is_warned_about(saved, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise nectar.NectarError("stopped")
    monkeypatch.setattr("nectar.cli.commands._load", stop)
    monkeypatch.setattr("nectar.cli.commands._check_port", lambda host, port: None)
    _, _, err = run_cli(capsys, "serve", saved, "--host", "0.0.0.0")
    assert "without --api-key: anyone who can reach this machine" in err
    _, _, err = run_cli(capsys, "serve", saved, "--host", "0.0.0.0", "--api-key", "k")
    assert "warning" not in err


def test_no_document_leaves_the_ids_out_and_compare_says_what_it_needs(doc, tmp_path, cli_model, capsys):
    out = tmp_path / "private.nectar"
    code, _, err = run_cli(capsys, "compile", doc, "-o", out, "--no-document", *QUICK_CLI)
    assert code == 0, err
    assert nectar.Artifact.load(out).document_ids is None and "document.ids" not in read_header(out)[1]
    assert_one_line_error(run_cli(capsys, "ask", out, "Why?", "--compare"), "compiled with --no-document")
    assert_one_line_error(run_cli(capsys, "eval", out, "--out", tmp_path / "ev"), "pass --document FILE")
    code, answer, err = run_cli(capsys, "ask", out, "Why?", "--max-new-tokens", "2")
    assert code == 0 and answer.startswith("Q: Why?"), err


def test_sigterm_during_a_compile_leaves_no_file(doc, tmp_path, capsys, cli_model, monkeypatch):
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the compile")

    monkeypatch.setattr("nectar.compiler.pipeline.compile", killed)
    code, _, err = run_cli(capsys, "compile", doc, "-o", tmp_path / "a.nectar")
    assert code == 143 and "terminated; no half-written file" in err
    assert list(tmp_path.iterdir()) == [doc]


ARGUMENT_ERRORS = [
    ["compile", "missing.txt", "-o", "a.nectar"],
    ["compile", "pydoc:x", "-o", "a.nectar"],
    ["compile", "pydoc", "-o", "a.nectar", "--model", "llama-9000"],
    ["compile", "pydoc", "-o", "a.nectar", "--effort", "max"],
    ["compile", "pydoc", "-o", "a.nectar", "--set", "fit.steps=-1"],
    ["ask", "missing.nectar", "Why?"],
    ["info", "missing.nectar"],
    ["bench", "missing.nectar"],
    ["eval", "missing.nectar"],
    ["serve", "missing.nectar"],
]


@pytest.mark.integration  # subprocesses
@pytest.mark.parametrize("argv", ARGUMENT_ERRORS, ids=lambda argv: " ".join(argv[:2]))
def test_argument_errors_come_before_torch_is_imported(tmp_path, argv):
    """What makes such an error take a fraction of a second rather than six."""
    script = ("import sys\nfrom nectar.cli.main import main\ncode = main(sys.argv[1:])\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("nectar: error:"), done.stderr
    assert done.stdout.strip() == "no torch"
