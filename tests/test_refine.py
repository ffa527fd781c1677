"""End-to-end refinement must pass gradients through split attention and lower the distillation loss."""
import torch

from nectar.attach import prefill, split_context
from nectar.attention import exact_attention, reference_attention
from nectar.capture import capture
from nectar.fit import fit
from nectar.config import FitConfig
from nectar.modules import MLPBank
from nectar.refine import refine
from conftest import tiny_llama


def test_gradient_path_matches_fused_path():
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    o, lse = exact_attention(q, k, v, 0.3)  # grad enabled: takes the differentiable path
    (o.sum() + lse.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        fast = exact_attention(q, k, v, 0.3)
    torch.testing.assert_close(fast[0], reference_attention(q.detach(), k, v, 0.3)[0], atol=1e-5, rtol=1e-5)


def test_refine_lowers_validation_distillation_loss():
    model = tiny_llama()
    torch.manual_seed(0)
    doc = torch.randint(3, 300, (200,))
    seqs = [torch.randint(3, 300, (20,)).tolist() for _ in range(24)]
    sinks, rest = split_context(prefill(model, doc), 2)
    store, teacher = capture(model, seqs[:16], 200, rest, sinks, desc=None, topk=8)
    val_store, val_teacher = capture(model, seqs[16:], 200, rest, sinks, desc=None, topk=8)
    bank = MLPBank(3, 2, 16, 8, 8, 1)
    fit(bank, store, val_store, FitConfig(steps=30, eval_every=10), progress=False)
    log = refine(model, bank, sinks, seqs[:16], teacher, seqs[16:], val_teacher, 200, steps=30, lr=3e-3,
                 batch_size=4, eval_every=10, progress=False)
    assert log["val_best"] < log["val_start"]
    assert not any(p.requires_grad for p in bank.parameters())
