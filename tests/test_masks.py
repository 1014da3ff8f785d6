"""Mask operations on tiny synthetic maps with exact expected arrays."""

from __future__ import annotations

import torch

from grefine_hooks.policy import RefinePolicy
from grefine_hooks.refine.masks import composite, dilate, gaussian_blur, latent_mask, need_map, refine_mask


def test_need_map_is_low_quality_or_misalignment():
    P = torch.tensor([[1.0, 0.2], [0.9, 1.0]])
    A = torch.tensor([[0.0, 0.0], [0.5, 0.9]])
    torch.testing.assert_close(need_map(P, A), torch.tensor([[0.0, 0.8], [0.6, 0.9]]))


def test_dilate_grows_by_the_radius():
    binary = torch.zeros(5, 5)
    binary[2, 2] = 1
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1
    assert torch.equal(dilate(binary, 1), expected)
    assert torch.equal(dilate(binary, 0), binary)


def test_blur_keeps_mass_and_has_finite_support():
    spike = torch.zeros(21, 21)
    spike[10, 10] = 1
    blurred = gaussian_blur(spike, sigma=1.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5
    assert blurred[10, 10] == blurred.max()
    assert blurred[10, 14] == 0 and blurred[0, 0] == 0  # cut at 3 sigma
    assert torch.equal(gaussian_blur(spike, 0), spike)


def test_refine_mask_covers_the_bad_square_and_nothing_far_away():
    P = torch.ones(64, 64)
    P[16:32, 16:32] = 0.0
    mask = refine_mask(P, torch.zeros(64, 64), RefinePolicy(mask_blur=0.02, mask_dilation=0.02, mask_feather=0.02))
    assert mask.binary[18:30, 18:30].all()
    assert mask.binary[40:, :].sum() == 0 and mask.binary[:, 40:].sum() == 0
    assert (mask.soft >= mask.binary).all()
    assert mask.soft[48:, 48:].max() == 0
    assert 0.05 < mask.share < 0.2


def test_alignment_map_alone_makes_a_mask():
    A = torch.zeros(32, 32)
    A[:, 24:] = 1.0
    mask = refine_mask(torch.ones(32, 32), A, RefinePolicy(mask_dilation=0.0))
    assert mask.binary[:, 26:].all() and mask.binary[:, :20].sum() == 0


def test_good_image_gives_an_empty_mask():
    mask = refine_mask(torch.ones(16, 16), torch.zeros(16, 16), RefinePolicy())
    assert mask.share == 0 and mask.soft.max() == 0


def test_latent_mask_rounds_up():
    binary = torch.zeros(8, 8)
    binary[3, 5] = 1
    expected = torch.zeros(4, 4)
    expected[1, 2] = 1
    assert torch.equal(latent_mask(binary, (4, 4)), expected)


def test_composite_is_exact_where_the_weight_is_zero():
    original = torch.rand(3, 4, 4)
    refined = torch.rand(3, 4, 4)
    soft = torch.zeros(4, 4)
    soft[0, 0], soft[1, 1] = 1.0, 0.25
    blended = composite(original, refined, soft)
    assert torch.equal(blended[:, soft == 0], original[:, soft == 0])
    assert torch.equal(blended[:, 0, 0], refined[:, 0, 0])
    torch.testing.assert_close(blended[:, 1, 1], original[:, 1, 1] + 0.25 * (refined[:, 1, 1] - original[:, 1, 1]))
