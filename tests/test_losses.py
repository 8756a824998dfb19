"""Training losses: values on hand-computed cases, and that every gradient reaches what it should and only that."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vtok.losses import (
    GramLoss,
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    d_loss,
    entropy_scale,
    g_loss,
    gan_ramp,
    gram_matrix,
    l1_loss,
    l2_loss,
)
from vtok.losses import adversarial as adversarial_module


def _tiny_generator() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(3, 3, 3, padding=1)


def _tiny_disc() -> PatchDiscriminator:
    torch.manual_seed(1)
    return PatchDiscriminator(3, channels=4, layers=2)  # min size 12


# ---- reconstruction ------------------------------------------------------------------------------


def test_l1_l2_match_hand_values_and_reject_mismatched_shapes() -> None:
    x = torch.tensor([[0.0, 0.5], [1.0, 0.25]]).view(1, 1, 2, 2)
    y = torch.tensor([[0.5, 0.5], [0.0, 0.75]]).view(1, 1, 2, 2)
    assert l1_loss(x, y).item() == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    assert l2_loss(x, y).item() == pytest.approx((0.25 + 0 + 1 + 0.25) / 4)
    assert l1_loss(x, x).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        l1_loss(x, y[0])
    with pytest.raises(ValueError, match="same shape"):
        l2_loss(x, y.expand(2, -1, -1, -1))


def test_l1_l2_gradients_reach_the_reconstruction() -> None:
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = torch.rand(2, 3, 4, 4)
    (l1_loss(x, y) + l2_loss(x, y)).backward()
    expected = (torch.sign(x - y) + 2 * (x - y)) / x.numel()
    torch.testing.assert_close(x.grad, expected.detach())


# ---- discriminator --------------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "size", "out"), [(3, 24, 1), (3, 32, 2), (3, 64, 6), (2, 32, 6), (1, 16, 6)])
def test_patch_discriminator_output_shape(layers: int, size: int, out: int) -> None:
    d = PatchDiscriminator(3, channels=4, layers=layers)
    assert d.min_size == 3 * 2**layers
    assert d(torch.rand(2, 3, size, size)).shape == (2, 1, out, out)


def test_patch_discriminator_rejects_small_or_wrong_inputs() -> None:
    d = PatchDiscriminator(3, channels=4, layers=3)
    with pytest.raises(ValueError, match="at least 24x24"):
        d(torch.rand(1, 3, 23, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.rand(1, 1, 32, 32))


def test_patch_discriminator_structure_and_init() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=64, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == 32 for n in norms)
    big = convs[3].weight  # 512·256·16 weights: the sample std is within 1% of 0.02
    assert big.std().item() == pytest.approx(0.02, rel=0.01) and abs(big.mean().item()) < 1e-3
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs if c.bias is not None)
    slopes = {m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}


def test_patch_discriminator_maps_0_1_to_minus1_1_inside() -> None:
    d = _tiny_disc()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(d(x), d.net(2 * x - 1))


def test_patch_discriminator_logits_do_not_depend_on_the_rest_of_the_batch() -> None:
    """GroupNorm normalises each image alone: an image's logits are the same in any batch (unlike BatchNorm)."""
    d = _tiny_disc().train()
    x = torch.rand(4, 3, 16, 16)
    together = d(x)
    for i in range(4):
        torch.testing.assert_close(d(x[i : i + 1]), together[i : i + 1], atol=1e-6, rtol=1e-5)


# ---- GAN losses ---------------------------------------------------------------------------------

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.3, 1.5])


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_hinge_losses_on_hand_computed_logits() -> None:
    real_term = (0.0 + 0.5 + 2.0) / 3  # relu(1 - real)
    fake_term = (0.0 + 1.3 + 2.5) / 3  # relu(1 + fake)
    assert d_loss(REAL, FAKE, "hinge").item() == pytest.approx(0.5 * (real_term + fake_term))
    assert g_loss(FAKE, "hinge").item() == pytest.approx(-(-2.0 + 0.3 + 1.5) / 3)


def test_non_saturating_losses_on_hand_computed_logits() -> None:
    real_term = sum(_softplus(-r) for r in REAL.tolist()) / 3
    fake_term = sum(_softplus(f) for f in FAKE.tolist()) / 3
    assert d_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(0.5 * (real_term + fake_term))
    expected_g = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3
    assert g_loss(FAKE, "non_saturating").item() == pytest.approx(expected_g)


