"""Reference statistics (mean and covariance of encoder features) of a real image dataset.

One pass over the images feeds every requested encoder; moments are accumulated in float64
(:class:`~fd_onestep.moments.FeatureMoments`). Sources:

- a 🤗 ``datasets`` dataset: a hub id or a local dataset folder (e.g. an ``imagefolder`` layout),
  ``split``, ``image_column``, optionally ``streaming`` for sets too large to download first;
- a plain folder of image files (read like pytorch-fid: ``PIL.Image.open(f).convert("RGB")``);
- image tensors / uint8 arrays in memory (e.g. an ADM reference batch's ``arr_0``).

With a label column (``compute_class_conditional_stats``; CLI: ``--label_column label``) the same pass also
accumulates per-class moments (:class:`~fd_onestep.conditioning_metrics.ClassConditionalMoments`), saved as
``<encoder>.classes.safetensors`` for per-class FD and the Fréchet Joint Distance.

Unreadable images (truncated or corrupt files, what PIL cannot decode) stop the run with an error
naming the file (folder) or the dataset row, or, with ``skip_unreadable=True`` (CLI:
``--skip_unreadable_images``), are skipped and counted: the count is stored in the statistics'
metadata (``skipped_unreadable_images``).

Under ``accelerate launch`` (or any initialized ``torch.distributed`` process group) each process
reads its own contiguous shard and the moments are summed over processes at the end, so N processes
give the statistics of one process. The shards are the libraries' contiguous split (sizes differ by at
most 1, the larger ones first; the split of accelerate's ``PartialState.split_between_processes``):
``datasets.distributed.split_dataset_by_node`` for datasets, ``numpy.array_split`` /
``torch.tensor_split`` for file lists and in-memory images. The moments live (and are reduced) on the
encoders' device, the process's device under ``accelerate launch`` (NCCL reduces CUDA tensors only).
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from PIL import Image

from .distributed import all_reduce_sum, get_rank, get_world_size
from .encoders import FeatureEncoder, encoder_file_stem, load_encoder
from .images import (
    ImageFileDataset,
    batches_by_size,
    center_crop_resize,
    list_image_files,
    pil_to_rgb,
    pil_to_tensor,
    to_image_tensor,
)

EncodersArg = Union[Mapping[str, FeatureEncoder], Sequence[Union[str, FeatureEncoder]], str, FeatureEncoder]


# --- processes -------------------------------------------------------------------------------------


def process_info() -> Tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` group; (0, 1) when not distributed."""
    return get_rank(), get_world_size()


def library_version() -> str:
    import fd_onestep

    import transformers

    return f"fd_onestep {fd_onestep.__version__}; torch {torch.__version__}; transformers {transformers.__version__}; python {platform.python_version()}"


# --- encoders ------------------------------------------------------------------------------------


def resolve_encoders(encoders: EncodersArg, **load_kwargs) -> Dict[str, FeatureEncoder]:
    """Names / ids / encoder objects -> ``{short name: FeatureEncoder}``.

    Strings are loaded with :func:`~fd_onestep.encoders.load_encoder` (``load_kwargs`` forwarded);
    the short name (used for output file names and result keys) is a file-name-safe form of the
    string, e.g. ``"dinov2"``, ``"inception"``, ``"tiny-dinov2"``.
    """
    if isinstance(encoders, (str, FeatureEncoder)):
        encoders = [encoders]
    if isinstance(encoders, Mapping):
        resolved = dict(encoders)
    else:
        resolved = {}
        for item in encoders:
            if isinstance(item, FeatureEncoder):
                key = item.name
            else:
                key = encoder_file_stem(item)
                item = load_encoder(item, **load_kwargs)
            if key in resolved:
                raise ValueError(f"Encoder {key!r} is listed twice; list each encoder once.")
            resolved[key] = item
    if not resolved:
        raise ValueError("No encoders given; pass at least one, e.g. ['inception', 'dinov2'].")
    for key, encoder in resolved.items():
        if not isinstance(encoder, FeatureEncoder):
            raise TypeError(f"Encoder {key!r} is a {type(encoder).__name__}, expected a FeatureEncoder (see load_encoder).")
    return resolved


# --- image sources -------------------------------------------------------------------------------


def _find_image_column(features, column_names: Sequence[str], image_column: Optional[str], dataset_name: str) -> str:
    if image_column is not None:
        if image_column not in column_names:
            raise ValueError(
                f"Dataset '{dataset_name}' has no column {image_column!r}; its columns are {list(column_names)}. "
                "Pass the right one with image_column= (CLI: --image_column)."
            )
        return image_column
    import datasets

    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
    for name in ("image", "img", "images", "pixel_values"):
        if name in column_names:
            return name
    raise ValueError(
        f"Could not find an image column in dataset '{dataset_name}' (columns: {list(column_names)}). "
        "Pass it with image_column= (CLI: --image_column)."
    )


