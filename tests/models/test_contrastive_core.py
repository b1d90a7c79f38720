"""The contrastive core (projection heads, CLIP and SigLIP losses, clamped temperature)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from stimg.models._contrastive import (  # noqa: E402
    LOSSES,
    CLIPLoss,
    LogitScale,
    ProjectionHead,
    SigLIPLoss,
    clamp_scales_,
    clip_loss,
    l2_normalize,
    make_loss,
    register_loss,
    siglip_loss,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("s", [1.0, 10.0])
def test_clip_known_answer(n, s):
    e = torch.eye(n, dtype=torch.float64)  # orthonormal pairs: diagonal similarity 1, off-diagonal 0
    want = math.log(1 + (n - 1) * math.exp(-s))
    assert float(clip_loss(e, e, s)) == pytest.approx(want, rel=1e-5)
    per_pair = clip_loss(e, e, s, reduction="none")
    assert per_pair.shape == (n,) and torch.allclose(per_pair, torch.full((n,), want, dtype=torch.float64))
    # un-normalised inputs give the same loss (normalised inside)
    assert float(clip_loss(3 * e, 0.5 * e, s)) == pytest.approx(want, rel=1e-5)


def test_clip_known_answer_asymmetric():
    # a₀ = b₀ = e₀; a₁ = e₁, b₁ = e₀: row sims a·bᵀ = [[1, 1], [0, 0]]
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = 2.0
    # a→b: row0 logits [2, 2] → log 2; row1 logits [0, 0], target 1 → log 2
    # b→a: logits.T = [[2, 0], [2, 0]]: row0 target 0 → log(1+e⁻²); row1 target 1 → log(1+e²)
    want = 0.5 * (math.log(2) + 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(2))))
    assert float(clip_loss(a, b, s)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("n", [2, 8])
def test_siglip_known_answer(n):
    e = torch.eye(n, dtype=torch.float64)
    s, b = 10.0, -10.0
    want = _softplus(-(s + b)) + (n - 1) * _softplus(b)
    assert float(siglip_loss(e, e, s, b)) == pytest.approx(want, rel=1e-5)
    per_row = siglip_loss(e, e, s, b, reduction="none")
    assert per_row.shape == (n,) and float(per_row.mean()) == pytest.approx(want, rel=1e-5)
    s, b = 5.0, 1.0
    want = _softplus(-(s + b)) + (n - 1) * _softplus(b)
    assert float(siglip_loss(e, e, s, b)) == pytest.approx(want, rel=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(torch.zeros(4, 3), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        siglip_loss(torch.ones(1, 3), torch.ones(1, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="outside the clamp"):
        LogitScale(2.0)
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        make_loss("triplet")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("clip", CLIPLoss)


def test_projection_head_shapes():
    h = ProjectionHead(50, 128)
    assert h.n_hidden == 100  # hidden 2× input
    assert h(torch.zeros(3, 50)).shape == (3, 128)
    assert ProjectionHead(10, 4, n_hidden=7).config() == {"n_in": 10, "n_out": 4, "n_hidden": 7, "dropout": 0.1}
    z = l2_normalize(torch.randn(6, 4))
    assert torch.allclose(z.norm(dim=1), torch.ones(6))


def test_temperature_stays_in_clamp():
    torch.manual_seed(0)
    e = torch.eye(8)
    # (b̂ = â: loss falls as T → 0) and (b̂ = −â: loss falls as T → ∞); a huge lr overshoots the clamp
    for b, bound in ((e, 0.05), (-e, 0.5)):
        loss = CLIPLoss(init_temperature=0.2, min_temperature=0.05, max_temperature=0.5)
        opt = torch.optim.SGD(loss.parameters(), lr=50.0)
        for _ in range(10):
            opt.zero_grad()
            loss(e, b).backward()
            opt.step()
            clamp_scales_(loss)
            assert 0.05 - 1e-6 <= loss.temperature <= 0.5 + 1e-6
            log_s = float(loss.scale.log_scale.detach())
            assert loss.scale.min_log - 1e-6 <= log_s <= loss.scale.max_log + 1e-6
        assert loss.temperature == pytest.approx(bound, rel=1e-5)  # reached the bound, not beyond
    # the forward pass clamps even if the parameter was moved outside by hand
    with torch.no_grad():
        loss.scale.log_scale.fill_(20.0)
    assert float(loss.scale().detach()) == pytest.approx(1 / 0.05, rel=1e-5)
    # fixed temperature: not a parameter
    fixed = CLIPLoss(init_temperature=0.1, learnable=False)
    assert list(fixed.parameters()) == []
    assert fixed.temperature == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_and_aligns_on_toy_problem(name):
    """Two noisy views of the same latent: training heads + loss lowers the loss and aligns pairs."""
    g = torch.Generator().manual_seed(0)
    n, k = 256, 6
    z = torch.randn(n, k, generator=g)
    x = z @ torch.randn(k, 30, generator=g) + 0.1 * torch.randn(n, 30, generator=g)
    y = torch.tanh(z @ torch.randn(k, 20, generator=g)) + 0.1 * torch.randn(n, 20, generator=g)
    torch.manual_seed(0)
    hx, hy = ProjectionHead(30, 16, dropout=0.0), ProjectionHead(20, 16, dropout=0.0)
    loss_fn = make_loss(name)
    params = [*hx.parameters(), *hy.parameters(), *loss_fn.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)

    def top1() -> float:
        with torch.no_grad():
            sim = l2_normalize(hx(x)) @ l2_normalize(hy(y)).T
        return float((sim.argmax(1) == torch.arange(n)).float().mean())

    with torch.no_grad():
        first = float(loss_fn(hx(x), hy(y)))
    acc0 = top1()
    for _ in range(150):
        idx = torch.randperm(n)[:64]
        opt.zero_grad()
        loss_fn(hx(x[idx]), hy(y[idx])).backward()
        opt.step()
        clamp_scales_(loss_fn)
    with torch.no_grad():
        last = float(loss_fn(hx(x), hy(y)))
    assert last < 0.5 * first
    assert top1() > max(5 * acc0, 20 / n)  # far above chance 1/256
    if name == "siglip":
        assert isinstance(loss_fn, SigLIPLoss) and float(loss_fn.bias.detach()) != -10.0
