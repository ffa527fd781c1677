"""Every way to build a bank (variant x allocation x refinement, on every device), from one shared Workspace
per device: each meets its budget, beats no document, round-trips through a file and gives the same logits."""
import pytest

import nectar
from nectar.compiler.pipeline import compile_bank
from nectar.compiler.workspace import Workspace
from conftest import DEVICES, FAST, assert_same_logits, sample_document, tiny_llama

pytestmark = pytest.mark.integration  # servers, Ray, subprocesses or multi-compile workflows: make test, not test-fast

MATRIX = [(variant, allocation, refine) for variant in ("mlp", "quadrature") for allocation in ("uniform", "probe")
          for refine in (0, 6) if not (variant == "quadrature" and allocation == "probe")]


@pytest.fixture(scope="module", params=DEVICES)
def ws(request, tokenizer):
    return Workspace(tiny_llama().to(request.param), tokenizer, sample_document(1500), FAST)


@pytest.mark.parametrize("variant, allocation, refine", MATRIX, ids=["-".join(map(str, m)) for m in MATRIX])
def test_bank_meets_budget_beats_no_document_and_round_trips(ws, variant, allocation, refine, tmp_path, tokenizer):
    art = compile_bank(ws, variant=variant, allocation=allocation, probe_steps=20, refine_steps=refine)
    assert art.memory_ratio() <= FAST.budget
    for fid in art.manifest["metrics"]["fidelity"].values():
        assert fid["nectar"]["answer"]["kl"] < fid["no_document"]["answer"]["kl"]
    assert ("refine" in art.manifest["timings"]) == bool(refine)
    if refine:
        log = art.manifest["metrics"]["refine"]
        assert log["val_best"] <= log["val_start"] and len(log["history"]) > 1
    assert_same_logits(ws.model, tokenizer, nectar.Artifact.load(art.save(tmp_path / "v.nectar")), art)


@pytest.mark.parametrize("allocation", ["probe", "gap"])
def test_allocation_spends_the_same_bytes_unevenly(ws, allocation):
    uniform = compile_bank(ws)
    probe = compile_bank(ws, allocation=allocation, probe_steps=20)
    widths = probe.manifest["modules"]["target_widths"]
    assert len(set(widths)) > 1
    assert probe.bank.num_params() <= uniform.bank.num_params()
    assert probe.bank.num_params() >= uniform.bank.num_params() * 0.9


def test_a_workspace_captures_once_for_every_fit(ws, monkeypatch):
    """Only the on-policy capture, which depends on the fitted bank, is made again for a new fit."""
    compile_bank(ws)
    import nectar.compiler.workspace as workspace

    real, drives = workspace.capture, []

    def capture(*args, drive=None, **kwargs):
        drives.append(drive)
        return real(*args, drive=drive, **kwargs)

    monkeypatch.setattr(workspace, "capture", capture)
    monkeypatch.setattr(workspace.P, "build_prompts", lambda *a, **k: pytest.fail("prompted again"))
    compile_bank(ws, budget=0.05)
    assert drives and all(d is not None for d in drives)  # on-policy only, driven by the new bank
