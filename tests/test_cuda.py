"""What only a GPU has: its fused kernels, CUDA graphs, and one artifact giving the same logits on either
device. (Decoding against eager attention and every way to compile run on the GPU too, as the `cuda`
value of the device axis in test_attention and test_variants.) Skipped where torch sees no GPU (CI)."""
import pytest
import torch

import nectar
from nectar.providers.kernels import _grouped_mask, exact_attention, reference_attention
from nectar.eval.bench import BenchConfig, run
from nectar.runtime.binding import bound
from nectar.model.padding import positions_after
from conftest import FAST, assert_replay_matches_eager, sample_document, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
CUDA = torch.device("cuda")


@torch.no_grad()
def test_exact_attention_on_gpu_matches_cpu_with_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    mask = torch.zeros(2, 1, 5, 40)
    mask[0, :, :, :7] = float("-inf")
    o_cpu, lse_cpu = exact_attention(q, k, v, 0.25, mask)
    o_gpu, lse_gpu = exact_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), 0.25, mask.to(CUDA))
    torch.testing.assert_close(o_gpu.cpu(), o_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse_gpu.cpu(), lse_cpu, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def gpu_compiled(tokenizer):
    model = tiny_llama().to(CUDA)
    return model, nectar.compile(model, tokenizer, sample_document(1500), FAST)


def test_compile_on_gpu_writes_an_artifact_that_loads_on_the_cpu(gpu_compiled, tmp_path):
    _, art = gpu_compiled
    art.save(tmp_path / "a.nectar")
    loaded = nectar.Artifact.load(tmp_path / "a.nectar")
    assert all(t.device.type == "cpu" for t in loaded.bank.state_dict().values())


@torch.no_grad()
def test_artifact_gives_the_same_logits_on_gpu_and_cpu(gpu_compiled):
    gpu_model, art = gpu_compiled
    cpu_model = tiny_llama()
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    logits = {}
    for name, model in (("cpu", cpu_model), ("gpu", gpu_model)):
        with nectar.attach(model, art):
            logits[name] = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 position_ids=positions_after(art.n, mask).to(model.device)).logits.cpu()
    torch.testing.assert_close(logits["gpu"], logits["cpu"], atol=2e-3, rtol=1e-3)


def test_bench_runs_on_gpu(tmp_path, gpu_compiled):
    model, art = gpu_compiled
    config = BenchConfig(attention_n=[64, 256], decode_n=[128], batches=[1, 4], new_tokens=3, repeats=1)
    report = run(model, art, torch.randint(3, 300, (512,)).tolist(), config)
    assert report["device"] != "cpu" and report["peak_gpu_mb"] > 0
    assert {r["method"] for r in report["decode"]} >= {"no_document", "full_cache", "nectar"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_fused_cuda_kernels_match_reference(dtype, masked):
    """Flash (bf16, no mask) and memory-efficient (a mask, or fp32) kernels against the written-out path,
    a fully masked row (transformers' finite minimum) included."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, h, m, 64, device=CUDA) for h, m in ((6, 3), (3, 37), (3, 37)))
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 3, 37, device=CUDA)
        mask[0, :, :, 20:] = torch.finfo(torch.float32).min
        mask[1, :, 0, :] = torch.finfo(torch.float32).min
    o, lse = exact_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.125, mask)
    grouped = q.to(dtype).float().reshape(2, 3, 6, 64)
    o_ref, lse_ref = reference_attention(grouped, k.to(dtype).float(), v.to(dtype).float(), 0.125,
                                         _grouped_mask(mask, 2, 3))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    # A fully masked row (a left pad) has no right answer: the output only has to be finite, and the lse
    # finite and hugely negative, so that it weighs nothing in a merge.
    lse_ref = lse_ref.view(2, 6, 3)
    empty = lse_ref < -1e29
    torch.testing.assert_close(o[~empty], o_ref.view(2, 6, 3, 64)[~empty], atol=tol, rtol=tol)
    torch.testing.assert_close(lse[~empty], lse_ref[~empty], atol=tol, rtol=tol)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all() and (lse[empty] < -1e29).all()


@torch.no_grad()
def test_left_padding_with_no_document_stays_finite_on_gpu():
    """Pad rows are fully masked: their lse must stay finite, or NaN reaches real tokens through the pads' keys."""
    from nectar.providers.attention import NoContext

    model = tiny_llama().to(CUDA)
    ids = torch.randint(3, 300, (2, 8), device=CUDA)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with bound(model, NoContext()):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_after(10, mask)).logits
    assert torch.isfinite(logits).all()


def test_decode_through_cuda_graphs_matches_eager_and_captures_each_layer_once(gpu_compiled):
    model, art = gpu_compiled
    assert_replay_matches_eager(model, art, art.providers(model)[0], "graphable", CUDA, tol=1e-4)
