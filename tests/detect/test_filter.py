"""GuidedMoEFilter and its losses: shapes, parameter count, routing, determinism, training step."""

from __future__ import annotations

import io
import math

import pytest
import torch

from raid_fast.detect.filter import (
    GuidedMoEFilter,
    balance_loss,
    binary_focal_loss,
    dense_balance_loss,
    sparse_balance_loss,
    total_loss,
)

DIM, K = 32, 16

# the authors' model at D=384, K=150 (their expert.py / moe1.py: about 13.95 M = 3 x 2.655 M + 3 x 1.962 M
# + 37 k + 62 k); these are the exact counts of those layers
PARAMS_GUIDANCE_EXPERT = 2 * 384 * 384 * 9 + 384 + 2 * 384
PARAMS_DENOISE_EXPERT = 1_962_451
PARAMS_ROUTER1 = 768 * 3 * 16 + 3
PARAMS_ROUTER2 = (1152 + 150) * 3 * 16 + 3
PARAMS_TOTAL = 13_952_799


def make_model(seed: int = 0, **kwargs) -> GuidedMoEFilter:
    torch.manual_seed(seed)
    return GuidedMoEFilter(dim=DIM, k=K, **kwargs)


def make_inputs(b: int, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    guidance = torch.randn(b, 2 * DIM, h, w, generator=g)  # [B, 2D, H, W]
    cost = torch.rand(b, K, h, w, generator=g).sort(dim=1).values  # [B, K, H, W], ascending like retrieval
    return guidance, cost


def randomise_router1(model: GuidedMoEFilter, seed: int = 3) -> None:
    # the zero-initialised router ties all experts; random weights make the selection data-dependent
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.router1.proj.weight.copy_(torch.randn(model.router1.proj.weight.shape, generator=g) * 0.05)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("b,h,w", [(1, 18, 18), (2, 32, 32), (3, 7, 5), (1, 3, 2)], ids=lambda v: str(v))
def test_shapes_and_range(b, h, w, train):
    model = make_model().train(train)
    guidance, cost = make_inputs(b, h, w)
    for dense in (True, False):
        with torch.no_grad():
            m, aux = model(guidance, cost, dense_router=dense)
        assert m.shape == (b, h, w)
        assert m.dtype == torch.float32
        assert bool(torch.isfinite(m).all())
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
        assert aux["probs1"].shape == (b, 3) and aux["gate1"].shape == (b, 3) and aux["probs2"].shape == (b, 3)
        for name in ("l1", "entropy1", "l2"):
            assert aux[name].shape == ()


def test_parameter_count_matches_authors_model():
    model = GuidedMoEFilter(dim=384, k=150)
    assert num_params(model.guidance_experts[0]) == PARAMS_GUIDANCE_EXPERT == 2_655_360
    assert num_params(model.denoise_experts[0]) == PARAMS_DENOISE_EXPERT
    assert num_params(model.router1) == PARAMS_ROUTER1 == 36_867
    assert num_params(model.router2) == PARAMS_ROUTER2 == 62_499
    total = num_params(model)
    assert total == PARAMS_TOTAL
    assert total == 3 * PARAMS_GUIDANCE_EXPERT + 3 * PARAMS_DENOISE_EXPERT + PARAMS_ROUTER1 + PARAMS_ROUTER2
    # the rounded figure of the authors' model
    assert abs(total - 13.95e6) < 0.005e6


def test_eval_is_deterministic_and_init_seed_acts_only_through_weights():
    guidance, cost = make_inputs(2, 18, 18)
    # even with train-time noise configured, eval adds none
    model = make_model(seed=0, router_noise=0.05).eval()
    randomise_router1(model)
    with torch.no_grad():
        m1, aux1 = model(guidance, cost)
        m2, aux2 = model(guidance, cost)
    assert torch.equal(m1, m2)
    assert torch.equal(aux1["probs1"], aux2["probs1"]) and torch.equal(aux1["probs2"], aux2["probs2"])

    other = make_model(seed=1).eval()
    with torch.no_grad():
        m_other, _ = other(guidance, cost)
        assert not torch.allclose(m_other, m1)
        other.load_state_dict(model.state_dict())
        m_loaded, _ = other(guidance, cost)
    assert torch.equal(m_loaded, m1)


def test_train_router_noise_follows_generator():
    guidance, cost = make_inputs(2, 8, 8)
    model = make_model(router_noise=0.5).train()
    outs = []
    for seed in (7, 7, 8):
        _, aux = model(guidance, cost, generator=torch.Generator().manual_seed(seed))
        outs.append(aux["probs1"].detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_one_adam_step_lowers_total_loss():
    model = make_model().train()
    guidance, cost = make_inputs(2, 16, 16)
    g = torch.Generator().manual_seed(5)
    target = (torch.rand(2, 16, 16, generator=g) < 0.3).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    m, aux = model(guidance, cost)
    loss0 = total_loss(m, target, aux)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        m, aux = model(guidance, cost)
        loss1 = total_loss(m, target, aux)
    assert torch.isfinite(loss0) and torch.isfinite(loss1)
    assert float(loss1) < float(loss0.detach())


def test_top2_sparsity_and_gradients_reach_selected_experts():
    model = make_model().eval()
    randomise_router1(model)
    guidance, cost = make_inputs(6, 12, 12, seed=11)
    with torch.no_grad():
        _, aux = model(guidance, cost)
    gate, probs = aux["gate1"], aux["probs1"]
    # exactly 2 of 3 experts get a nonzero gate per sample, and they are the two most probable
    assert torch.equal((gate != 0).sum(dim=1), torch.full((6,), 2))
    expected = torch.zeros_like(probs).scatter_(1, probs.topk(2, dim=1).indices, 1.0)
    assert torch.allclose(gate, expected, atol=1e-6, rtol=0)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in gate}) > 1, "routing should vary per image"

    for i in range(guidance.shape[0]):
        model.zero_grad(set_to_none=True)
        m, aux = model(guidance[i : i + 1], cost[i : i + 1])
        target = torch.zeros_like(m)
        total_loss(m, target, aux).backward()
        selected = set(aux["gate1"][0].nonzero().flatten().tolist())
        assert len(selected) == 2
        for e, expert in enumerate(model.guidance_experts):
            grad = expert.conv.weight.grad
            if e in selected:
                assert grad is not None and float(grad.abs().sum()) > 0, f"sample {i}: expert {e} got no gradient"
            else:
                # its input is zeroed, so its conv weights learn nothing from this image
                assert grad is None or float(grad.abs().sum()) == 0.0
        assert float(model.router1.proj.weight.grad.abs().sum()) > 0
        assert float(model.router2.proj.weight.grad.abs().sum()) > 0
        for expert in model.denoise_experts:
            assert float(expert.q_conv.weight.grad.abs().sum()) > 0