def test_gan_losses_reject_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="hinge"):
        d_loss(REAL, FAKE, "vanilla")
    with pytest.raises(ValueError, match="non_saturating"):
        g_loss(FAKE, "wgan")


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_generator_step_trains_the_generator_and_not_the_frozen_discriminator(kind: str) -> None:
    """The trainer's generator pattern: ``disc.requires_grad_(False)``, g_loss on disc(fake), backward."""
    gen, disc = _tiny_generator(), _tiny_disc()
    disc.requires_grad_(False)
    g_loss(disc(gen(torch.rand(2, 3, 16, 16))), kind).backward()
    disc.requires_grad_(True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_discriminator_step_trains_the_discriminator_and_not_the_generator(kind: str) -> None:
    """The trainer's discriminator pattern: one pass on ``cat([real, fake.detach()])``."""
    gen, disc = _tiny_generator(), _tiny_disc()
    real, fake = torch.rand(2, 3, 16, 16), gen(torch.rand(2, 3, 16, 16))
    real_logits, fake_logits = disc(torch.cat([real, fake.detach()])).chunk(2)
    d_loss(real_logits, fake_logits, kind).backward()
    # every weight gets a gradient (the last bias's can be exactly 0: with all hinges active, the real and
    # fake halves pull it equally in opposite directions)
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad.abs().sum() > 0 for name, p in disc.named_parameters() if name.endswith("weight"))
    assert all(p.grad is None for p in gen.parameters())


# ---- LeCAM --------------------------------------------------------------------------------------


def test_lecam_anchors_follow_the_ema_and_the_penalty_matches_a_hand_computation() -> None:
    lecam = LeCAM(decay=0.9)
    assert lecam.ema_real.item() == 0.0 and lecam.ema_fake.item() == 0.0
    real = torch.tensor([1.0, 3.0])  # mean 2
    fake = torch.tensor([-1.0, -3.0, 0.5, -0.5])  # mean -1
    r = lecam.regularizer(real, fake)
    ema_real, ema_fake = 0.1 * 2.0, 0.1 * -1.0
    assert lecam.ema_real.item() == pytest.approx(ema_real)
    assert lecam.ema_fake.item() == pytest.approx(ema_fake)
    real_term = sum(max(v - ema_fake, 0.0) ** 2 for v in real.tolist()) / 2
    fake_term = sum(max(ema_real - v, 0.0) ** 2 for v in fake.tolist()) / 4
    assert r.item() == pytest.approx(real_term + fake_term)

    lecam.regularizer(torch.tensor([4.0]), torch.tensor([1.0]))
    assert lecam.ema_real.item() == pytest.approx(0.9 * ema_real + 0.1 * 4.0)
    assert lecam.ema_fake.item() == pytest.approx(0.9 * ema_fake + 0.1 * 1.0)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


def test_lecam_relu_zeroes_logits_on_the_right_side_of_the_anchors() -> None:
    lecam = LeCAM(decay=0.5).eval()
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    # real logits below the fake anchor and fake logits above the real anchor cost nothing
    assert lecam.regularizer(torch.tensor([-2.0, -1.0]), torch.tensor([1.0, 5.0])).item() == 0.0


def test_lecam_eval_mode_keeps_anchors_and_gradients_reach_logits_only() -> None:
    lecam = LeCAM(decay=0.9)
    lecam.regularizer(torch.tensor([2.0]), torch.tensor([-2.0]))
    before = lecam.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    lecam.eval()
    real = torch.tensor([1.0, 0.0], requires_grad=True)
    fake = torch.tensor([0.0, -1.0], requires_grad=True)
    lecam.regularizer(real, fake).backward()
    assert all(torch.equal(before[k], v) for k, v in lecam.state_dict().items())
    assert real.grad is not None and fake.grad is not None and real.grad.abs().sum() > 0
    assert not lecam.ema_real.requires_grad and not lecam.ema_fake.requires_grad
    with pytest.raises(ValueError, match="decay"):
        LeCAM(decay=1.0)


