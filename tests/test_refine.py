"""End-to-end refinement must pass gradients through split attention and lower the distillation loss."""
import torch

from nectar.providers.kernels import exact_attention, reference_attention
from nectar.compiler.capture import capture
from nectar.config import FitConfig
from nectar.compiler.fit import fit
from nectar.providers.modules import MLPBank
from nectar.runtime.prefill import prefill, split_sinks
import nectar.compiler.refine as refine_module
from nectar.compiler.refine import TopK, refine, teacher
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


def _tiny_task():
    """A tiny model, a 200-token document with 2 sinks, 16 training and 8 validation sequences, captured and
    with their teachers' top-8."""
    model = tiny_llama()
    torch.manual_seed(0)
    doc = torch.randint(3, 300, (200,))
    seqs = [torch.randint(3, 300, (20,)).tolist() for _ in range(24)]
    sinks, rest = split_sinks(prefill(model, doc), 2)
    store = capture(model, seqs[:16], 200, rest, sinks, desc=None)
    val_store = capture(model, seqs[16:], 200, rest, sinks, desc=None)
    train_teacher, val_teacher = (teacher(model, s, 200, rest, sinks, 8) for s in (seqs[:16], seqs[16:]))
    return model, seqs, sinks, store, val_store, train_teacher, val_teacher


def test_refine_lowers_validation_distillation_loss():
    model, seqs, sinks, store, val_store, train_teacher, val_teacher = _tiny_task()
    bank = MLPBank(3, 2, 16, 8, 8, 1)
    fit(bank, store, val_store, FitConfig(steps=30, eval_every=10), progress=False)
    log = refine(model, bank, sinks, seqs[:16], train_teacher, seqs[16:], val_teacher, 200, steps=30, lr=3e-3,
                 batch_size=4, eval_every=10, progress=False)
    assert log["val_best"] < log["val_start"]
    assert not any(p.requires_grad for p in bank.parameters())


def test_kl_with_tail_is_the_kl_of_the_coarsened_distributions():
    """All tokens named: the full KL; fewer: a lower bound (coarsening never adds divergence), never below 0."""
    from nectar.compiler.refine import _kl_with_tail

    torch.manual_seed(0)
    p, q = torch.log_softmax(torch.randn(5, 50), -1), torch.log_softmax(torch.randn(5, 50), -1)
    full = (p.exp() * (p - q)).sum(-1)
    order = p.argsort(-1, descending=True)
    torch.testing.assert_close(_kl_with_tail(p.gather(-1, order), q.gather(-1, order)), full, atol=1e-4, rtol=1e-4)
    top = order[:, :8]
    coarse = _kl_with_tail(p.gather(-1, top), q.gather(-1, top))
    assert (coarse <= full + 1e-6).all() and (coarse >= 0).all() and (coarse < full).any()


def test_anchor_keeps_refined_modules_near_the_attention_they_replace():
    """The per-layer regression term, weighted heavily, leaves the modules' own error lower than the KL alone."""
    from nectar.measure.metrics import bank_errors

    model, seqs, sinks, store, val_store, train_teacher, val_teacher = _tiny_task()
    errors = {}
    for weight in (0.0, 100.0):
        bank = MLPBank(3, 2, 16, 8, 8, 1)
        fit(bank, store, val_store, FitConfig(steps=30, eval_every=10), progress=False)
        refine(model, bank, sinks, seqs[:16], train_teacher, seqs[16:], val_teacher, 200, steps=30, lr=3e-2,
               batch_size=4, eval_every=30, progress=False, anchor=store, anchor_weight=weight)
        errors[weight] = bank_errors(bank, val_store)["merged_rel"].mean().item()
    assert errors[100.0] < errors[0.0]


def test_a_capture_collects_the_teacher_of_a_separate_pass():
    """The capture without modules is the full-cache model: its logits give the same top-k as a pass of
    their own, so a compile that refines gets its teacher for the cost of the output layer."""
    model, seqs, sinks, _, _, _, _ = _tiny_task()
    torch.manual_seed(0)
    _, rest = split_sinks(prefill(model, torch.randint(3, 300, (200,))), 2)  # _tiny_task's document
    seqs = [s[: 8 + 3 * (i % 5)] for i, s in enumerate(seqs[:16])]  # unequal: capture reorders by length
    collect = TopK(seqs, 8)
    capture(model, seqs, 200, rest, sinks, batch_size=5, desc=None, on_logits=collect)
    for (ids, lp), (want_ids, want_lp) in zip(collect.out, teacher(model, seqs, 200, rest, sinks, 8, batch_size=3)):
        assert ids.shape == want_ids.shape
        torch.testing.assert_close(lp, want_lp, atol=1e-4, rtol=1e-4)
        assert (ids[:, 0] == want_ids[:, 0]).all()


def test_weighted_distillation_loss_is_the_weighted_token_mean():
    """Weights 1 give the plain mean; weight 0 on a sequence leaves the loss of the others alone, whatever its
    length: how refinement keeps recall's large KL from drowning the questions'."""
    from nectar.compiler.refine import _distill_loss

    model, seqs, sinks, store, _, train_teacher, _ = _tiny_task()
    bank = MLPBank(3, 2, 16, 8, 8, 1)
    pair = [seqs[0], seqs[1][:12]]  # unequal lengths: the pads must weigh nothing
    teachers = [train_teacher[0], (train_teacher[1][0][:12], train_teacher[1][1][:12])]
    with torch.no_grad():
        plain, ones, first = (_distill_loss(model, bank, sinks, pair, teachers, 200, w)
                              for w in (None, [1.0, 1.0], [1.0, 0.0]))
        alone = _distill_loss(model, bank, sinks, pair[:1], teachers[:1], 200)
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(first, plain)


def test_kind_weights_weigh_recall_alone():
    from types import SimpleNamespace

    from nectar.compiler.refine import kind_weights

    train = [SimpleNamespace(kind=k) for k in ("recall", "self_study", "direct", "recall")]
    assert kind_weights(0.1, train, train[:1]) == ([0.1, 1.0, 1.0, 0.1], [0.1])


def test_blockwise_log_probabilities_equal_the_whole_log_softmax(monkeypatch):
    """The distillation loss takes its log-probabilities a block of positions at a time: the same numbers and
    gradients as one log-softmax over all positions, in bf16 logits as the model gives them."""
    monkeypatch.setattr(refine_module, "BLOCK_NUMBERS", 3 * 50)  # blocks of 3 positions over a 50-word vocabulary
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 50, (2, 7, 4))
    grad = torch.randn(2, 7, 4)
    blocks = refine_module._gathered_logprobs(logits, ids)
    (blocks * grad).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    whole = torch.log_softmax(logits.float(), -1).gather(-1, ids)
    (whole * grad).sum().backward()
    assert torch.equal(blocks, whole) and torch.equal(got, logits.grad)


def test_teacher_top_k_by_blocks_equals_one_whole_log_softmax(monkeypatch):
    """The teacher's top-k, taken a block of positions at a time, is the top-k of one whole log-softmax,
    each sequence cut to its own length."""
    monkeypatch.setattr(refine_module, "BLOCK_NUMBERS", 4 * 50)
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 50).bfloat16()
    collect = TopK([[0] * 9, [0] * 5, [0] * 7], 6)
    collect([0, 1, 2], logits)
    whole = torch.log_softmax(logits.float(), -1).topk(6, dim=-1)
    for row, (ids, values) in enumerate(collect.out):
        length = collect.lengths[row]
        assert torch.equal(ids, whole.indices[row, :length]) and torch.equal(values, whole.values[row, :length])
