import torch
import torch.nn.functional as F

from reconad import losses


def test_global_cosine_is_flattened_per_sample():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = torch.stack([1 - F.cosine_similarity(a[i].reshape(-1), b[i].reshape(-1), dim=0) for i in range(3)])
    torch.testing.assert_close(losses.global_cosine(a, b), expected.mean())


def test_regional_cosine_is_per_pixel_mean():
    torch.manual_seed(1)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    per_pixel = 1 - F.cosine_similarity(a, b, dim=1)
    torch.testing.assert_close(losses.regional_cosine(a, b), per_pixel.mean())
    assert not torch.isclose(losses.regional_cosine(a, b), losses.global_cosine(a, b))


def test_levels_are_summed_not_averaged():
    a = torch.randn(2, 3, 4, 4)
    b = -a  # cosine -1 everywhere → loss 2 per level
    assert losses.summed_over_levels(losses.global_cosine, [(a, b), (a, b), (a, b)]).item() == 6.0


def test_mse_cosine_map():
    a, b = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    a[0, 0], b[0, 1] = 1.0, 1.0  # orthogonal unit vectors: mse = 1, 1 - cos = 1
    assert losses.mse_cosine_map(a, b, weight=0.5).item() == 1.5


def test_mask_gradient_zeroes_masked_pixels_only():
    recon = torch.randn(1, 3, 2, 2, requires_grad=True)
    keep = torch.tensor([[[[True, False], [False, True]]]])
    masked = losses.mask_gradient(recon, keep)
    torch.testing.assert_close(masked, recon)  # value unchanged
    masked.sum().backward()
    assert torch.equal(recon.grad, keep.float().expand(1, 3, 2, 2))


def test_mask_gradient_equals_the_arithmetic_form_bit_for_bit():
    # the former form recon·keep + (recon·(1−keep)).detach(): same loss, same gradients, to the last bit
    g = torch.Generator().manual_seed(3)
    target = torch.randn(4, 16, 8, 8, generator=g)
    base = torch.randn(4, 16, 8, 8, generator=g)
    keep = losses.hard_mining_mask(target, base, alpha=0.3)
    results = []
    for form in (losses.mask_gradient, lambda r, k: r * k.float() + (r * (1 - k.float())).detach()):
        recon = base.clone().requires_grad_(True)
        loss = losses.global_cosine(target, form(recon, keep))
        (grad,) = torch.autograd.grad(loss, recon)
        results.append((loss.detach(), grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_hard_mining_threshold_uses_unbiased_std():
    torch.manual_seed(2)
    t, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    d = 1 - F.cosine_similarity(t, r, dim=1).unsqueeze(1)
    keep = losses.hard_mining_mask(t, r, alpha=0.5)
    assert torch.equal(keep, d >= d.mean() + 0.5 * d.std(unbiased=True))
    assert losses.hard_mining_mask(t, r, alpha=-1e9).all()