def test_warmup_is_plain_mean_and_skips_router2():
    model = make_model().eval()
    guidance, cost = make_inputs(2, 10, 10)
    m, aux = model(guidance, cost, dense_router=False)
    assert float(aux["l2"].detach()) == 0.0
    assert torch.allclose(aux["probs2"], torch.full((2, 3), 1 / 3))
    with torch.no_grad():
        # recompute the fused guidance the way forward does, then average the experts
        p1, gate = aux["probs1"], aux["gate1"]
        fused = sum(
            p1[:, i, None, None, None] * ex(guidance * gate[:, i, None, None, None])
            for i, ex in enumerate(model.guidance_experts)
        )
        expected = torch.stack([ex(fused, cost) for ex in model.denoise_experts], dim=1).mean(dim=1)
    assert torch.allclose(m, expected, atol=1e-6)
    model.zero_grad(set_to_none=True)
    m.sum().backward()
    assert model.router2.proj.weight.grad is None


def test_focal_loss_matches_hand_computation():
    pred = torch.tensor([0.8, 0.3, 0.5, 0.95])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = 0.0
    for p, y in zip(pred.tolist(), target.tolist()):
        bce = -math.log(p) if y == 1.0 else -math.log(1.0 - p)
        expected += 0.5 * (1.0 - math.exp(-bce)) ** 4 * bce
    expected /= 4
    # first element by hand: 0.5 * 0.2^4 * -ln(0.8)
    assert math.isclose(0.5 * 0.2**4 * -math.log(0.8), 1.785148e-4, rel_tol=1e-5)
    assert math.isclose(float(binary_focal_loss(pred, target)), expected, rel_tol=1e-5)


def test_focal_loss_is_finite_at_zero_and_one():
    pred = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    target = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = binary_focal_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(pred.grad).all())
    # confidently wrong elements cost at most -log(eps) each, right ones almost nothing
    assert 0.5 * 13.0 / 4 < float(loss.detach()) <= 0.5 * -math.log(1e-6) / 2 + 1e-4
    right = binary_focal_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert float(right) < 1e-12
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        binary_focal_loss(torch.rand(2, 3), torch.rand(3, 2))


