"""Image intake: every accepted form becomes the same RGB tensor; broken ones raise by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_hooks.scoring.images import as_image_list, to_rgb_tensor

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
EXPECTED = torch.from_numpy(RGB8.astype(np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(RGB8),
        RGB8,
        RGB8.astype(np.float32) / 255,
        torch.from_numpy(RGB8).permute(2, 0, 1),
        torch.from_numpy(RGB8.astype(np.float32) / 255).permute(2, 0, 1),
        np.concatenate([RGB8, np.full((5, 7, 1), 7, np.uint8)], axis=-1),  # RGBA array
        Image.fromarray(np.concatenate([RGB8, np.full((5, 7, 1), 7, np.uint8)], axis=-1), mode="RGBA"),
    ],
    ids=["pil", "uint8", "float", "chw-uint8", "chw-float", "rgba-array", "rgba-pil"],
)
def test_equivalent_forms_agree(image):
    torch.testing.assert_close(to_rgb_tensor(image), EXPECTED)


def test_grayscale_repeats_to_rgb():
    gray = RNG.integers(0, 256, size=(4, 6), dtype=np.uint8)
    result = to_rgb_tensor(Image.fromarray(gray, mode="L"))
    assert result.shape == (3, 4, 6)
    assert torch.equal(result[0], result[2])
    torch.testing.assert_close(result[1], torch.from_numpy(gray / 255).float())


def test_sixteen_bit_uses_the_full_range():
    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    from_pil = to_rgb_tensor(Image.fromarray(deep))
    from_array = to_rgb_tensor(deep)
    assert from_pil[0, 0, 1] == pytest.approx(1.0) and from_pil[0, 1, 0] == pytest.approx(0.5, abs=1e-4)
    torch.testing.assert_close(from_pil, from_array)


def test_one_pixel_image_is_accepted():
    assert to_rgb_tensor(Image.new("RGB", (1, 1), (255, 0, 0))).shape == (3, 1, 1)


@pytest.mark.parametrize(
    "image, message",
    [
        (Image.new("RGB", (0, 4)), "zero size"),
        (np.zeros((0, 3, 3), np.uint8), "zero size"),
        (torch.full((3, 4, 4), float("nan")), "NaN"),
        (np.full((4, 4, 3), np.inf, np.float32), "NaN"),
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
        (-torch.ones(3, 4, 4), r"\[0, 1\]"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (torch.zeros(2, 3, 4, 4, 4), "tensor"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
    ],
)
def test_broken_images_raise_naming_the_argument(image, message):
    with pytest.raises(ValueError, match=message) as error:
        to_rgb_tensor(image, name="images[3]")
    assert "images[3]" in str(error.value)


def test_non_image_type_raises_type_error():
    with pytest.raises(TypeError, match="image"):
        to_rgb_tensor("cat.png")


def test_batches_split_into_images():
    assert len(as_image_list(np.zeros((2, 4, 4, 3), np.uint8))) == 2
    assert len(as_image_list(torch.zeros(3, 3, 4, 4))) == 3
    single = Image.new("RGB", (2, 2))
    assert as_image_list(single)[0] is single
