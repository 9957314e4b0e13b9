"""Image loading and conversion helpers.

Everything converges on the library convention: float tensors (N, C, H, W) in [-1, 1], RGB.
Decoding follows pytorch-fid (``PIL.Image.open(path).convert("RGB")`` then ``ToTensor``) so that
statistics of an image folder match pytorch-fid's on the same files.

The way back -- tensors to 8-bit PIL images (:func:`tensor_to_pil`), numbered PNG files (:func:`save_images`)
and grids (:func:`image_grid`) -- goes through diffusers' ``VaeImageProcessor``, as a pipeline's own
``output_type="pil"`` does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

# The extensions pytorch-fid reads from a folder.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> List[Path]:
    """Sorted image files in ``folder`` (recursively by default; pytorch-fid reads only the top level).

    Raises ``FileNotFoundError`` if the folder does not exist.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder '{root}' does not exist or is not a directory; pass a folder of images.")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def common_image_size(files: Sequence[str | os.PathLike]) -> Optional[Tuple[int, int]]:
    """The (width, height) in pixels shared by all ``files``, read from their headers; None for no files.

    ``PIL.Image.open`` is lazy: it parses the header and decodes no pixels, so checking a large folder costs
    a small read per file, before anything is encoded. Raises ``ValueError`` naming the first file and the
    first file of another size (with the fix), or a file PIL cannot identify as an image.
    """
    first = None
    for path in files:
        try:
            with Image.open(path) as image:
                size = image.size
        except OSError as err:  # UnidentifiedImageError, truncated headers
            raise ValueError(f"Cannot read '{path}' as an image ({err}); remove it or save it again, or skip unreadable "
                             "images with skip_unreadable=True (CLI: --skip_unreadable_images).") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise ValueError(
                f"Images of different sizes: '{first[0]}' is {first[1][0]}x{first[1][1]} but '{path}' is "
                f"{size[0]}x{size[1]} (width x height). Generated images are compared at one size: generate them "
                "at one size, or center-crop-resize all of them to N x N with resolution=N (CLI: --resolution N; "
                "use the resolution of the reference statistics)."
            )
    return None if first is None else first[1]


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.

    Grayscale (L, I, I;16, F) is replicated to three channels, palette images are expanded
    (through RGBA when they carry transparency), and alpha (RGBA, LA) is dropped -- what
    ``convert("RGB")`` does, hence what pytorch-fid does.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: scale to 8 bit by the type's range instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and array.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(pil_to_rgb(image), dtype=np.uint8)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)
    return x * 2 - 1


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` and center-crop to a square (ADM's preprocessing).

    Large downscales first halve with a box filter, then resize with bicubic, as the reference
    batches of guided-diffusion (ADM) were made; returns an RGB image (resolution, resolution).
    """
    image = pil_to_rgb(image)
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | os.PathLike, resolution: Optional[int] = None) -> torch.Tensor:
    """Read one image file -> (3, H, W) float32 in [-1, 1] (optionally center-crop-resized)."""
    with Image.open(path) as image:
        image.load()
        if resolution is not None:
            image = center_crop_resize(image, resolution)
        return pil_to_tensor(image)


def to_image_tensor(images, *, value_range: str = "auto") -> torch.Tensor:
    """Convert generator / pipeline outputs to float32 (N, C, H, W) in [-1, 1].

    Accepts a list of PIL images, a numpy array (N, H, W, C) or a tensor (N, C, H, W) (also a
    single image without the batch dimension).

    ``value_range``: ``"-1,1"``, ``"0,1"``, ``"0,255"`` or ``"auto"``: uint8 -> [0, 255];
    float numpy arrays -> [0, 1] (what diffusers' ``output_type="np"`` returns); float tensors ->
    [0, 1] when ``min >= 0`` (``output_type="pt"``) else [-1, 1].
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return torch.stack([pil_to_tensor(im) for im in images])
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (torch.Tensor, np.ndarray)):
        if isinstance(images[0], torch.Tensor):
            images = torch.stack(list(images))
        else:
            images = np.stack(images)
    is_numpy = isinstance(images, np.ndarray)
    if is_numpy:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"Expected a numpy array (N, H, W, C), got shape {images.shape}.")
        integer = np.issubdtype(images.dtype, np.integer)
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        tensor = images if images.ndim == 4 else images.unsqueeze(0)
        integer = not torch.is_floating_point(tensor)
    else:
        raise TypeError(
            f"Cannot convert {type(images).__name__} to images; pass PIL images, a numpy array "
            "(N, H, W, C) or a tensor (N, C, H, W)."
        )
    if value_range == "auto":
        if integer:
            value_range = "0,255"
        elif is_numpy:
            value_range = "0,1"
        else:
            value_range = "0,1" if float(tensor.detach().min()) >= 0 else "-1,1"
    tensor = tensor.float() if integer else tensor.to(torch.float32)
    if value_range == "0,255":
        return tensor / 127.5 - 1
    if value_range == "0,1":
        return tensor * 2 - 1
    if value_range == "-1,1":
        return tensor
    raise ValueError(f"Unknown value_range {value_range!r}; use 'auto', '-1,1', '0,1' or '0,255'.")


def tensor_to_pil(images: torch.Tensor, *, keep_grayscale: bool = False) -> List[Image.Image]:
    """(N, C, H, W) float in [-1, 1] -> N PIL images, 8 bit.

    The conversion is diffusers' ``VaeImageProcessor.postprocess(images, output_type="pil")``:
    ``round(((x / 2 + 0.5).clamp(0, 1)) * 255)`` in float32, the same uint8 as
    ``round((x.clamp(-1, 1) + 1) * 127.5)`` (halving and adding 1/2 is exact in float, so both round the same
    real number). Inputs are cast to float32 first; values outside [-1, 1] saturate.

    Args:
        images: (N, C, H, W); C = 1 (grayscale) or 3 (RGB); more channels: the first three are kept.
        keep_grayscale: 1-channel images become mode "L" when True, else RGB (the gray value in all three
            channels, what PIL's ``convert("RGB")`` of the "L" image gives).
    Returns:
        N images, mode "RGB" (or "L" for 1-channel images with ``keep_grayscale``), size (W, H).
    """
    from diffusers.image_processor import VaeImageProcessor

    x = images.detach().float()[:, :3]
    gray = x.shape[1] == 1
    if gray:
        # numpy_to_pil's own grayscale branch squeezes away a height of 1 (a 1-row image would come out as a
        # column); RGB gray -> "L" is exact instead (PIL's luma weights sum to one in its integer arithmetic)
        x = x.expand(-1, 3, -1, -1)
    pils = VaeImageProcessor(do_normalize=True).postprocess(x, output_type="pil")
    return [p.convert("L") for p in pils] if gray and keep_grayscale else pils


def save_images(images: torch.Tensor, folder: str | os.PathLike, start_index: int = 0,
                labels: Optional[torch.Tensor] = None) -> List[Path]:
    """Write (N, C, H, W) images in [-1, 1] as ``folder/{start_index + i:06d}.png`` (e.g. ``000123.png``).

    ``labels``: (N,) int64 classes the images were generated for: image i then goes to
    ``folder/<labels[i]>/{start_index + i:06d}.png`` (one folder per requested class; names stay the global
    sample index, so processes writing their shares never collide).
    1-channel images are saved as mode "L", RGB ones as RGB (pixels as in :func:`tensor_to_pil`). Folders
    are created if missing. Returns the written paths, in order.
    """
    folder = Path(folder)
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(f"{len(labels)} labels for {images.shape[0]} images; pass one label per image.")
    names = [str(int(c)) for c in labels.tolist()] if labels is not None else None
    paths, made = [], set()
    for i, image in enumerate(tensor_to_pil(images, keep_grayscale=True)):
        target = folder / names[i] if names is not None else folder
        if target not in made:
            target.mkdir(parents=True, exist_ok=True)
            made.add(target)
        paths.append(target / f"{start_index + i:06d}.png")
        image.save(paths[-1])
    return paths


def image_grid(images: torch.Tensor, rows: Optional[int] = None, min_cell: int = 64) -> Image.Image:
    """(N, C, H, W) images in [-1, 1] -> one RGB grid image (``diffusers.utils.make_image_grid``).

    ``ceil(sqrt(N))`` columns by default, or ``ceil(N / rows)`` columns when ``rows`` is given; the rows are
    then ``ceil(N / columns)`` and the cells after the N-th are black. Grayscale images are drawn as RGB gray.

    ``min_cell``: smallest cell side in pixels. Images whose shorter side is below it are enlarged by the
    integer factor ``ceil(min_cell / min(H, W))`` with nearest-neighbour (every pixel becomes a factor x factor
    block, values unchanged), so that 16-pixel samples stay legible; larger images keep their size (never
    shrunk). ``min_cell=1`` draws every image at its native size. Cells are ``(factor * H, factor * W)``.
    """
    from diffusers.utils import make_image_grid

    n = images.shape[0]
    cols = math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows)
    rows = math.ceil(n / cols)
    tiles = tensor_to_pil(images)
    factor = max(1, math.ceil(min_cell / min(images.shape[-2:])))
    if factor > 1:
        # an integer factor with NEAREST replicates pixels exactly (no interpolated values in the grid)
        tiles = [t.resize((t.width * factor, t.height * factor), resample=Image.NEAREST) for t in tiles]
    tiles += [Image.new("RGB", tiles[0].size) for _ in range(rows * cols - n)]
    return make_image_grid(tiles, rows=rows, cols=cols)


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over image files: item i -> (3, H, W) float32 in [-1, 1]."""

    def __init__(self, files: Sequence[str | os.PathLike], resolution: Optional[int] = None):
        self.files = list(files)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.resolution)


def batches_by_size(images: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Stack (C, H, W) tensors into batches of equal size (images of different sizes cannot stack)."""
    groups: dict = {}
    for image in images:
        groups.setdefault(tuple(image.shape), []).append(image)
    return [torch.stack(group) for group in groups.values()]