def open_dataset(
    dataset: str | os.PathLike,
    *,
    split: str = "train",
    streaming: bool = False,
    cache_dir: Optional[str | os.PathLike] = None,
    image_column: Optional[str] = None,
    name: Optional[str] = None,
):
    """Load one split of a 🤗 dataset and find its image column.

    ``dataset``: a hub id (``"cifar10"``, ``"ILSVRC/imagenet-1k"``), a local folder that
    ``datasets.load_dataset`` understands (e.g. an ``imagefolder`` layout: images, optionally in
    ``train/``, ``validation/`` subfolders), or a folder written by ``Dataset.save_to_disk``.

    Returns ``(dataset, image_column)``; raises ``ValueError`` for an unknown split or column and
    ``FileNotFoundError`` when the dataset cannot be found (offline, typo).
    """
    import datasets

    path = Path(dataset).expanduser()
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"Dataset '{dataset}' has no split {split!r}; its splits are {list(loaded)}.")
                loaded = loaded[split]
            if streaming:
                loaded = loaded.to_iterable_dataset()
        else:
            loaded = datasets.load_dataset(
                str(path) if path.exists() else str(dataset),
                name,
                split=split,
                streaming=streaming,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
    except ValueError as err:
        message = str(err)
        if "split" in message.lower() or "Unknown split" in message:
            raise ValueError(
                f"Dataset '{dataset}' has no split {split!r} ({message.splitlines()[0]}). "
                "Pick one of its splits with split= (CLI: --split)."
            ) from None
        raise
    except FileNotFoundError as err:
        if type(err).__name__ == "EmptyDatasetError" or (path.is_dir() and not list_image_files(path)):
            raise ValueError(
                f"The dataset folder '{dataset}' contains no images (no data files): there is nothing to compute "
                "statistics from. Point --dataset at a folder of images (optionally in train/ and validation/ subfolders)."
            ) from None
        raise FileNotFoundError(
            f"Could not load dataset '{dataset}' ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Pass an existing local folder, or a hub id that is in the datasets cache (download it on a "
            "connected machine with `huggingface-cli download --repo-type dataset <id>` or "
            "`datasets.load_dataset(<id>)` and copy $HF_HOME over), or go online."
        ) from None
    except (ConnectionError, OSError) as err:
        raise FileNotFoundError(
            f"Could not load dataset '{dataset}' ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "It is not a local folder and the hub is unreachable (offline?). Download it on a connected "
            "machine (`huggingface-cli download --repo-type dataset <id>`) and copy the HF cache "
            "($HF_HOME) over, or pass a local folder."
        ) from None
    try:
        column = _find_image_column(getattr(loaded, "features", None), loaded.column_names or [], image_column, str(dataset))
    except ValueError:
        if path.is_dir() and image_column is None and not list_image_files(path):
            raise ValueError(
                f"The dataset folder '{dataset}' contains no image files: there is nothing to compute statistics "
                "from. Point --dataset at a folder of images, or name the image column with --image_column."
            ) from None
        raise
    return loaded, column


def _dataset_items_for_process(ds, max_samples: Optional[int], rank: int, world_size: int):
    """Apply ``max_samples`` (globally) and keep this process's contiguous shard.

    Returns ``(shard, index of its first row in the dataset, or None when unknown (streaming))``.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    first_row = 0
    if isinstance(ds, datasets.Dataset):
        if max_samples is not None and max_samples < len(ds):
            ds = ds.select(range(max_samples))
        if len(ds) == 0:
            raise ValueError("The dataset split is empty: there are no images to compute statistics from.")
        # the contiguous shards of split_dataset_by_node: sizes differ by at most 1, larger ones first
        first_row = rank * (len(ds) // world_size) + min(rank, len(ds) % world_size)
    elif max_samples is not None:
        ds = ds.take(max_samples)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        if not isinstance(ds, datasets.Dataset):
            first_row = None
    return ds, first_row


# What PIL (and datasets' Image feature, which opens files with PIL) raise for a file that is not a
# readable image: unidentified or truncated files (OSError), broken chunks (SyntaxError), bad headers
# (ValueError, EOFError), decompression bombs.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _read_or_skip(read, name: str, skip: bool) -> Optional[torch.Tensor]:
    """``read()`` (one image tensor); when it fails: None if ``skip``, else ``ValueError`` naming ``name``."""
    try:
        return read()
    except _UNREADABLE as err:
        if skip:
            return None
        raise ValueError(
            f"Cannot read the image {name} ({type(err).__name__}: {err}). Remove or re-save it, or skip "
            "unreadable images with skip_unreadable=True (CLI: --skip_unreadable_images): they are then "
            "counted in the statistics' metadata (skipped_unreadable_images)."
        ) from err


def _image_to_tensor(image, resolution: Optional[int]) -> torch.Tensor:
    """A dataset row's image (PIL, or an array / tensor stored in the dataset) -> (3, H, W) in [-1, 1]."""
    if not hasattr(image, "convert"):  # arrays / tensors stored in the dataset
        return to_image_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)[0]
    image = center_crop_resize(image, resolution) if resolution is not None else pil_to_rgb(image)
    return pil_to_tensor(image)


