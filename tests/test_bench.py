"""`nectar bench` runs end to end on a tiny model and writes its JSON and plot."""
import json
from dataclasses import replace

import pytest
import torch

import nectar
from nectar.eval.bench import BenchConfig, run
from nectar.providers.attention import WithExact
from nectar.eval.bench_report import table, write_report

from conftest import FAST, sample_document, tiny_llama

pytestmark = pytest.mark.integration  # servers, Ray, subprocesses or multi-compile workflows: make test, not test-fast


def test_bench_writes_report_and_plot(tmp_path, compiled):
    model, art = compiled
    doc = torch.randint(3, 300, (1024,)).tolist()
    config = BenchConfig(attention_n=[64, 256], decode_n=[128, 256], batches=[1, 2], new_tokens=3, repeats=1)
    report = run(model, art, doc, config)
    write_report(report, tmp_path)
    assert {r["method"] for r in report["decode"]} == {"no_document", "no_document_nectar_kernel", "full_cache",
                                                     "full_cache_stock", "nectar"}
    assert all(r["ratio"] < 1 for r in report["memory"])
    nectar_rows = [r for r in report["decode"] if r["method"] == "nectar"]
    assert len(nectar_rows) == 4 and all(r["vs_full_cache"] > 0 and r["vs_no_document"] > 0 for r in nectar_rows)
    assert all(("vs_full_cache_stock" in r) == (r["batch"] == 1) for r in nectar_rows)
    assert json.loads((tmp_path / "bench.json").read_text())["attention"][0]["n"] == 64
    assert (tmp_path / "bench.png").stat().st_size > 0
    text = table(report)
    assert "x full" in text and f"{report['memory'][0]['ratio']:.4f}" in text
    # The report says what the file holds and what the attached form holds in memory, which keeps 8-bit
    # weights as codes: about the file's bytes, not the 4x that fp32 weights would take.
    assert "in memory" in text and all(r["resident_bytes"] > 0 for r in report["memory"])
    fused = art.providers(model)[0]
    codes = sum(w.numel() for layer in fused.layers for w in layer.weights)
    assert all(w.dtype == torch.int8 for layer in fused.layers for w in layer.weights)
    assert codes <= art.resident_bytes(model) < 2 * art.nbytes()


def test_bench_caps_sizes_above_the_model_window_without_changing_its_config(compiled):
    model, art = compiled
    doc = torch.randint(3, 300, (4096,)).tolist()
    config = BenchConfig(attention_n=[64], decode_n=[128, 100_000], batches=[1], new_tokens=2, repeats=1)
    report = run(model, art, doc, config)
    assert max(r["n"] for r in report["decode"]) <= model.config.max_position_embeddings
    assert config.decode_n == [128, 100_000]


def test_bench_config_rejects_nonsense():
    with pytest.raises(nectar.NectarError):
        BenchConfig(batches=[0])


def test_bench_on_a_model_with_sliding_layers(tmp_path):
    """Every case decodes, and memory counts the model's real cache: the window in each sliding layer."""
    from conftest import tiny_tokenizer
    from test_families import SUPPORTED, TINY, tiny
    from nectar.model.models import cache_tokens

    model, tokenizer = tiny(*SUPPORTED["gemma3"]), tiny_tokenizer()
    doc = torch.randint(3, 300, (512,))
    art = nectar.compile(model, tokenizer, doc[:240], TINY)
    config = BenchConfig(attention_n=[64], decode_n=[128, 256], batches=[1, 2], new_tokens=3, repeats=1)
    report = run(model, art, doc.tolist(), config)
    assert {r["method"] for r in report["decode"]} >= {"full_cache", "full_cache_stock", "nectar"}
    per_token = 2 * model.config.num_key_value_heads * 16 * 2
    assert [r["full_cache_bytes"] for r in report["memory"]] == [cache_tokens(model.config, r["n"]) * per_token
                                                                 for r in report["memory"]]


def test_bench_runs_on_an_artifact_with_exact_tokens(tokenizer):
    """The default compile keeps exact tokens beside the modules; the bench once failed on such a provider."""
    model = tiny_llama()
    art = nectar.compile(model, tokenizer, sample_document(1500), replace(FAST, exact_share=0.3))
    assert isinstance(art.providers(model)[0], WithExact)
    config = BenchConfig(attention_n=[64], decode_n=[128], batches=[1], new_tokens=2, repeats=1)
    report = run(model, art, torch.randint(3, 300, (256,)).tolist(), config)
    assert report["attention"][0]["module_ms"] > 0
    assert [r["method"] for r in report["decode"]].count("nectar") == 1
