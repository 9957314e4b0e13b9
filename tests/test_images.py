"""Float image tensors in [-1, 1] -> 8-bit PIL images, PNG files and grids (fd_onestep.images)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.images import image_grid, save_images, tensor_to_pil


def reference_uint8(images):
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C): round((x.clamp(-1, 1) + 1) * 127.5)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_images(n, channels, height=5, width=7, seed=0):
    """Uniform in [-1.2, 1.2]: some values saturate."""
    return torch.rand(n, channels, height, width, generator=torch.Generator().manual_seed(seed)) * 2.4 - 1.2


def test_values_are_the_rounded_clamped_levels_on_random_inputs():
    images = random_images(64, 3, 32, 32)
    pixels = np.stack([np.asarray(p) for p in tensor_to_pil(images)])
    assert np.array_equal(pixels, reference_uint8(images))
    assert pixels.min() == 0 and pixels.max() == 255  # out-of-range values saturate


def test_every_uint8_level_and_every_half_way_point_round_as_the_reference():
    levels = torch.arange(256, dtype=torch.float32)
    decoded = (levels / 127.5 - 1).view(1, 1, 1, 256)  # what pil_to_tensor / to_image_tensor make of level k
    assert np.array_equal(np.asarray(tensor_to_pil(decoded, keep_grayscale=True)[0])[0], np.arange(256))
    # the float32 values nearest the rounding boundaries (k + 1/2) / 127.5 - 1 and their neighbours
    halfway = ((torch.arange(255, dtype=torch.float64) + 0.5) / 127.5 - 1).float()
    near = torch.cat([halfway, torch.nextafter(halfway, torch.tensor(2.0)), torch.nextafter(halfway, torch.tensor(-2.0))])
    dense = torch.cat([near, torch.linspace(-1, 1, 100_001)]).view(1, 1, 1, -1)
    assert np.array_equal(np.asarray(tensor_to_pil(dense, keep_grayscale=True)[0]), reference_uint8(dense)[0, ..., 0])


def test_modes_rgb_by_default_gray_as_l_on_request_and_the_first_three_of_more_channels():
    gray, rgb, rgba = random_images(2, 1), random_images(2, 3), random_images(2, 4)
    as_rgb = tensor_to_pil(gray)
    assert [p.mode for p in as_rgb] == ["RGB", "RGB"] and as_rgb[0].size == (7, 5)
    assert np.array_equal(np.stack([np.asarray(p) for p in as_rgb]), np.repeat(reference_uint8(gray), 3, axis=-1))
    as_l = tensor_to_pil(gray, keep_grayscale=True)
    assert [p.mode for p in as_l] == ["L", "L"]
    assert np.array_equal(np.stack([np.asarray(p) for p in as_l]), reference_uint8(gray)[..., 0])
    assert all(p.mode == "RGB" for p in tensor_to_pil(rgb, keep_grayscale=True))
    from_rgba = tensor_to_pil(rgba)
    assert from_rgba[0].mode == "RGB" and np.array_equal(np.asarray(from_rgba[1]), reference_uint8(rgba)[1, ..., :3])
    assert tensor_to_pil(random_images(0, 3)) == []
    # one-row and one-pixel images keep their shape
    for height, width in ((1, 6), (6, 1), (1, 1)):
        for keep_grayscale in (False, True):
            image = tensor_to_pil(random_images(1, 1, height, width), keep_grayscale=keep_grayscale)[0]
            assert image.size == (width, height)


def test_float16_inputs_are_converted_in_float32():
    images = random_images(3, 3).half()
    assert np.array_equal(np.stack([np.asarray(p) for p in tensor_to_pil(images)]), reference_uint8(images))


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_images_writes_numbered_pngs_gray_as_l_rgb_as_rgb(tmp_path, channels, mode):
    images = random_images(3, channels)
    paths = save_images(images, tmp_path / "samples", start_index=998)
    assert [p.name for p in paths] == ["000998.png", "000999.png", "001000.png"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [p.name for p in paths]
    expected = reference_uint8(images)
    for path, pixels in zip(paths, expected):
        with Image.open(path) as image:
            assert image.mode == mode and image.size == (7, 5)
            assert np.array_equal(np.asarray(image), pixels[..., 0] if channels == 1 else pixels)
    assert [p.name for p in save_images(images[:1], tmp_path)] == ["000000.png"]  # start_index defaults to 0


@pytest.mark.parametrize("n,rows,grid_rows,grid_cols", [(5, None, 2, 3), (9, None, 3, 3), (10, None, 3, 4),
                                                        (5, 1, 1, 5), (5, 2, 2, 3), (1, None, 1, 1)])
def test_image_grid_layout_cells_and_black_padding(n, rows, grid_rows, grid_cols):
    images = random_images(n, 1, 4, 6)
    grid = image_grid(images, rows=rows, min_cell=1)  # native size: one image pixel per grid pixel
    assert grid.mode == "RGB" and grid.size == (grid_cols * 6, grid_rows * 4)
    pixels = np.asarray(grid)
    expected = reference_uint8(images)
    for k in range(grid_rows * grid_cols):
        r, c = divmod(k, grid_cols)
        cell = pixels[r * 4:(r + 1) * 4, c * 6:(c + 1) * 6]
        if k < n:
            assert np.array_equal(cell, np.repeat(expected[k], 3, axis=-1))  # gray drawn as RGB gray
        else:
            assert not cell.any()  # black filler
    assert grid_cols == (math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows))


@pytest.mark.parametrize("height,width,min_cell,factor", [(16, 16, 64, 4), (4, 6, 10, 3), (5, 7, 64, 13),
                                                          (100, 80, 64, 1), (16, 16, 1, 1), (16, 16, 17, 2)])
def test_image_grid_enlarges_small_images_by_an_integer_factor_with_nearest_neighbour(height, width, min_cell, factor):
    images = random_images(5, 3, height, width)
    grid = image_grid(images, min_cell=min_cell)  # 2 rows x 3 columns
    cell_h, cell_w = factor * height, factor * width
    assert grid.size == (3 * cell_w, 2 * cell_h)
    assert min(cell_h, cell_w) >= min_cell or factor == 1  # large images are never shrunk
    pixels = np.asarray(grid)
    expected = reference_uint8(images)
    for k in range(6):
        r, c = divmod(k, 3)
        cell = pixels[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
        if k < 5:  # every image pixel is a factor x factor block of its exact value
            assert np.array_equal(cell, expected[k].repeat(factor, axis=0).repeat(factor, axis=1))
        else:
            assert not cell.any()


def test_image_grid_default_draws_16_pixel_samples_in_64_pixel_cells():
    grid = image_grid(random_images(16, 1, 16, 16))
    assert grid.size == (4 * 64, 4 * 64)
