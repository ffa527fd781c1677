"""The CLI turns every user-fixable failure into one line on stderr and exit code 2."""
import pytest

import nectar
from nectar.cli import main
from conftest import sample_document, tiny_llama
from test_compile import FAST


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _one_line_error(code, err, pattern):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("nectar: error:")
    assert pattern in err


def test_binary_document(tmp_path, capsys):
    path = tmp_path / "doc.bin"
    path.write_bytes(b"\x00\x01\x02garbage\x00")
    _one_line_error(*_run(capsys, "compile", str(path), "-o", str(tmp_path / "a.nectar")), "binary")


def test_empty_document(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text("  \n ")
    _one_line_error(*_run(capsys, "compile", str(path), "-o", str(tmp_path / "a.nectar")), "empty")


def test_missing_document(tmp_path, capsys):
    _one_line_error(*_run(capsys, "compile", str(tmp_path / "nope.txt"), "-o", "x.nectar"), "no such file")


def test_bad_budget(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text("some text")
    _one_line_error(*_run(capsys, "compile", str(path), "-o", "x.nectar", "--budget", "1.5"), "budget")


def test_truncated_artifact(tmp_path, capsys, tokenizer):
    art = nectar.compile(tiny_llama(), tokenizer, sample_document(1500), FAST)
    path = art.save(tmp_path / "a.nectar")
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()  # drop the compile's progress output
    _one_line_error(*_run(capsys, "info", str(path)), "truncated or corrupted")


def test_missing_artifact(tmp_path, capsys):
    _one_line_error(*_run(capsys, "info", str(tmp_path / "none.nectar")), "nectar compile")


def test_ctrl_c_during_compile_writes_nothing(tmp_path, capsys, monkeypatch):
    import nectar.compiler as compile_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_module, "compile", interrupted)
    monkeypatch.setattr("nectar.cli._load", lambda name, dtype, device="auto": (None, None))
    path = tmp_path / "doc.txt"
    path.write_text("a document")
    code = main(["compile", str(path), "-o", str(tmp_path / "a.nectar")])
    assert code == 130
    assert not (tmp_path / "a.nectar").exists()


def test_info_prints_summary(tmp_path, capsys, tokenizer):
    art = nectar.compile(tiny_llama(), tokenizer, sample_document(1500), FAST)
    path = art.save(tmp_path / "a.nectar")
    code, _ = _run(capsys, "info", str(path))
    assert code == 0


@pytest.mark.parametrize("command", ["compile", "ask", "info", "demo", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("device, pattern", [("tpu7", "unknown device"), ("cuda", "no GPU")])
def test_bad_device(tmp_path, capsys, device, pattern):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "doc.txt"
    path.write_text(sample_document(500))
    _one_line_error(*_run(capsys, "compile", str(path), "-o", str(tmp_path / "a.nectar"), "--device", device),
                    pattern)


@pytest.fixture
def asked(tmp_path, monkeypatch, tokenizer):
    """An artifact on disk, and `nectar.cli._load` returning the tiny model it was compiled for."""
    model = tiny_llama()
    path = nectar.compile(model, tokenizer, sample_document(1500), FAST).save(tmp_path / "a.nectar")
    monkeypatch.setattr("nectar.cli._load", lambda name, dtype, device="auto": (model, tokenizer))
    return path


def test_ask_compares_several_questions_with_the_full_cache(asked, capsys):
    capsys.readouterr()
    code = main(["ask", str(asked), "What is a list?", "How does del work?", "--compare", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("Q: ") == 2 and out.count("  full cache: ") == 2
    assert "memory for the document" in out and "identical answers" in out


def test_ask_reads_questions_from_stdin(asked, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is a list?\n\nWhat is a tuple?\n"))
    capsys.readouterr()
    assert main(["ask", str(asked), "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("Q: ") == 2


def test_ask_without_questions(asked, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    capsys.readouterr()
    _one_line_error(*_run(capsys, "ask", str(asked), "-"), "no questions")