def _pil_batch_to_tensors(
    images: Iterable,
    resolution: Optional[int],
    *,
    decode=None,
    names: Optional[Sequence[str]] = None,
    skip_unreadable: bool = False,
    skipped: Optional[List[str]] = None,
    kept: Optional[List[int]] = None,
) -> List[torch.Tensor]:
    """Dataset rows' images -> (3, H, W) tensors; rows that are None are left out (``kept``: the positions of
    the rows that were read are appended to it).

    ``decode``: the dataset's ``datasets.Image.decode_example`` for rows read undecoded
    (``{"bytes", "path"}``), so that a row that cannot be decoded is named (``names[i]``) or, with
    ``skip_unreadable``, skipped and its name appended to ``skipped``.
    """
    import io

    tensors = []
    for i, image in enumerate(images):
        if image is None:
            continue
        name = names[i] if names is not None else f"at position {i} of the batch"

        def read(image=image):
            if decode is not None:
                image = decode(image)
            elif isinstance(image, dict) and ("bytes" in image or "path" in image):
                image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
            return _image_to_tensor(image, resolution)

        tensor = _read_or_skip(read, name, skip_unreadable)
        if tensor is None:
            if skipped is not None:
                skipped.append(name)
        else:
            tensors.append(tensor)
            if kept is not None:
                kept.append(i)
    return tensors


