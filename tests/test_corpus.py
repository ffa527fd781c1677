"""`nectar compile DIR --out OUT`: a corpus on a local Ray (2 CPUs), incremental, failures recorded."""
import json
import time

import pytest
import torch
from pydoc_data.topics import topics

from conftest import assert_one_line_error, run_cli, tiny_llama, tiny_tokenizer

import nectar

pytestmark = pytest.mark.integration  # servers, Ray, subprocesses or multi-compile workflows: make test, not test-fast

ray = pytest.importorskip("ray")

FLAGS = ["--set", "fit.steps=40", "--set", "prompts=12", "--set", "onpolicy_steps=10", "--dtype", "float32", "--device", "cpu"]
TOPICS = ("assert", "while", "if")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model and tokenizer saved as a local model folder, which Ray's workers load by path."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in TOPICS:
        (docs / f"{name}.txt").write_text(topics[name][:700])
    (docs / "image.md").write_bytes(b"\x89PNG\x00\x00binary")
    (docs / "blank.txt").write_text("  \n")
    return docs


def _index(out):
    return json.loads((out / "index.json").read_text())["documents"]


def test_compiles_a_folder_incrementally_on_ray(local_ray, tiny_folder, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", corpus, "--out", out, "--model", tiny_folder, *FLAGS]
    code, stdout, _ = run_cli(capsys, *args)
    index = _index(out)
    assert code == 2 and "3 compiled, 2 failed" in stdout
    assert sorted(n for n, e in index.items() if e["status"] == "compiled") == sorted(TOPICS)
    assert "binary" in index["image"]["reason"] and "empty" in index["blank"]["reason"]
    assert all(0 <= index[n]["fidelity"]["agreement"] <= 1 and index[n]["bytes"] > 0 for n in TOPICS)
    assert sorted(p.name for p in out.glob("*.nectar")) == sorted(f"{n}.nectar" for n in TOPICS)

    stamps = {n: (out / f"{n}.nectar").stat().st_mtime_ns for n in TOPICS}
    code, stdout, _ = run_cli(capsys, *args)
    assert "0 compiled" in stdout and "3 up to date" in stdout
    assert {n: (out / f"{n}.nectar").stat().st_mtime_ns for n in TOPICS} == stamps

    (corpus / "while.txt").write_text(topics["while"][:600])
    (corpus / "if.txt").unlink()
    code, stdout, _ = run_cli(capsys, *args)
    assert "1 compiled" in stdout and "2 up to date" not in stdout and "removed: if" in stdout
    assert (out / "assert.nectar").stat().st_mtime_ns == stamps["assert"]
    assert (out / "while.nectar").stat().st_mtime_ns != stamps["while"] and not (out / "if.nectar").exists()
    assert "if" not in _index(out)


def test_each_artifact_equals_a_plain_compile(local_ray, tiny_folder, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run_cli(capsys, "compile", corpus / "assert.txt", corpus / "if.txt", "--out", out, "--model", tiny_folder, *FLAGS)
    code, _, err = run_cli(capsys, "compile", corpus / "assert.txt", "-o", tmp_path / "plain.nectar",
                           "--model", tiny_folder, *FLAGS)
    assert code == 0, err
    ray_tensors, plain_tensors = (nectar.Artifact.load(p).tensors() for p in (out / "assert.nectar",
                                                                               tmp_path / "plain.nectar"))
    assert ray_tensors.keys() == plain_tensors.keys()
    for name in plain_tensors:
        assert torch.equal(ray_tensors[name], plain_tensors[name]), name


def test_no_ray_loop_compiles_and_fails_the_same_documents(tiny_folder, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "compile", corpus, "--out", out, "--model", tiny_folder, "--no-ray", *FLAGS)
    assert code == 2 and "3 compiled, 2 failed" in stdout


@pytest.mark.parametrize("case, words", [
    ("empty", "holds no document"),
    ("glob", "matches no file"),
    ("out-file", "is a file"),
    ("unreachable", "cannot reach a Ray cluster"),
])
def test_bad_corpus_input_is_one_line(case, words, corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = {"empty": [empty, "--out", tmp_path / "o"],
            "glob": [str(tmp_path / "nothing" / "*.txt"), "--out", tmp_path / "o"],
            "out-file": [corpus, "--out", blocker],
            "unreachable": [corpus / "assert.txt", "--out", tmp_path / "o", "--ray-address", "127.0.0.1:1"]}[case]
    start = time.perf_counter()
    assert_one_line_error(run_cli(capsys, "compile", *argv), words)
    assert time.perf_counter() - start < 30


def test_ctrl_c_keeps_finished_artifacts_and_a_rerun_resumes(tiny_folder, corpus, tmp_path, capsys, monkeypatch):
    import nectar.compiler.corpus as corpus_module

    real, calls = corpus_module.compile_document, []

    def interrupted_second(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(corpus_module, "compile_document", interrupted_second)
    out = tmp_path / "out"
    args = ["compile", *(corpus / f"{n}.txt" for n in TOPICS), "--out", out, "--model", tiny_folder, "--no-ray", *FLAGS]
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "no half-written file" in err
    assert [p.name for p in out.iterdir() if p.suffix == ".nectar"] == ["assert.nectar"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")] and list(_index(out)) == ["assert"]
    monkeypatch.setattr(corpus_module, "compile_document", real)
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and "2 compiled, 0 failed, 1 up to date" in stdout
