"""Module banks: the inference form, per-layer widths, the quadrature variant and budget allocation."""
import pytest
import torch

from nectar.providers.kernels import reference_attention
from nectar.compiler.budget import allocate
from nectar.providers.fused import FusedBank
from nectar.providers.modules import MLPBank, MLPStack, width_groups
from nectar.providers.quadrature import QuadratureBank


def _trained_looking_bank(depth: int, target_widths, score_widths, weight_bits: int = 16,
                          target_softmax: bool = False) -> MLPBank:
    torch.manual_seed(0)
    bank = MLPBank(layers=3, kv_heads=2, head_dim=16, target_widths=target_widths, score_widths=score_widths,
                   depth=depth, weight_bits=weight_bits, target_softmax=target_softmax)
    q, o = torch.randn(6, 50, 16) * 3 + 1, torch.randn(6, 50, 16)
    bank.standardise(q, o, torch.randn(6, 50) * 2 + 5)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return bank


@pytest.mark.parametrize("softmax", [False, True], ids=["gelu", "pseudo-keys"])
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("widths", [(7, 5), ([3, 9, 6], [2, 5, 4])], ids=["uniform", "per-layer"])
def test_fused_bank_computes_the_same_function_as_the_training_bank(depth, widths, bits, softmax):
    bank = _trained_looking_bank(depth, *widths, weight_bits=bits, target_softmax=softmax)
    bank.round_weights()  # a compiled bank's weights sit on their 8-bit grid
    fused = FusedBank(bank)
    # An 8-bit bank stays 8-bit in memory: int8 codes, read back inside the call.
    assert all((w.dtype == torch.int8) == (bits == 8) for layer in fused.layers for w in layer.weights)
    x = torch.randn(4, 2, 9, 16) * 3
    for layer in range(3):
        want, got = bank(layer, x), fused(layer, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("softmax", [False, True], ids=["gelu", "pseudo-keys"])
def test_masked_units_neither_compute_nor_learn(softmax):
    bank = _trained_looking_bank(2, [3, 9, 6], [2, 5, 4], target_softmax=softmax)
    x = torch.randn(4, 2, 9, 16)
    with torch.no_grad():
        before = bank(0, x)
        bank.target.weights[1][0:2, 3:, :] += 100.0  # layer 0's units past width 3 do not exist
        after = bank(0, x)
    torch.testing.assert_close(after[0], before[0])
    o, lse = bank.predict(torch.randn(6, 20, 16))
    (o.sum() + lse.sum()).backward()
    assert bank.target.weights[0].grad[0:2, :, 3:].abs().max() == 0
    assert bank.target.weights[1].grad[0:2, 3:, :].abs().max() == 0
    assert bank.target.weights[0].grad[2:4, :, :9].abs().max() > 0


@pytest.mark.parametrize("softmax", [False, True], ids=["gelu", "pseudo-keys"])
def test_every_path_of_a_stack_of_unequal_widths_is_one_function(softmax):
    """Masked (all modules at the widest), grouped by width and trimmed per layer: a softmax over the hidden
    units must give masked units no weight and scale by the module's own width, as the trimmed path does."""
    bank = _trained_looking_bank(2, [3, 9, 6], [2, 5, 4], target_softmax=softmax)
    x = torch.randn(6, 11, 16)
    with torch.no_grad():
        masked, grouped = bank.target.masked(x, slice(None)), bank.target(x, slice(None))
        trimmed = torch.cat([bank.target(x[bank.rows(layer)], bank.rows(layer)) for layer in range(3)])
    torch.testing.assert_close(masked, trimmed)
    torch.testing.assert_close(grouped, trimmed)


@pytest.mark.parametrize("softmax", [False, True], ids=["gelu", "pseudo-keys"])
def test_export_stores_each_layer_at_its_own_width_and_round_trips(softmax):
    bank = _trained_looking_bank(2, [3, 9, 6], [2, 5, 4], target_softmax=softmax)
    tensors = bank.export()
    assert tensors["0.target.w1"].shape == (2, 3, 3) and tensors["1.target.w1"].shape == (2, 9, 9)
    assert tensors["2.score.w2"].shape == (2, 4, 1)
    assert bank.num_params() == sum(t.numel() for t in tensors.values())
    model = {"layers": 3, "kv_heads": 2, "head_dim": 16}
    back = MLPBank.from_export(model, bank.sizes(), {k: v.clone() for k, v in tensors.items()})
    x = torch.randn(2, 2, 5, 16)
    assert back.target_softmax == softmax
    for layer in range(3):
        torch.testing.assert_close(back(layer, x), bank(layer, x))


def test_8_bit_weights_store_in_half_the_bytes_and_load_as_the_rounded_bank():
    bank = _trained_looking_bank(2, [3, 9, 6], [2, 5, 4], weight_bits=8)
    x = torch.randn(2, 2, 5, 16)
    unrounded = [bank(layer, x) for layer in range(3)]
    bank.round_weights()
    tensors = bank.export()
    assert tensors["1.target.w1"].dtype == torch.int8 and tensors["1.target.w1.scale"].shape == (2, 1, 9)
    stored = sum(t.numel() * (1 if t.dtype == torch.int8 else 2) for t in tensors.values())
    assert bank.num_params() * 2 == pytest.approx(stored, abs=2)  # the budget counts what the file holds
    back = MLPBank.from_export({"layers": 3, "kv_heads": 2, "head_dim": 16}, bank.sizes(), tensors)
    for layer in range(3):
        torch.testing.assert_close(back(layer, x), bank(layer, x))
        # Rounding moves the function, but by less than a percent of its output.
        o, lse = unrounded[layer]
        assert (back(layer, x)[0] - o).norm() < 0.01 * o.norm()
        assert (back(layer, x)[1] - lse).abs().max() < 0.01 * lse.abs().max()


def test_8_bit_weights_buy_width_at_the_same_budget():
    wide = MLPBank.for_budget(3, 2, 64, 6000, depth=2, score_share=0.4, weight_bits=8)
    narrow = MLPBank.for_budget(3, 2, 64, 6000, depth=2, score_share=0.4)
    assert wide.num_params() <= 3 * 2 * 6000 and narrow.num_params() <= 3 * 2 * 6000
    assert wide.target_widths[0] >= 1.5 * narrow.target_widths[0]


def test_rounding_to_the_8_bit_grid_is_idempotent_and_bounded():
    from nectar.providers.quant import dequantize, quantize, round_to_grid_

    w = torch.randn(4, 10, 7) * torch.logspace(-3, 1, 7)  # columns of very different scales
    codes, scale = quantize(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((dequantize(codes, scale) - w).abs() <= scale.float() / 2 + 1e-7).all()
    once = w.clone()
    round_to_grid_(once)
    twice = once.clone()
    round_to_grid_(twice)
    torch.testing.assert_close(twice, once, rtol=0, atol=0)


def test_quadrature_with_a_node_per_key_is_exact_attention():
    torch.manual_seed(0)
    keys, values = torch.randn(6, 24, 16), torch.randn(6, 24, 16)  # 3 layers x 2 kv heads
    bank = QuadratureBank(3, 2, 16, nodes=24, scaling=0.25)
    bank.init_from(keys, values)
    q = torch.randn(1, 2, 7, 16)
    for layer in range(3):
        rows = slice(2 * layer, 2 * layer + 2)
        want = reference_attention(q, keys[None, rows], values[None, rows], 0.25)
        got = bank(layer, q, 0.25)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_quadrature_kmeans_start_is_close_with_fewer_nodes():
    torch.manual_seed(0)
    centres = torch.randn(2, 4, 16) * 4
    keys = (centres.repeat_interleave(30, 1) + 0.05 * torch.randn(2, 120, 16))
    values = torch.randn(2, 120, 16)
    bank = QuadratureBank(1, 2, 16, nodes=4, scaling=0.25)
    bank.init_from(keys, values)
    q = torch.randn(1, 2, 10, 16) * 0.3
    want_lse = reference_attention(q, keys[None], values[None], 0.25)[1]
    assert (bank(0, q, 0.25)[1] - want_lse).abs().max() < 0.05


def test_allocate_follows_difficulty_within_bounds_and_never_exceeds_the_uniform_total():
    difficulty = [0.01, 0.2, 0.3, 5.0, 0.1, 0.1]
    params = allocate(difficulty, 1000, low=0.25, high=3.0)
    assert sum(params) <= 6 * 1000
    assert sum(params) > 6 * 1000 * 0.98
    assert min(params) >= 250 - 1 and max(params) <= 3000
    assert params[3] == max(params) and params[0] == min(params)
    assert params[2] >= params[1] >= params[4]


def test_fit_windows_cover_every_row_once_per_epoch():
    from nectar.compiler.fit import Rows

    n = 10
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    rows = Rows(order.float().view(1, n, 1), torch.zeros(1, n, 1), torch.zeros(1, n), torch.ones(1, n))
    seen = torch.cat([rows.window(step, 4).x.flatten() for step in range(5)])  # 20 rows: two epochs
    assert sorted(seen.tolist()) == sorted(2 * list(range(n)))


def test_fit_rows_in_units_give_the_same_loss_as_raw_rows():
    from nectar.compiler.fit import loss_terms, rows_of, unit_loss

    store = _attention_store(n=64)
    store.lse_loc = store.lse_ctx + torch.randn(store.lse_ctx.shape, generator=torch.Generator().manual_seed(1))
    bank = MLPBank(layers=2, kv_heads=2, head_dim=16, target_widths=8, score_widths=8, depth=1)
    bank.standardise(store.q, store.o_ctx, store.lse_ctx)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = unit_loss(bank, rows_of(bank, store, 1.0, order, block=3))
        raw = loss_terms(bank, store.rows(order), 1.0)
    for a, b in zip(encoded, raw):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # fp16 storage of the encoded rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_weighted_square_equals_the_expression_in_value_and_gradient(dtype):
    from nectar.compiler.fit import WeightedSquare

    g = torch.Generator().manual_seed(0)
    o = torch.randn(3, 40, 8, generator=g).to(dtype).requires_grad_(True)
    t, w = torch.randn(3, 40, 8, generator=g).half(), torch.rand(3, 40, generator=g)
    scale = torch.tensor([1.0, -2.0, 0.5])  # a different upstream gradient per module
    grads = []
    for loss in (lambda: WeightedSquare.apply(o, t, w),
                 lambda: (w.unsqueeze(-1) * (o.float() - t.float()).pow(2)).mean((1, 2))):
        o.grad = None
        value = loss()
        (value * scale).sum().backward()
        assert o.grad.dtype == dtype
        grads.append((value.detach(), o.grad.float()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_width_groups_cover_every_module_once_and_split_where_widths_jump():
    widths = [8, 8, 9, 8, 40, 41, 8, 100]
    sets = width_groups(widths, 3)
    assert sorted(i for index, _ in sets for i in index) == list(range(8))
    assert [width for _, width in sets] == [9, 41, 100]
    assert all(widths[i] <= width for index, width in sets for i in index)
    assert width_groups([5] * 4, 3) == [([0, 1, 2, 3], 5)]


def test_grouped_stack_equals_the_masked_reference_in_value_and_gradient():
    torch.manual_seed(0)
    stack = MLPStack(6, 8, [3, 3, 12, 12, 30, 5], 4, depth=2)
    x = torch.randn(6, 17, 8)
    grads = []
    for path in (lambda: stack(x, slice(None)), lambda: stack.masked(x, slice(None))):
        stack.zero_grad()
        out = path()
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in stack.parameters()])
        grads[-1].append(out.detach())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one_layer = slice(2, 4)  # equal widths: run trimmed, still the same function
    torch.testing.assert_close(stack(x[2:4], one_layer), stack.masked(x[2:4], one_layer), atol=1e-5, rtol=1e-5)


def _attention_store(M: int = 4, n: int = 2048, keys: int = 64, d: int = 16, queries_seed: int = 0):
    """Queries with their exact attention (output, log-normalizer) over random keys: a module's real task."""
    from nectar.compiler.capture import Store

    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(M, keys, d, generator=g), torch.randn(M, keys, d, generator=g)
    q = torch.randn(M, n, d, generator=torch.Generator().manual_seed(queries_seed))
    scores = q @ K.transpose(1, 2) / d ** 0.5
    o, lse = scores.softmax(-1) @ V, scores.logsumexp(-1)
    return Store(q, o, lse, torch.zeros_like(o), lse - 1.0)


def test_a_bf16_fit_learns_as_well_as_an_fp32_one():
    from nectar.config import FitConfig
    from nectar.compiler.fit import fit
    from nectar.measure.metrics import bank_errors

    train, val = _attention_store(), _attention_store(n=512, queries_seed=1)  # the same keys, new queries
    errors = {}
    for mode in (False, True):
        torch.manual_seed(0)
        bank = MLPBank(layers=2, kv_heads=2, head_dim=16, target_widths=32, score_widths=16, depth=2)
        fit(bank, train, val, FitConfig(steps=300, batch=256, eval_every=50, bf16=mode), progress=False)
        errors[mode] = bank_errors(bank, val)["merged_rel"].mean().item()
    start = bank_errors(MLPBank(2, 2, 16, 32, 16, 2), val)["merged_rel"].mean().item()
    assert errors[True] < 0.5 * start  # it learned
    assert errors[True] < 1.1 * errors[False]  # and bf16 matmuls cost it nothing that matters


def test_share_power_2_weighs_the_target_by_the_merged_outputs_squared_error():
    from nectar.providers.kernels import blend
    from nectar.compiler.fit import loss_terms

    store = _attention_store(n=64)
    g = torch.Generator().manual_seed(3)
    store.lse_loc = store.lse_ctx + 2 * torch.randn(store.lse_ctx.shape, generator=g)  # shares spread over (0, 1)
    store.o_loc = torch.randn(store.o_ctx.shape, generator=g)
    bank = MLPBank(layers=2, kv_heads=2, head_dim=16, target_widths=8, score_widths=8, depth=1)
    bank.standardise(store.q, store.o_ctx, store.lse_ctx)
    with torch.no_grad():
        o, _ = bank.predict(store.q)
        # the merged output with the document's true lse: its error is the target's alone
        error = blend(o, store.lse_ctx, store.o_loc, store.lse_loc) - blend(store.o_ctx, store.lse_ctx, store.o_loc,
                                                                              store.lse_loc)
        merged = (error / bank.o_scale).pow(2).mean((1, 2))
        target = {p: loss_terms(bank, store, share_power=p)[0] for p in (1.0, 2.0)}
    torch.testing.assert_close(target[2.0], merged)
    assert (target[1.0] > 1.2 * target[2.0]).all()  # power 1 counts low-share queries more


@pytest.mark.parametrize("softmax", [False, True], ids=["gelu", "pseudo-keys"])
@pytest.mark.parametrize("widths", [7, [3, 9, 6]], ids=["uniform", "per-layer"])
def test_solve_last_is_the_weighted_least_squares_output_layer(widths, softmax):
    """At the solution the weighted loss has no gradient left in the last layer (up to the small ridge)."""
    torch.manual_seed(0)
    stack = MLPStack(6, 16, [w for w in ([widths] * 3 if isinstance(widths, int) else widths) for _ in range(2)],
                     5, depth=2, softmax_first=softmax)
    x, y, w = torch.randn(6, 400, 16), torch.randn(6, 400, 5), torch.rand(6, 400)
    loss = lambda: (w.unsqueeze(-1) * (stack.masked(x, slice(None)) - y).pow(2)).mean()
    before = loss().item()
    stack.solve_last(x, y, w, ridge=1e-6)
    stack.zero_grad()
    after = loss()
    after.backward()
    assert after.item() < before
    assert stack.weights[-1].grad.abs().max() < 1e-4 and stack.biases[-1].grad.abs().max() < 1e-4
    # a module's units past its width read 0, so they get no weight
    for m, width in enumerate(stack.widths):
        if width < max(stack.widths):
            assert stack.weights[-1][m, width:].abs().max() == 0


def test_a_ridge_start_fits_further_in_the_same_steps():
    from nectar.config import FitConfig
    from nectar.compiler.fit import fit
    from nectar.measure.metrics import bank_errors

    train, val = _attention_store(), _attention_store(n=512, queries_seed=1)
    errors = {}
    for init in ("random", "ridge"):
        torch.manual_seed(0)
        bank = MLPBank(layers=2, kv_heads=2, head_dim=16, target_widths=32, score_widths=16, depth=2)
        fit(bank, train, val, FitConfig(steps=40, batch=256, warmup=10, eval_every=20, init=init), progress=False)
        errors[init] = bank_errors(bank, val)["merged_rel"].mean().item()
    assert errors["ridge"] < 0.8 * errors["random"]