def test_balance_loss_minimum_at_uniform_routing():
    b, e = 4, 3
    uniform = torch.full((b, e), 1 / e)
    gate = torch.zeros(b, e).scatter_(1, uniform.topk(2, dim=1).indices, 1.0)
    # the authors' losses: L2 = E * sum_e (mean_b p_e)^2 equals 1 when balanced; L1 = sum_e P_e f_e = top_k / E
    assert math.isclose(float(dense_balance_loss(uniform)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(sparse_balance_loss(uniform, gate)), 2 / 3, rel_tol=1e-6)

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.softmax(3 * torch.randn(b, e, generator=g), dim=1)
        assert float(dense_balance_loss(probs)) >= 1.0 - 1e-6
        one = probs[:1]
        one_gate = torch.zeros_like(one).scatter_(1, one.topk(2, dim=1).indices, 1.0)
        assert float(sparse_balance_loss(one, one_gate)) >= 2 / 3 - 1e-6
    assert math.isclose(float(dense_balance_loss(torch.eye(e)[:1])), e, rel_tol=1e-6)

    # the zero-initialised routers route uniformly, so a fresh model sits at those values
    model = make_model().eval()
    with torch.no_grad():
        _, aux = model(*make_inputs(2, 8, 8))
    assert math.isclose(float(aux["l1"]), 2 / 3, rel_tol=1e-5)
    assert math.isclose(float(aux["l2"]), 1.0, rel_tol=1e-5)
    assert math.isclose(float(aux["entropy1"]), math.log(3), rel_tol=1e-5)
    assert math.isclose(float(balance_loss(aux)), 2 / 3 + 0.01 * math.log(3) + 1.0, rel_tol=1e-5)


def test_state_dict_round_trip():
    model = make_model(seed=0).train()
    randomise_router1(model)
    guidance, cost = make_inputs(2, 12, 12)
    with torch.no_grad():
        model(guidance, cost)  # moves the BatchNorm running statistics off their defaults
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = make_model(seed=9)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    restored.eval()
    with torch.no_grad():
        m1, aux1 = model(guidance, cost)
        m2, aux2 = restored(guidance, cost)
    assert torch.equal(m1, m2)
    assert torch.equal(aux1["gate1"], aux2["gate1"])


@pytest.mark.parametrize(
    "guidance_shape,cost_shape,exc,match",
    [
        ((2 * DIM, 8, 8), (2, K, 8, 8), ValueError, r"guidance must be \[B, 2D=64, H, W\], got a 3-d"),
        ((2, 2 * DIM, 8, 8), (2, K, 64), ValueError, r"cost must be \[B, K=16, H, W\], got a 3-d"),
        ((2, DIM, 8, 8), (2, K, 8, 8), ValueError, r"guidance must have 2D = 64 channels .* got 32"),
        ((2, 2 * DIM, 8, 8), (2, K + 1, 8, 8), ValueError, r"cost must have K = 16 channels, got 17"),
        ((2, 2 * DIM, 8, 8), (3, K, 8, 8), ValueError, r"cost must match guidance in B, H, W = \(2, 8, 8\)"),
        ((2, 2 * DIM, 8, 8), (2, K, 8, 9), ValueError, r"got \(2, 8, 9\)"),
        ((0, 2 * DIM, 8, 8), (0, K, 8, 8), ValueError, r"B, H, W >= 1"),
    ],
    ids=["guidance-ndim", "cost-ndim", "guidance-channels", "cost-channels", "batch", "width", "empty"],
)
def test_validation_errors(guidance_shape, cost_shape, exc, match):
    model = make_model().eval()
    with pytest.raises(exc, match=match):
        model(torch.randn(guidance_shape), torch.rand(cost_shape))


def test_validation_dtype_and_constructor():
    model = make_model().eval()
    with pytest.raises(TypeError, match="cost must be a floating-point tensor"):
        model(torch.randn(1, 2 * DIM, 4, 4), torch.ones(1, K, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="guidance_top_k must be <= 3, got 4"):
        GuidedMoEFilter(dim=DIM, k=K, guidance_top_k=4)
    with pytest.raises(ValueError, match="router_noise must be >= 0"):
        GuidedMoEFilter(dim=DIM, k=K, router_noise=-0.1)
