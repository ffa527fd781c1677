"""End-to-end refinement must pass gradients through split attention and lower the distillation loss."""
import torch

from nectar.attention import exact_attention, reference_attention
from nectar.capture import capture
from nectar.config import FitConfig
from nectar.fit import fit
from nectar.modules import MLPBank
from nectar.prefill import prefill, split_sinks
from nectar.refine import refine, teacher
from conftest import tiny_llama


def test_gradient_path_matches_fused_path():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.zeros(2, 1, 5, 7)
    mask[0, :, :, 5:] = torch.finfo(torch.float32).min
    o, lse = exact_attention(q, k, v, 0.3, mask)  # grad enabled: takes the differentiable path
    (o.sum() + lse.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        fast = exact_attention(q, k, v, 0.3, mask)
    torch.testing.assert_close(o.detach(), fast[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.detach(), fast[1], atol=1e-5, rtol=1e-5)
    grouped = reference_attention(q.detach().reshape(2, 3, 10, 8), k, v, 0.3,
                                  mask.unsqueeze(2).expand(2, 1, 2, 5, 7).reshape(2, 1, 10, 7))
    torch.testing.assert_close(o.detach(), grouped[0].reshape(2, 6, 5, 8), atol=1e-5, rtol=1e-5)


def test_refine_lowers_validation_distillation_loss():
    model = tiny_llama()
    torch.manual_seed(0)
    doc = torch.randint(3, 300, (200,))
    seqs = [torch.randint(3, 300, (20,)).tolist() for _ in range(24)]
    sinks, rest = split_sinks(prefill(model, doc), 2)
    store = capture(model, seqs[:16], 200, rest, sinks, desc=None)
    val_store = capture(model, seqs[16:], 200, rest, sinks, desc=None)
    train_teacher, val_teacher = (teacher(model, s, 200, rest, sinks, 8) for s in (seqs[:16], seqs[16:]))
    bank = MLPBank(3, 2, 16, 8, 8, 1)
    fit(bank, store, val_store, FitConfig(steps=30, eval_every=10), progress=False)
    log = refine(model, bank, sinks, seqs[:16], train_teacher, seqs[16:], val_teacher, 200, steps=30, lr=3e-3,
                 batch_size=4, eval_every=10, progress=False)
    assert log["val_best"] < log["val_start"]
    assert not any(p.requires_grad for p in bank.parameters())
