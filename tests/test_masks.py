"""Mask operations on tiny synthetic maps with exact expected arrays."""

from __future__ import annotations

import torch

from grefine_hooks.policy import RefinePolicy
from grefine_hooks.refine.masks import (
    composite,
    dilate,
    gaussian_blur,
    latent_mask,
    latent_weight,
    need_map,
    refine_mask,
)


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


def test_latent_mask_rounds_up_per_image():
    binary = torch.zeros(2, 8, 8)
    binary[0, 3, 5] = 1
    binary[1, 0, 0] = 1
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, 1, 2] = 1
    expected[1, 0, 0, 0] = 1
    assert torch.equal(latent_mask(binary, (4, 4)), expected)


def test_latent_weight_is_the_mean_of_each_cells_pixels():
    soft = torch.zeros(8, 8)
    soft[0:2, 0:2] = 1.0  # cell (0, 0) wholly inside
    soft[2, 2] = 1.0  # one pixel of cell (1, 1)
    soft[4:6, 6:8] = 0.5
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[1, 1], expected[2, 3] = 1.0, 0.25, 0.5
    assert torch.equal(latent_weight(soft, (4, 4)), expected)


def test_composite_is_exact_where_the_weight_is_zero():
    original = torch.rand(3, 4, 4)
    refined = torch.rand(3, 4, 4)
    soft = torch.zeros(4, 4)
    soft[0, 0], soft[1, 1] = 1.0, 0.25
    blended = composite(original, refined, soft)
    assert torch.equal(blended[:, soft == 0], original[:, soft == 0])
    assert torch.equal(blended[:, 0, 0], refined[:, 0, 0])
    torch.testing.assert_close(blended[:, 1, 1], original[:, 1, 1] + 0.25 * (refined[:, 1, 1] - original[:, 1, 1]))


# --- Each mask setting's effect, with exact expected arrays (issue 18) --------------------------

NO_SHAPING = dict(mask_blur=0.0, mask_dilation=0.0, mask_feather=0.0)


def _square_need(value: float, side: int = 64, box: slice = slice(24, 32)) -> torch.Tensor:
    """A ``P`` map that is 1 everywhere but ``1 - value`` on a square: the need map is ``value`` there."""
    P = torch.ones(side, side)
    P[box, box] = 1.0 - value
    return P


def test_mask_threshold_is_a_strict_cut_of_the_need_map():
    P, A = _square_need(0.5), torch.zeros(64, 64)  # 0.5: exact in float32, so the edge is exact
    expected = torch.zeros(64, 64)
    expected[24:32, 24:32] = 1
    below = refine_mask(P, A, RefinePolicy(mask_threshold=0.49, **NO_SHAPING))
    assert torch.equal(below.binary, expected) and torch.equal(below.soft, expected)
    for threshold in (0.5, 0.51):  # need 0.5 is not above 0.5
        assert refine_mask(P, A, RefinePolicy(mask_threshold=threshold, **NO_SHAPING)).share == 0


def test_need_map_saturates_at_one():
    assert torch.equal(need_map(torch.zeros(2, 2), torch.ones(2, 2)), torch.ones(2, 2))


def test_blur_below_one_pixel_sigma_still_blurs_and_keeps_its_support():
    spike = torch.zeros(21, 21)
    spike[10, 10] = 1
    narrow = gaussian_blur(spike, sigma=0.5)  # radius max(1, int(2.0)) = 2
    assert 0.3 < float(narrow[10, 10]) < 0.7 and narrow[10, 12] > 0 and narrow[10, 13] == 0
    tiny = gaussian_blur(spike, sigma=0.3)  # radius max(1, int(1.4)) = 1: nothing two pixels out
    assert tiny[10, 11] > 0 and tiny[10, 12] == 0 and tiny[12, 10] == 0


def test_blur_replicates_the_edges():
    """A flat map stays flat up to its border: the image's edge is not read as a dark frame."""
    flat = torch.full((16, 16), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, sigma=2.0), flat)


def test_mask_dilation_grows_by_round_of_its_fraction_of_the_shorter_side():
    P = torch.ones(64, 96)
    P[24:32, 24:32] = 0.0
    # 0.0625 * 64 = 4 pixels (the shorter side, not 96): the square grows from 8 to 16 wide.
    mask = refine_mask(P, torch.zeros(64, 96), RefinePolicy(mask_blur=0.0, mask_dilation=0.0625, mask_feather=0.0))
    expected = torch.zeros(64, 96)
    expected[20:36, 20:36] = 1
    assert torch.equal(mask.binary, expected)
    # 0.04 * 64 = 2.56 rounds to 3.
    mask = refine_mask(P, torch.zeros(64, 96), RefinePolicy(mask_blur=0.0, mask_dilation=0.04, mask_feather=0.0))
    expected = torch.zeros(64, 96)
    expected[21:35, 21:35] = 1
    assert torch.equal(mask.binary, expected)


def test_mask_feather_fades_out_over_three_sigma_beyond_the_binary_region():
    """sigma = 0.02 * 64 = 1.28 px, cut at 3 sigma: the soft mask is 1 on the region, falls along
    the 1-D Gaussian tail over the next 4 pixels and is exactly 0 beyond."""
    P = torch.ones(64, 64)
    P[16:48, 16:48] = 0.0
    mask = refine_mask(P, torch.zeros(64, 64), RefinePolicy(mask_blur=0.0, mask_dilation=0.0, mask_feather=0.02))
    assert torch.equal(mask.binary[16:48, 16:48], torch.ones(32, 32)) and mask.binary.sum() == 32 * 32
    assert torch.equal(mask.soft[16:48, 16:48], torch.ones(32, 32))
    sigma, radius = 1.28, 4
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # A pixel d columns right of the region's edge, on its middle row: the kernel's mass at offsets <= -d.
    expected_tail = [float(kernel[: radius + 1 - d].sum()) for d in range(1, radius + 1)]
    row = mask.soft[32, 48 : 48 + radius].double()
    torch.testing.assert_close(row, torch.tensor(expected_tail, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert bool((row[:-1] > row[1:]).all()) and row[-1] > 0
    assert mask.soft[:, 48 + radius :].max() == 0 and mask.soft[: 16 - radius].max() == 0
    unfeathered = refine_mask(P, torch.zeros(64, 64), RefinePolicy(**NO_SHAPING))
    assert torch.equal(unfeathered.soft, unfeathered.binary)


def test_mask_blur_flattens_an_isolated_bad_pixel_away_but_keeps_a_bad_region():
    """Q-Refine's point: a lone patch must not become a mask. sigma = 0.04 * 64 = 2.56 px spreads one
    pixel to a peak of about 1 / (2 pi sigma^2) = 0.024, far below 0.5; a 16 px square keeps its core."""
    P = torch.ones(64, 64)
    P[10, 10] = 0.0
    A = torch.zeros(64, 64)
    sharp = refine_mask(P, A, RefinePolicy(**NO_SHAPING))
    assert sharp.binary.sum() == 1 and sharp.binary[10, 10] == 1
    blurred = refine_mask(P, A, RefinePolicy(mask_blur=0.04, mask_dilation=0.0, mask_feather=0.0))
    assert blurred.share == 0
    P[32:48, 32:48] = 0.0
    region = refine_mask(P, A, RefinePolicy(mask_blur=0.04, mask_dilation=0.0, mask_feather=0.0))
    assert region.binary[10, 10] == 0 and region.binary[36:44, 36:44].all()
    assert region.binary[:30].sum() == 0 and region.binary[:, :30].sum() == 0