def _lecam_rank(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    lecam = LeCAM(decay=0.5)
    real = torch.tensor([1.0, 3.0]) if rank == 0 else torch.tensor([5.0])  # rank means 2 and 5
    fake = torch.tensor([-4.0]) if rank == 0 else torch.tensor([0.0, 2.0])  # rank means -4 and 1
    lecam.regularizer(real, fake)
    torch.save(lecam.state_dict(), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_lecam_anchors_use_the_mean_over_ranks_under_torch_distributed(tmp_path: Path) -> None:
    mp.spawn(_lecam_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state["ema_real"].item() == pytest.approx(0.5 * (2.0 + 5.0) / 2)  # mean of rank means
        assert state["ema_fake"].item() == pytest.approx(0.5 * (-4.0 + 1.0) / 2)


# ---- adaptive weight ------------------------------------------------------------------------------


def _linear_decoder() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    last = nn.Linear(3, 2, bias=False)
    h = torch.randn(5, 3)
    return last, h, torch.randn(5, 2)


def test_adaptive_weight_is_the_hand_computed_gradient_norm_ratio() -> None:
    last, h, target = _linear_decoder()
    c = torch.tensor([0.3, -2.0])
    out = last(h)
    rec = (out - target).square().mean()
    gan = (out * c).sum()
    w = adaptive_weight(rec, gan, last.weight, max_weight=1e4, eps=1e-4)
    # d rec / dW = 2 (out - target)ᵀ h / numel;  d gan / dW = c ⊗ (Σ_rows h)
    grad_rec = 2 * (out - target).detach().T @ h / out.numel()
    grad_gan = torch.outer(c, h.sum(0))
    assert w.item() == pytest.approx((grad_rec.norm() / (grad_gan.norm() + 1e-4)).item(), rel=1e-5)
    assert not w.requires_grad
    assert last.weight.grad is None  # autograd.grad does not accumulate into .grad
    (rec + w * gan).backward()  # the graphs were retained for the trainer's backward
    assert last.weight.grad is not None


def test_adaptive_weight_clamps_at_max_weight() -> None:
    last, h, target = _linear_decoder()
    out = last(h)
    rec = (out - target).square().mean()
    tiny_gan = 1e-9 * out.sum()
    assert adaptive_weight(rec, tiny_gan, last.weight, max_weight=10.0).item() == 10.0
    with pytest.raises(ValueError, match="max_weight"):
        adaptive_weight(rec, tiny_gan, last.weight, max_weight=-1.0)


def test_adaptive_weight_differentiates_through_a_frozen_discriminator() -> None:
    gen, disc = _tiny_generator(), _tiny_disc()
    disc.requires_grad_(False)
    x = torch.rand(2, 3, 16, 16)
    fake = gen(x)
    w = adaptive_weight(l1_loss(fake, x), g_loss(disc(fake)), gen.weight)
    assert math.isfinite(w.item()) and w.item() > 0
    assert all(p.grad is None for p in [*gen.parameters(), *disc.parameters()])


# ---- schedules ------------------------------------------------------------------------------------


def test_gan_ramp_is_zero_before_start_linear_then_one() -> None:
    assert gan_ramp(0, 100, 50) == 0.0
    assert gan_ramp(99, 100, 50) == 0.0
    assert gan_ramp(100, 100, 50) == 0.0
    assert gan_ramp(125, 100, 50) == 0.5
    assert gan_ramp(150, 100, 50) == 1.0
    assert gan_ramp(10_000, 100, 50) == 1.0
    assert [gan_ramp(s, 3, 0) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert adversarial_module.gan_ramp is gan_ramp
    with pytest.raises(ValueError, match="warmup_steps"):
        gan_ramp(0, 0, -1)


def test_entropy_scale_warms_up_then_anneals_to_the_final_scale() -> None:
    values = [entropy_scale(s, 10, 20, 0.1) for s in (0, 5, 10, 20, 30, 1000)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    assert [entropy_scale(s, 4, 0, 0.1) for s in (0, 2, 4, 99)] == [0.0, 0.5, 1.0, 1.0]  # anneal off
    assert entropy_scale(0, 0, 0, 3.0) == 1.0  # everything off: constant 1
    assert entropy_scale(5, 0, 10, 3.0) == pytest.approx(2.0)  # annealing may also go up
    with pytest.raises(ValueError, match="anneal_steps"):
        entropy_scale(0, 0, -5, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    warmup=st.integers(0, 50),
    anneal=st.integers(0, 50),
    final=st.floats(0.0, 4.0),
    step=st.integers(0, 200),
)
def test_entropy_scale_is_bounded_and_moves_by_at_most_one_slope_per_step(
    warmup: int, anneal: int, final: float, step: int
) -> None:
    now, nxt = entropy_scale(step, warmup, anneal, final), entropy_scale(step + 1, warmup, anneal, final)
    assert 0.0 <= now <= max(1.0, final) + 1e-12
    slope = max(1 / warmup if warmup else 0.0, abs(1 - final) / anneal if anneal else 0.0)
    assert abs(nxt - now) <= slope + 1e-9  # no jumps: the schedule is continuous in the step
    if step >= warmup + anneal:
        assert now == pytest.approx(final if anneal else 1.0)


# ---- Gram loss ------------------------------------------------------------------------------------


def test_gram_matrix_matches_a_hand_computation() -> None:
    f = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 3.0, 1.0]]).view(1, 2, 2, 2)  # C = 2, N = 4
    expected = torch.tensor([[1 + 4 + 0 + 1, 0 + 2 + 0 + 1], [3, 0 + 1 + 9 + 1]]) / (2 * 4)
    torch.testing.assert_close(gram_matrix(f)[0], expected.float())
    assert gram_matrix(torch.rand(3, 5, 2, 3, 4)).shape == (3, 5, 5)  # any number of spatial dims
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(torch.rand(2, 4, 3, 3).bfloat16()).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gram_matrix_is_invariant_to_permuting_positions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2, 4, 5, 6, generator=g)
    perm = torch.randperm(30, generator=g)
    shuffled = f.flatten(2)[:, :, perm].view_as(f)
    torch.testing.assert_close(gram_matrix(shuffled), gram_matrix(f), atol=1e-6, rtol=1e-5)


class _TinyFeatures(nn.Module):
    """Two frozen conv stages standing in for a perceptual network."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.scale = scale
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = F.relu(self.a(x))
        return [self.scale * h1, self.scale * F.relu(self.b(h1))]


def test_gram_loss_zero_for_identical_images_positive_otherwise_and_gradient_reaches_only_the_fake() -> None:
    feats = _TinyFeatures()
    loss = GramLoss(feats)
    torch.manual_seed(0)
    target = torch.rand(2, 3, 12, 12, requires_grad=True)
    assert loss(target.detach(), target.detach()).item() == 0.0
    fake = torch.rand(2, 3, 12, 12, requires_grad=True)
    value = loss(fake, target)
    assert value.item() > 0
    value.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert target.grad is None  # the target side runs under no_grad
    assert all(p.grad is None for p in feats.parameters())


def test_gram_loss_is_a_relative_error_per_stage() -> None:
    """Scaling every feature map by k scales each Gram matrix by k²; the per-stage normalisation cancels it."""
    x, y = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    base = GramLoss(_TinyFeatures())(x, y)
    scaled = GramLoss(_TinyFeatures(scale=1e3))(x, y)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
    flat = y.mean(dim=(2, 3), keepdim=True).expand_as(y)
    assert 0 < GramLoss(_TinyFeatures())(flat, y).item() < 10


def test_gram_loss_refuses_trainable_feature_networks_and_mismatched_shapes() -> None:
    trainable = _TinyFeatures().requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad_"):
        GramLoss(trainable)
    with pytest.raises(ValueError, match="requires_grad_"):
        GramLoss(trainable.forward)  # a bound method of a trainable module
    with pytest.raises(ValueError, match="same shape"):
        GramLoss(_TinyFeatures())(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def test_gram_loss_with_st_lpips_alex_features() -> None:
    pytest.importorskip("stlpips_pytorch", reason="ST-LPIPS weights come from the stlpips-pytorch wheel")
    from vtok.losses import STLPIPS

    model = STLPIPS("alex")
    with pytest.raises(ValueError, match=r"GramLoss\(stlpips\)"):
        GramLoss(model.features)  # expects network-range input, not [0, 1] images
    loss = GramLoss(model)
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32)
    assert loss(target, target).item() == 0.0
    fake = F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), 3, 1).requires_grad_(True)
    value = loss(fake, target)
    assert value.item() > 0
    value.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    gray = target[:, :1]
    assert loss(gray, gray).item() == 0.0 and loss(gray.flip(-1).roll(3, -2), gray).item() > 0
