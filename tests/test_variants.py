"""The quadrature variant and non-uniform allocation, fitted from one shared Workbench on a tiny model."""
import pytest
import torch

import nectar
from nectar.compiler import Workbench
from conftest import sample_document, tiny_llama
from test_compile import FAST


@pytest.fixture(scope="module")
def bench(tokenizer):
    return Workbench(tiny_llama(), tokenizer, sample_document(1500), FAST)


@pytest.mark.parametrize("changes", [{"variant": "quadrature"}, {"allocation": "probe", "probe_steps": 20}],
                         ids=["quadrature", "probe-allocation"])
def test_variant_meets_budget_beats_no_document_and_round_trips(bench, changes, tmp_path, tokenizer):
    art = bench.compile(**changes)
    assert art.memory_ratio() <= FAST.budget
    for fid in art.manifest["metrics"]["fidelity"].values():
        assert fid["nectar"]["answer"]["kl"] < fid["no_document"]["answer"]["kl"]
    loaded = nectar.Artifact.load(art.save(tmp_path / "v.nectar"))
    ids, pos = torch.randint(3, 300, (1, 6)), art.n + torch.arange(6).view(1, -1)
    with nectar.attach(bench.model, loaded, tokenizer):
        out = bench.model(input_ids=ids, position_ids=pos).logits
    with nectar.attach(bench.model, art, tokenizer):
        ref = bench.model(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_probe_allocation_spends_the_same_bytes_unevenly(bench):
    uniform = bench.compile()
    probe = bench.compile(allocation="probe", probe_steps=20)
    widths = probe.manifest["modules"]["target_widths"]
    assert len(set(widths)) > 1
    assert probe.bank.num_params() <= uniform.bank.num_params()
    assert probe.bank.num_params() >= uniform.bank.num_params() * 0.9


def test_workbench_captures_once_for_every_fit(bench, monkeypatch):
    bench.compile()
    import nectar.compiler as compiler

    monkeypatch.setattr(compiler, "capture", lambda *a, **k: pytest.fail("captured again"))
    monkeypatch.setattr(compiler, "build_prompts", lambda *a, **k: pytest.fail("prompted again"))
    bench.compile(budget=0.05)