def _labeled_batches_by_size(images: Sequence[torch.Tensor], labels: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(3, H, W) tensors and their labels -> ``[(images (B, 3, H, W), labels int64 (B,))]``, one pair per image
    size (the groups of :func:`~fd_onestep.images.batches_by_size`, in the same order)."""
    groups: dict = {}
    for image, label in zip(images, labels):
        groups.setdefault(tuple(image.shape), []).append(int(label))
    return list(zip(batches_by_size(images), (torch.tensor(g, dtype=torch.int64) for g in groups.values())))


def _row_names(rows: Sequence, start: int, first_row: Optional[int], rank: int) -> List[str]:
    """How an error names the dataset rows ``start ..`` of this process's shard (with their file, if any)."""
    names = []
    for i, row in enumerate(rows):
        if first_row is not None:
            where = f"dataset row {first_row + start + i}"
        else:
            where = f"row {start + i} of process {rank}'s share"
        path = row.get("path") if isinstance(row, dict) else None
        names.append(f"'{path}' ({where})" if path else where)
    return names


def iter_dataset_batches(
    ds,
    image_column: str,
    *,
    batch_size: int = 64,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    skip_unreadable: bool = False,
    skipped: Optional[List[str]] = None,
    label_column: Optional[str] = None,
) -> Tuple[Iterator[torch.Tensor], Optional[int]]:
    """Batches (B, 3, H, W) float32 in [-1, 1] of this process's shard of a 🤗 dataset.

    Returns ``(iterator, number of images in this shard or None when unknown (streaming))``.
    Images of different sizes (when ``resolution`` is None) come in separate, smaller batches.
    An image column is read undecoded and each row decoded by the column's own ``datasets.Image``
    feature, so that a row that cannot be decoded is named (dataset row and file) in the
    ``ValueError``, or, with ``skip_unreadable``, skipped and its name appended to ``skipped``.
    With ``label_column`` (an integer class column) the iterator yields pairs ``(images, labels int64 (B,))``.
    """
    import datasets

    ds, first_row = _dataset_items_for_process(ds, max_samples, rank, world_size)
    ds = ds.select_columns([image_column] + ([label_column] if label_column is not None else []))
    feature = (getattr(ds, "features", None) or {}).get(image_column)
    decode = None
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
        decode = feature.decode_example
    total = len(ds) if hasattr(ds, "__len__") and not _is_iterable_dataset(ds) else None

    def batch(rows, start, labels=None):
        names = _row_names(rows, start, first_row, rank)
        kept = [] if labels is not None else None
        tensors = _pil_batch_to_tensors(
            rows, resolution, decode=decode, names=names, skip_unreadable=skip_unreadable, skipped=skipped, kept=kept)
        if labels is None:
            return batches_by_size(tensors)
        return _labeled_batches_by_size(tensors, [labels[i] for i in kept])

    def generate():
        if total is not None:
            for start in range(0, total, batch_size):
                rows = ds[start : start + batch_size]
                yield from batch(rows[image_column], start, rows[label_column] if label_column is not None else None)
        else:
            buffer, labels, start = [], [], 0
            for row in ds:
                buffer.append(row[image_column])
                labels.append(row[label_column] if label_column is not None else None)
                if len(buffer) == batch_size:
                    yield from batch(buffer, start, labels if label_column is not None else None)
                    buffer, labels, start = [], [], start + batch_size
            if buffer:
                yield from batch(buffer, start, labels if label_column is not None else None)

    return generate(), total


def dataset_num_classes(ds, label_column: str, dataset_name: str = "the dataset") -> Optional[int]:
    """Check that ``label_column`` is a column of ``ds``; its number of classes if it is a ``datasets.ClassLabel``."""
    import datasets

    columns = ds.column_names  # None for some streamed datasets: checked when the rows are read
    if columns is not None and label_column not in columns:
        raise ValueError(
            f"Dataset '{dataset_name}' has no label column {label_column!r}; its columns are {list(columns)}. "
            "Pass the integer class column with label_column= (CLI: --label_column)."
        )
    feature = (getattr(ds, "features", None) or {}).get(label_column)
    return int(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else None


def _is_iterable_dataset(ds) -> bool:
    import datasets

    return isinstance(ds, datasets.IterableDataset)


def iter_folder_batches(
    folder: str | os.PathLike,
    *,
    batch_size: int = 64,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    recursive: bool = True,
    skip_unreadable: bool = False,
    skipped: Optional[List[str]] = None,
) -> Tuple[Iterator[torch.Tensor], int]:
    """Batches (B, 3, H, W) in [-1, 1] of this process's contiguous shard of the sorted image files.

    A file that cannot be read as an image raises ``ValueError`` naming it, or, with
    ``skip_unreadable``, is skipped and its path appended to ``skipped`` (as the batches are read).
    """
    files = list_image_files(folder, recursive=recursive)
    if max_samples is not None:
        files = files[:max_samples]
    if not files:
        raise ValueError(
            f"No images found in '{folder}' (extensions: png, jpg, jpeg, webp, bmp, tif, tiff, ppm, pgm); "
            "there is nothing to compute statistics from."
        )
    files = np.array_split(np.asarray(files, dtype=object), world_size)[rank].tolist()
    dataset = _ReadableImageFiles(files, resolution, skip_unreadable)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_readable
    )

    def generate():
        for groups, unreadable in loader:
            if skipped is not None:
                skipped.extend(unreadable)
            yield from groups

    return generate(), len(files)


class _ReadableImageFiles(ImageFileDataset):
    """:class:`~fd_onestep.images.ImageFileDataset` whose item i is ``(image or None, path)``: an unreadable
    file raises ``ValueError`` naming it, or with ``skip`` gives None (DataLoader workers cannot report
    back otherwise)."""

    def __init__(self, files, resolution, skip: bool):
        super().__init__(files, resolution)
        self.skip = bool(skip)

    def __getitem__(self, index: int):
        path = str(self.files[index])
        return _read_or_skip(lambda: super(_ReadableImageFiles, self).__getitem__(index), f"'{path}'", self.skip), path


def _collate_readable(items) -> Tuple[List[torch.Tensor], List[str]]:
    """``[(image or None, path)]`` -> (batches by size of the images read, paths of those skipped)."""
    read = [image for image, _ in items if image is not None]
    return batches_by_size(read), [path for image, path in items if image is None]


def iter_array_batches(
    images, *, batch_size: int = 64, rank: int = 0, world_size: int = 1, labels=None
) -> Tuple[Iterator[torch.Tensor], int]:
    """Batches in [-1, 1] of this process's shard of in-memory images.

    ``images``: uint8 array (N, H, W, C) (e.g. ADM's ``arr_0``), or a float tensor (N, C, H, W) in [-1, 1].
    ``labels``: optional (N,) integer classes (tensor, array or list); the iterator then yields pairs
    ``(images, labels int64 (B,))``, sharded like the images.
    """
    if len(images) == 0:
        raise ValueError("Got an empty image array: there are no images to compute statistics from.")
    # this process's contiguous shard, as a view (numpy.array_split / torch.tensor_split slice lazily)
    shard = (torch.tensor_split if isinstance(images, torch.Tensor) else np.array_split)(images, world_size)[rank]
    label_shard = None
    if labels is not None:
        from .conditioning_metrics import check_labels

        labels = torch.as_tensor(labels)
        check_labels(labels, None, len(images))
        # torch.tensor_split and numpy.array_split cut at the same places
        label_shard = torch.tensor_split(labels.long(), world_size)[rank]

    def generate():
        for start in range(0, len(shard), batch_size):
            chunk = shard[start : start + batch_size]
            if not (isinstance(chunk, torch.Tensor) and torch.is_floating_point(chunk)):
                chunk = to_image_tensor(np.asarray(chunk) if not isinstance(chunk, torch.Tensor) else chunk)
            yield chunk if label_shard is None else (chunk, label_shard[start : start + batch_size])

    return generate(), len(shard)


# --- accumulation --------------------------------------------------------------------------------


def accumulate_moments(
    batches: Iterable[torch.Tensor],
    encoders: Mapping[str, FeatureEncoder],
    *,
    total: Optional[int] = None,
    show_progress: bool = True,
    description: str = "features",
    all_reduce: bool = True,
    device: Optional[torch.device | str] = None,
    num_classes: Optional[int] = None,
):
    """Feed every batch to every encoder; float64 moments per encoder.

    Args:
        batches: float tensors (B, C, H, W) in [-1, 1]; with ``num_classes``, pairs
            ``(images (B, C, H, W), labels int64 (B,))``.
        encoders: ``{name: FeatureEncoder}``.
        total: number of images (for the progress bar), if known.
        all_reduce: sum the moments over ``torch.distributed`` processes at the end (every process
            must call this function then).
        device: where the moments are accumulated and reduced; default: each encoder's device (the
            process's device under ``accelerate launch``, as NCCL needs).
        num_classes: accumulate per class (labels in ``[0, num_classes)``).
    Returns:
        ``{name: FeatureMoments}`` (global counts after the reduction); with ``num_classes``
        ``{name: ClassConditionalMoments}`` (whose ``marginal()`` is the FeatureMoments).
    """
    from tqdm.auto import tqdm

    from .conditioning_metrics import ClassConditionalMoments
    from .moments import FeatureMoments

    rank, _ = process_info()

    def new_moments(encoder):
        where = encoder.device if device is None else device
        if num_classes is None:
            return FeatureMoments(encoder.feature_dim, device=where)
        return ClassConditionalMoments(encoder.feature_dim, num_classes, device=where)

    moments = {name: new_moments(encoder) for name, encoder in encoders.items()}
    progress = tqdm(total=total, desc=description, unit="img", disable=not show_progress or rank != 0)
    with torch.no_grad():
        for batch in batches:
            images, labels = batch if num_classes is not None else (batch, None)
            for name, encoder in encoders.items():
                features = encoder(images).double()
                if labels is None:
                    moments[name].update(features)
                else:
                    moments[name].update(features, labels)
            progress.update(images.shape[0])
    progress.close()
    if all_reduce:
        for m in moments.values():
            m.all_reduce()
    return moments


def stats_from_moments(
    moments: Mapping[str, "object"],
    encoders: Mapping[str, FeatureEncoder],
    *,
    dataset: str,
    split: str = "",
    resolution: Optional[int] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
):
    """``{name: FeatureMoments}`` -> ``{name: ReferenceStats}`` with the standard metadata."""
    from .reference_stats import ReferenceStats

    stats = {}
    for name, m in moments.items():
        if m.count < 2:
            raise ValueError(
                f"Only {m.count} image(s) were read for '{dataset}'{f' split {split!r}' if split else ''}; "
                "a covariance needs at least 2 (FD needs many more: 10k-50k is standard)."
            )
        encoder = encoders[name]
        image_side = (
            f"RGB; center-crop-resize to {resolution} (ADM: box downsample + bicubic)" if resolution else "RGB; native size"
        )
        metadata = {
            "encoder_id": encoder.encoder_id,
            "encoder_name": name,
            "feature_dim": str(encoder.feature_dim),
            "resolution": str(resolution) if resolution else "native",
            "encoder_input_size": str(encoder.input_size),
            "preprocessing": f"{image_side}; {encoder.describe_preprocessing()}",
            "dataset": str(dataset),
            "split": str(split),
            "num_images": str(m.count),
            "library_version": library_version(),
        }
        if extra_metadata:
            metadata.update({k: str(v) for k, v in extra_metadata.items()})
        stats[name] = ReferenceStats.from_moments(m, **metadata)
    return stats


def _batches_for_source(
    *,
    dataset,
    images_dir,
    images,
    split,
    image_column,
    streaming,
    cache_dir,
    batch_size,
    resolution,
    max_samples,
    num_workers,
    rank,
    world_size,
    skip_unreadable=False,
    skipped=None,
    label_column=None,
    labels=None,
):
    """``(batches, number of images in this shard or None, number of classes of the label column or None)``."""
    given = [x is not None for x in (dataset, images_dir, images)]
    if sum(given) != 1:
        raise ValueError("Pass exactly one image source: dataset= (hub id or dataset folder), images_dir= or images=.")
    unreadable = dict(skip_unreadable=skip_unreadable, skipped=skipped)
    if labels is not None and images is None:
        raise ValueError("labels= go with in-memory images=; a dataset's labels come from its label_column=.")
    if dataset is not None:
        ds, column = open_dataset(dataset, split=split, streaming=streaming, cache_dir=cache_dir, image_column=image_column)
        num_classes = dataset_num_classes(ds, label_column, str(dataset)) if label_column is not None else None
        return (*iter_dataset_batches(
            ds, column, batch_size=batch_size, resolution=resolution, max_samples=max_samples, rank=rank,
            world_size=world_size, label_column=label_column, **unreadable,
        ), num_classes)
    if label_column is not None:
        raise ValueError(
            "a label column needs a dataset= (CLI: --dataset): a plain image folder has no labels. An imagefolder "
            "layout (one subfolder per class) read as a dataset gives them in its 'label' column."
        )
    if images_dir is not None:
        return (*iter_folder_batches(
            images_dir, batch_size=batch_size, resolution=resolution, max_samples=max_samples, rank=rank,
            world_size=world_size, num_workers=num_workers, **unreadable,
        ), None)
    if max_samples is not None:
        images = images[:max_samples]
        labels = labels[:max_samples] if labels is not None else None
    return (*iter_array_batches(images, batch_size=batch_size, rank=rank, world_size=world_size, labels=labels), None)


def compute_class_conditional_stats(
    encoders: EncodersArg,
    dataset: Optional[str | os.PathLike] = None,
    *,
    label_column: str = "label",
    labels=None,
    num_classes: Optional[int] = None,
    alpha: Optional[float] = None,
    **kwargs,
):
    """Marginal and per-class reference statistics of a labeled image set, in the same single pass.

    Args:
        encoders, dataset, **kwargs: those of :func:`compute_reference_stats` (``images_dir`` has no
            labels and is refused; the validation set gives the marginal ``validation_fd`` only).
        label_column: the dataset's integer class column (ImageNet-style ``label``), for ``dataset=``.
        labels: (N,) integer classes of in-memory ``images=`` (instead of a label column).
        num_classes: C; default: the column's ``datasets.ClassLabel`` size, or ``max(labels) + 1``
            for in-memory labels.
        alpha: the label embedding scale of FJD (feature units); default per encoder:
            :func:`~fd_onestep.conditioning_metrics.label_embedding_scale` of the reference.
    Returns:
        ``({name: ReferenceStats}, {name: ClassConditionalStats})``; the marginal statistics are those of
        :func:`compute_reference_stats` (to float64 round-off: they are the sum of the per-class moments).
    """
    class_stats: dict = {}
    stats = compute_reference_stats(encoders, dataset, label_column=None if labels is not None else label_column,
                                    labels=labels, num_classes=num_classes, alpha=alpha, class_stats=class_stats, **kwargs)
    return stats, class_stats


def _num_classes(num_classes: Optional[int], found: Optional[int], labels, label_column: Optional[str]) -> int:
    """The C of class statistics: given, else the label column's ClassLabel size, else max(labels) + 1."""
    if num_classes is not None:
        if found is not None and int(num_classes) != found:
            raise ValueError(f"num_classes={num_classes} but the label column {label_column!r} has {found} classes.")
        return int(num_classes)
    if found is not None:
        return found
    if labels is not None:
        return int(torch.as_tensor(labels).max()) + 1
    raise ValueError(
        f"the label column {label_column!r} is not a datasets.ClassLabel, so its number of classes is unknown; "
        "pass num_classes= (CLI: --num_classes)."
    )


def compute_reference_stats(
    encoders: EncodersArg,
    dataset: Optional[str | os.PathLike] = None,
    *,
    images_dir: Optional[str | os.PathLike] = None,
    images=None,
    split: str = "train",
    image_column: Optional[str] = None,
    streaming: bool = False,
    cache_dir: Optional[str | os.PathLike] = None,
    max_samples: Optional[int] = None,
    batch_size: int = 64,
    resolution: Optional[int] = None,
    validation_split: Optional[str] = None,
    validation_images_dir: Optional[str | os.PathLike] = None,
    num_workers: int = 0,
    show_progress: bool = True,
    source_name: Optional[str] = None,
    skip_unreadable: bool = False,
    label_column: Optional[str] = None,
    labels=None,
    num_classes: Optional[int] = None,
    alpha: Optional[float] = None,
    class_stats: Optional[dict] = None,
    **load_kwargs,
):
    """Reference statistics of a real-image set for one or several encoders, in one pass.

    Args:
        encoders: names/ids (loaded with ``load_encoder(**load_kwargs)``), encoders, or a dict.
        dataset / images_dir / images: the source (exactly one): a 🤗 dataset id or folder, a plain
            folder of image files, or in-memory images (uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]).
        split, image_column, streaming, cache_dir: 🤗 dataset options.
        max_samples: use the first ``max_samples`` images (before sharding over processes).
        batch_size: images per encoder call (per process).
        resolution: center-crop-resize every image to ``resolution`` x ``resolution`` first (the
            generator's output size; ADM's protocol). None keeps native sizes (the encoder resizes).
        validation_split / validation_images_dir: a held-out real set; its FD against the
            reference is stored as ``validation_fd`` (the denominator of FD_r).
        show_progress: tqdm bar on the main process.
        skip_unreadable: skip the images that cannot be decoded (truncated or corrupt files) instead of
            stopping at the first one; their number (over all processes) is stored in the metadata as
            ``skipped_unreadable_images`` (``validation_skipped_unreadable_images``) and a warning names
            them. Without it the first one raises ``ValueError`` naming the file / dataset row.
        label_column / labels / num_classes / alpha / class_stats: per-class statistics in the same pass (see
            :func:`compute_class_conditional_stats`, which returns them): the dict ``class_stats`` receives
            ``{encoder name: ClassConditionalStats}``.
    Returns:
        ``{encoder name: ReferenceStats}``; identical on every process.
    Raises:
        ValueError for an empty source, unknown split/column or an unreadable image, FileNotFoundError
        for a missing source.
    """
    labeled = label_column is not None or labels is not None
    if labeled and images_dir is not None:
        raise ValueError(
            "class statistics need labels: pass dataset= with a label column (an imagefolder layout, one subfolder "
            "per class, has one) or images= with labels=; a plain images_dir has no labels."
        )
    encoders = resolve_encoders(encoders, **load_kwargs)
    rank, world_size = process_info()
    source = dict(
        images=images, streaming=streaming, cache_dir=cache_dir, image_column=image_column, batch_size=batch_size,
        resolution=resolution, max_samples=max_samples, num_workers=num_workers, rank=rank, world_size=world_size,
        skip_unreadable=skip_unreadable,
    )
    skipped: List[str] = []
    batches, total, found_classes = _batches_for_source(
        dataset=dataset, images_dir=images_dir, split=split, skipped=skipped, label_column=label_column, labels=labels,
        **source)
    if labeled:
        num_classes = _num_classes(num_classes, found_classes, labels, label_column)
    moments = accumulate_moments(batches, encoders, total=total, show_progress=show_progress, description="reference",
                                 num_classes=num_classes if labeled else None)
    class_moments = None
    if labeled:
        class_moments, moments = moments, {key: m.marginal() for key, m in moments.items()}
    name = source_name or str(dataset if dataset is not None else images_dir if images_dir is not None else "in-memory images")
    split_name = split if dataset is not None else ""
    extra = {}
    if skip_unreadable:
        extra["skipped_unreadable_images"] = _count_skipped(skipped, encoders, name)
    stats = stats_from_moments(moments, encoders, dataset=name, split=split_name, resolution=resolution,
                               extra_metadata=extra)
    if labeled:
        from .conditioning_metrics import ClassConditionalStats

        label_source = {"label_column": label_column} if label_column is not None else {"label_column": "(labels=)"}
        per_class = {key: ClassConditionalStats.from_moments(m, alpha=alpha, **stats[key].metadata, **label_source)
                     for key, m in class_moments.items()}
        if class_stats is not None:
            class_stats.update(per_class)

    if validation_split is not None or validation_images_dir is not None:
        if validation_split is not None and dataset is None:
            raise ValueError("validation_split needs a dataset=; for image folders pass validation_images_dir=.")
        source["images"] = None
        val_skipped: List[str] = []
        val_batches, val_total, _ = _batches_for_source(
            dataset=dataset if validation_split is not None else None,
            images_dir=validation_images_dir if validation_split is None else None,
            split=validation_split or "",
            skipped=val_skipped,
            **source,
        )
        val_moments = accumulate_moments(val_batches, encoders, total=val_total, show_progress=show_progress, description="validation")
        val_name = str(validation_split or validation_images_dir)
        val_count = _count_skipped(val_skipped, encoders, f"the validation set {val_name}") if skip_unreadable else None
        for key, ref in stats.items():
            m = val_moments[key]
            if m.count < 2:
                raise ValueError(f"The validation set has {m.count} image(s); it needs at least 2 to compute validation_fd.")
            ref.validation_fd = float(ref.frechet_distance(m.mean, m.covariance()))
            ref.metadata["validation_split"] = val_name
            ref.metadata["validation_num_images"] = str(m.count)
            if val_count is not None:
                ref.metadata["validation_skipped_unreadable_images"] = val_count
    return stats


def _count_skipped(skipped: List[str], encoders: Mapping[str, FeatureEncoder], source: str) -> str:
    """Number of unreadable images skipped by all processes (collective), as metadata; warns naming them."""
    device = next(iter(encoders.values())).device  # the process's device: where the moments were reduced
    total = int(all_reduce_sum(torch.tensor([len(skipped)], dtype=torch.int64, device=device)).item())
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {source} on this process: {shown}", stacklevel=3)
    return str(total)


# File name ending of the per-class statistics (ClassConditionalStats) next to an encoder's <name>.safetensors.
CLASS_STATS_SUFFIX = ".classes.safetensors"


def save_reference_stats(stats: Mapping[str, "object"], output_dir: str | os.PathLike,
                         suffix: str = ".safetensors") -> Dict[str, Path]:
    """Write ``{name: ReferenceStats}`` as ``<output_dir>/<name><suffix>`` (main process only).

    Also writes ``{name: ClassConditionalStats}`` (anything with ``save(path)``), with ``suffix=CLASS_STATS_SUFFIX``.
    """
    rank, _ = process_info()
    output_dir = Path(output_dir)
    paths = {name: output_dir / f"{name}{suffix}" for name in stats}
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, ref in stats.items():
            ref.save(paths[name])
    return paths


# --- .npz import / export ----------------------------------------------------------------------


def import_npz_stats(
    path: str | os.PathLike,
    *,
    encoders: Optional[EncodersArg] = None,
    encoder_id: Optional[str] = None,
    batch_size: int = 64,
    show_progress: bool = True,
    **load_kwargs,
):
    """Reference statistics from a ``.npz`` file (read with ``allow_pickle=False``).

    - pytorch-fid stats / ADM precomputed stats (``mu``, ``sigma``): imported as they are, for
      ``encoder_id`` (default: the FID Inception id) -- pass ``encoders=None``.
    - ADM reference batches (``arr_0``: uint8 images (N, H, W, 3)): the images are encoded with
      ``encoders`` (one pass, several encoders).

    Returns ``{name: ReferenceStats}``.
    """
    from .encoders import INCEPTION_ENCODER_ID
    from .reference_stats import ReferenceStats, open_npz

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; pass a pytorch-fid or ADM reference .npz file.")
    with open_npz(path) as data:
        keys = set(data.files)
        if encoders is not None:
            if "arr_0" not in keys:
                raise ValueError(
                    f"'{path}' has no images ('arr_0'; keys: {sorted(keys)}): it holds precomputed statistics only, "
                    "which belong to the encoder that made them. Import them without encoders (and with encoder_id=)."
                )
            images = data["arr_0"]
            if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
                raise ValueError(
                    f"'arr_0' in '{path}' must be uint8 images (N, H, W, 3) (ADM reference batch); got "
                    f"{images.dtype} {images.shape}."
                )
            return compute_reference_stats(
                encoders, images=images, batch_size=batch_size, show_progress=show_progress,
                source_name=f"{path.name} (arr_0)", **load_kwargs,
            )
    if not {"mu", "sigma"} <= keys:
        raise ValueError(
            f"'{path}' has neither 'mu'/'sigma' nor images: keys {sorted(keys)}. Pass a pytorch-fid stats .npz "
            "(mu, sigma) or an ADM reference batch (arr_0 [, mu, sigma])."
        )
    with open_npz(path) as data:  # a file from export-npz keeps its encoder id and name
        exported_name = str(data["name"][()]) if "name" in data.files else None
        exported = "metadata" in data.files
    ref = ReferenceStats.from_npz(path, encoder_id=encoder_id or (None if exported else INCEPTION_ENCODER_ID))
    if ref.encoder_id is None:
        ref.metadata["encoder_id"] = INCEPTION_ENCODER_ID
    return {exported_name or encoder_file_stem(ref.encoder_id.split(":")[0].split("/")[0]): ref}


def exported_encoder_id(path: str | os.PathLike) -> Optional[str]:
    """The encoder id an ``export-npz`` file carries (None for pytorch-fid's and ADM's own files, or no file)."""
    from .reference_stats import open_npz

    if not Path(path).is_file():
        return None
    with open_npz(path) as data:
        if "metadata" not in data.files:
            return None
        return json.loads(str(data["metadata"][()])).get("encoder_id")


def export_npz_stats(stats_path: str | os.PathLike, npz_path: str | os.PathLike) -> Path:
    """Write a saved ReferenceStats as a pytorch-fid-compatible ``.npz`` (keys ``mu``, ``sigma``)."""
    from .reference_stats import ReferenceStats

    ReferenceStats.load(stats_path).to_npz(npz_path, name=Path(stats_path).name.removesuffix(".safetensors"))
    return Path(npz_path)
