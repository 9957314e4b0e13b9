"""FD in several representations, FD_r and FD_r^k.

Definitions (per representation X, i.e. encoder + its reference statistics):

- ``FD_X``: Fréchet distance between the generated feature distribution (mean and unbiased
  covariance of N generated images, float64) and the reference statistics.
- ``FDr_X = FD_X / FD_X(validation)``: FD relative to the FD that a held-out *real* validation set
  reaches against the same reference (``ReferenceStats.validation_fd``, stored by
  ``fd-onestep stats --validation_split``). FDr = 1 means "as close to the reference as real
  held-out images"; it makes FDs of different representations comparable (raw FDs have
  representation-specific scales).
- ``FD_r^k``: the k-representation summary, the arithmetic mean of FDr_X over the k
  representations that have a validation FD. A generator can game one representation (e.g. match
  Inception's ImageNet class histogram); it cannot easily game several at once. Each FDr_X is
  reported too. Compare FD_r^k only between runs with the same set of representations and the
  same number of generated samples (FD is biased upwards for small N).

Class-conditional generators (labels requested per sample) can also be measured for whether they follow
their labels: adherence (a classifier), per-class FD and the Fréchet Joint Distance against per-class
reference statistics (:mod:`fd_onestep.conditioning_metrics`; ``EvaluationResult.conditioning``).

The core, :func:`evaluate_images`, works on in-memory tensors (validation during training,
comparing generators); :func:`evaluate_pipeline` and :func:`evaluate_folder` feed it from a diffusers
pipeline / callable or an image folder.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from .encoders import FeatureEncoder
from .images import to_image_tensor


@dataclass
class RepresentationResult:
    """FD of the generated images in one representation."""

    encoder: str
    encoder_id: str
    fd: float
    validation_fd: Optional[float]
    fd_r: Optional[float]
    num_samples: int
    reference_num_samples: int
    reference_dataset: str = ""


@dataclass
class ConditionalRepresentationResult:
    """Per-class FD and FJD of the generated images in one representation (squared feature units).

    Attributes:
        per_class_fd: mean over ``classes`` of ``class_fd``.
        fjd: Fréchet Joint Distance of ``[feature, alpha * one_hot(label)]``.
        alpha: the label embedding scale of the reference statistics (feature units).
        classes / class_fd: the classes with generated samples and the FD of each to the reference of its class.
    """

    encoder: str
    per_class_fd: float
    fjd: float
    alpha: float
    classes: List[int]
    class_fd: List[float]


@dataclass
class ConditioningResult:
    """Does the generator follow its class labels? (see :mod:`fd_onestep.conditioning_metrics`)

    Attributes:
        num_classes: C of the class statistics (None with a classifier only).
        adherence: share of samples the classifier assigns to their requested class (None without classifier).
        classifier: what classified them (a name or path), or None.
        representations: ``{encoder name: ConditionalRepresentationResult}`` for the encoders with class statistics.
    """

    num_classes: Optional[int]
    adherence: Optional[float]
    classifier: Optional[str]
    representations: Dict[str, ConditionalRepresentationResult] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ConditioningResult":
        reps = {name: ConditionalRepresentationResult(**r) for name, r in data.get("representations", {}).items()}
        return cls(data.get("num_classes"), data.get("adherence"), data.get("classifier"), reps)


@dataclass
class CLIPScoreResult:
    """CLIP score of the generated images with their prompts (:mod:`fd_onestep.clip_score`).

    Attributes:
        model: the CLIP / SigLIP model (local folder or Hub id) that scored them.
        score: mean over pairs of max(100 * cos(image, prompt embeddings), 0), in [0, 100].
        num_samples: the (image, prompt) pairs scored.
    """

    model: str
    score: float
    num_samples: int
    definition: str = ""


@dataclass
class EvaluationResult:
    """All representations of one evaluation.

    Attributes:
        representations: ``{encoder name: RepresentationResult}``.
        num_samples: number of generated images evaluated.
        fd_r_k: mean FDr over the representations with a validation FD (None if none has one).
        k: number of representations in ``fd_r_k``.
        metadata: free-form strings (source, seed, ...).
        conditioning: adherence, per-class FD and FJD of a class-conditional evaluation (None otherwise;
            then the JSON and the table are those of an unconditional evaluation).
        clip_score: CLIP score of a prompted evaluation with a CLIP model (None otherwise).
    """

    representations: Dict[str, RepresentationResult]
    num_samples: int
    fd_r_k: Optional[float]
    k: int
    metadata: Dict[str, str] = field(default_factory=dict)
    conditioning: Optional[ConditioningResult] = None
    clip_score: Optional[CLIPScoreResult] = None

    def fd(self) -> Dict[str, float]:
        return {name: r.fd for name, r in self.representations.items()}

    def to_dict(self) -> dict:
        data = {
            "num_samples": self.num_samples,
            "fd_r_k": self.fd_r_k,
            "k": self.k,
            "fd_r_k_definition": "mean over the k representations of FD / validation FD",
            "representations": {name: asdict(r) for name, r in self.representations.items()},
            "metadata": dict(self.metadata),
        }
        if self.conditioning is not None:
            data["conditioning"] = asdict(self.conditioning)
        if self.clip_score is not None:
            data["clip_score"] = asdict(self.clip_score)
        return data

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationResult":
        reps = {name: RepresentationResult(**r) for name, r in data["representations"].items()}
        conditioning = ConditioningResult.from_dict(data["conditioning"]) if data.get("conditioning") else None
        clip = CLIPScoreResult(**data["clip_score"]) if data.get("clip_score") else None
        return cls(reps, int(data["num_samples"]), data.get("fd_r_k"), int(data.get("k", 0)), dict(data.get("metadata", {})),
                   conditioning, clip)

    def to_markdown(self) -> str:
        """A markdown table: one row per representation, then the FD_r^k summary.

        A class-conditional evaluation adds the columns per-class FD and FJD and, with a classifier, an
        adherence line under the table.
        """

        def fmt(x):
            return "-" if x is None else f"{x:.4f}"

        cond = self.conditioning
        if cond is None:
            lines = [
                "| representation | encoder id | FD | validation FD | FDr | N |",
                "|---|---|---:|---:|---:|---:|",
            ]
        else:
            lines = [
                "| representation | encoder id | FD | validation FD | FDr | per-class FD | FJD | N |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
        for name, r in self.representations.items():
            extra = ""
            if cond is not None:
                c = cond.representations.get(name)
                extra = f" {fmt(c.per_class_fd if c else None)} | {fmt(c.fjd if c else None)} |"
            lines.append(f"| {name} | `{r.encoder_id}` | {fmt(r.fd)} | {fmt(r.validation_fd)} | {fmt(r.fd_r)} |{extra} {r.num_samples} |")
        if self.fd_r_k is not None:
            blanks = " | |" if cond is not None else ""
            lines.append(f"| **FD_r^{self.k}** (mean FDr) | | | | **{fmt(self.fd_r_k)}** |{blanks} |")
        if cond is not None and cond.adherence is not None:
            lines.append("")
            lines.append(f"adherence (classifier `{cond.classifier}`): {fmt(cond.adherence)} of {self.num_samples} samples "
                         "assigned to their requested class")
        if self.clip_score is not None:
            lines.append("")
            lines.append(f"CLIP score (`{self.clip_score.model}`): {fmt(self.clip_score.score)} over "
                         f"{self.clip_score.num_samples} (image, prompt) pairs")
        return "\n".join(lines)


def _check_references(encoders: Mapping[str, FeatureEncoder], references: Mapping[str, "object"]) -> None:
    missing = [name for name in encoders if name not in references]
    if missing:
        raise ValueError(
            f"No reference statistics for encoder(s) {missing}; references are given for {sorted(references)}. "
            "Pass one ReferenceStats per encoder, under the same name."
        )
    for name, encoder in encoders.items():
        references[name].check_compatible(encoder.encoder_id, encoder.feature_dim)


def _iter_batches(images_or_batches, batch_size: Optional[int]) -> Iterator[torch.Tensor]:
    if isinstance(images_or_batches, torch.Tensor):
        step = batch_size or images_or_batches.shape[0]
        for start in range(0, images_or_batches.shape[0], step):
            yield images_or_batches[start : start + step]
        return
    for batch in images_or_batches:
        yield batch if isinstance(batch, torch.Tensor) and torch.is_floating_point(batch) else to_image_tensor(batch)


def results_from_moments(
    moments: Mapping[str, "object"],
    encoders: Mapping[str, FeatureEncoder],
    references: Mapping[str, "object"],
    metadata: Optional[Mapping[str, str]] = None,
) -> EvaluationResult:
    """``{name: FeatureMoments}`` of generated features -> :class:`EvaluationResult`."""
    reps = {}
    for name, m in moments.items():
        if m.count < 2:
            raise ValueError(f"{m.count} generated image(s) evaluated; FD needs at least 2 (10k-50k is standard).")
        ref = references[name]
        fd = float(ref.frechet_distance(m.mean, m.covariance()))
        if m.count <= ref.feature_dim:
            logging.getLogger(__name__).warning(
                f"{name}: FD of {m.count} images in {ref.feature_dim} dimensions: with N <= d the generated "
                f"covariance has rank at most {m.count - 1} < {ref.feature_dim}, so this FD is dominated by "
                "small-sample bias (it falls as N grows); compare only FDs of the same N, and use N well above d "
                "(10k-50k images is standard).")
        val = ref.validation_fd
        reps[name] = RepresentationResult(
            encoder=name,
            encoder_id=encoders[name].encoder_id,
            fd=fd,
            validation_fd=None if val is None else float(val),
            fd_r=None if not val else fd / float(val),
            num_samples=int(m.count),
            reference_num_samples=int(ref.num_samples),
            reference_dataset=str(ref.metadata.get("dataset", "")),
        )
    ratios = [r.fd_r for r in reps.values() if r.fd_r is not None]
    fd_r_k = float(sum(ratios) / len(ratios)) if ratios else None
    n = next(iter(reps.values())).num_samples if reps else 0
    return EvaluationResult(reps, n, fd_r_k, len(ratios), dict(metadata or {}))


def evaluate_images(
    images_or_batches: Union[torch.Tensor, Iterable],
    encoders: Mapping[str, FeatureEncoder],
    references: Mapping[str, "object"],
    *,
    batch_size: Optional[int] = None,
    all_reduce: bool = False,
    show_progress: bool = False,
    total: Optional[int] = None,
    metadata: Optional[Mapping[str, str]] = None,
    labels: Optional[torch.Tensor] = None,
    class_references: Optional[Mapping[str, "object"]] = None,
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    classifier_name: Optional[str] = None,
) -> EvaluationResult:
    """FD / FDr / FD_r^k of images against reference statistics, in every representation.

    Args:
        images_or_batches: a float tensor (N, C, H, W) in [-1, 1], or an iterable of such batches
            (or of PIL lists / numpy batches, converted with ``to_image_tensor``). Class-conditional
            (``class_references`` or ``classifier`` given): the tensor with ``labels``, or an iterable of
            pairs ``(images, requested labels int64 (B,))``.
        encoders: ``{name: FeatureEncoder}``.
        references: ``{name: ReferenceStats}`` with the same names; each is checked against its
            encoder (``check_compatible``) before any image is encoded.
        batch_size: split a tensor input into batches of this size (memory).
        all_reduce: sum the moments over ``torch.distributed`` processes (each process passes its
            own share of the images and every process must call this).
        labels: (N,) int64 classes the images were generated for (tensor input).
        class_references: ``{name: ClassConditionalStats}`` for some of the encoders: per-class FD and FJD.
        classifier: ``images (B, C, H, W) in [-1, 1] -> predicted classes int64 (B,)``: adherence
            (:func:`image_classifier` builds one); ``classifier_name`` is reported with it.
    Returns:
        :class:`EvaluationResult` (identical on every process when ``all_reduce``); ``conditioning`` is
        set when ``class_references`` or ``classifier`` is given.
    """
    from .dataset_stats import accumulate_moments

    _check_references(encoders, references)
    if not class_references and classifier is None:
        moments = accumulate_moments(
            _iter_batches(images_or_batches, batch_size), encoders, total=total, show_progress=show_progress,
            description="evaluate", all_reduce=all_reduce,
        )
        return results_from_moments(moments, encoders, references, metadata)
    return _evaluate_conditional(
        _iter_labeled_batches(images_or_batches, labels, batch_size), encoders, references, class_references or {},
        classifier, classifier_name, all_reduce=all_reduce, show_progress=show_progress, total=total, metadata=metadata,
    )


def _iter_labeled_batches(images_or_batches, labels, batch_size: Optional[int]) -> Iterator[tuple]:
    """(images (B, C, H, W) in [-1, 1], labels int64 (B,)) pairs from a labeled tensor or an iterable of pairs."""
    if isinstance(images_or_batches, torch.Tensor):
        if labels is None:
            raise ValueError("class-conditional evaluation of an image tensor needs labels= (the class of each image).")
        labels = torch.as_tensor(labels)
        if labels.shape[:1] != images_or_batches.shape[:1]:
            raise ValueError(f"labels has {labels.shape[0] if labels.ndim else 0} entries for {images_or_batches.shape[0]} images.")
        step = batch_size or images_or_batches.shape[0]
        for start in range(0, images_or_batches.shape[0], step):
            yield images_or_batches[start : start + step], labels[start : start + step]
        return
    if labels is not None:
        raise ValueError("labels= goes with an image tensor; an iterable yields (images, labels) pairs itself.")
    for batch in images_or_batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("class-conditional evaluation needs (images, labels) pairs from the iterable.")
        images, batch_labels = batch
        yield next(_iter_batches([images], None)), torch.as_tensor(batch_labels)


def _evaluate_conditional(batches, encoders, references, class_references, classifier, classifier_name, *,
                          all_reduce, show_progress, total, metadata) -> EvaluationResult:
    """FD per representation plus adherence, per-class FD and FJD, in one pass over labeled batches."""
    from .conditioning_metrics import AdherenceCounter, frechet_joint_distance, per_class_frechet_distances
    from .dataset_stats import accumulate_moments

    unknown = sorted(set(class_references) - set(encoders))
    if unknown:
        raise ValueError(f"class statistics for {unknown}, which are not among the encoders {sorted(encoders)}.")
    for name, ref in class_references.items():
        ref.check_compatible(encoders[name].encoder_id, encoders[name].feature_dim)
    sizes = {ref.num_classes for ref in class_references.values()}
    if len(sizes) > 1:
        raise ValueError(f"the class statistics have different numbers of classes {sorted(sizes)}; use one labeled set.")
    num_classes = sizes.pop() if sizes else None
    counter = AdherenceCounter() if classifier is not None else None

    def classified(pairs):
        for images, labels in pairs:
            if counter is not None:
                counter.update(classifier(images), labels)
            yield (images, labels) if num_classes is not None else images

    moments = accumulate_moments(classified(batches), encoders, total=total, show_progress=show_progress,
                                 description="evaluate", all_reduce=all_reduce, num_classes=num_classes)
    marginal = moments if num_classes is None else {name: m.marginal() for name, m in moments.items()}
    result = results_from_moments(marginal, encoders, references, metadata)
    reps = {}
    for name, ref in class_references.items():
        distances = per_class_frechet_distances(moments[name], ref)
        reps[name] = ConditionalRepresentationResult(
            encoder=name, per_class_fd=float(sum(distances.values()) / len(distances)),
            fjd=frechet_joint_distance(moments[name], ref), alpha=ref.alpha,
            classes=list(distances), class_fd=list(distances.values()),
        )
    adherence = None
    if counter is not None:
        if all_reduce:
            counter.all_reduce(next(iter(encoders.values())).device)
        adherence = counter.compute()
    result.conditioning = ConditioningResult(num_classes, adherence, classifier_name if classifier is not None else None, reps)
    return result


# --- generation --------------------------------------------------------------------------------


def _pipeline_output_images(output) -> torch.Tensor:
    images = getattr(output, "images", output)
    if isinstance(output, tuple):
        images = output[0]
    return to_image_tensor(images)


def generate_batches(
    generator: Callable,
    num_samples: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
    class_labels: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    prompts: Optional[Sequence[str]] = None,
    prompt_labels: Optional[Sequence[int]] = None,
    pipeline_kwargs: Optional[dict] = None,
    rank: int = 0,
    world_size: int = 1,
    return_labels: bool = False,
) -> Iterator[torch.Tensor]:
    """Generate this process's share of ``num_samples`` images as (B, C, H, W) batches in [-1, 1].

    ``return_labels``: yield pairs ``(images, requested class labels int64 (B,))`` instead (needs
    ``class_labels`` or ``num_classes`` and a pipeline that takes ``class_labels``, or ``prompts`` with
    ``prompt_labels``, the class each prompt names).

    ``generator`` is a diffusers pipeline (called as ``pipe(batch_size=b, generator=g,
    output_type="pt", [class_labels=...], [prompt=...])``; outputs in [0, 1] (pt), numpy or PIL are
    converted) or any callable ``n -> images``.

    Sample i uses a ``torch.Generator`` seeded with ``seed + batch index`` and, when conditioning is
    needed, label ``class_labels[i % len]`` (or ``i % num_classes``, balanced) / prompt ``prompts[i % len]``,
    so results do not depend on the number of processes' split beyond batch boundaries.
    """
    from diffusers import DiffusionPipeline

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to compute a covariance, got {num_samples}.")
    is_pipeline = isinstance(generator, DiffusionPipeline)
    if not is_pipeline and not callable(generator):
        raise TypeError(f"Expected a diffusers pipeline or a callable n -> images, got {type(generator).__name__}.")
    params = inspect.signature(generator.__call__).parameters if is_pipeline else {}
    if class_labels is None and num_classes is not None:
        class_labels = list(range(num_classes))
    if prompt_labels is not None and (prompts is None or len(prompt_labels) != len(prompts)):
        raise ValueError("prompt_labels names the class of each prompt: pass one label per prompt, with prompts.")
    if return_labels and ((class_labels is None and prompt_labels is None) or not is_pipeline):
        raise ValueError(
            "class-conditional evaluation needs a diffusers pipeline that takes class_labels and the labels to "
            "request: class_labels= or num_classes= (CLI: --class_labels or --num_classes)."
        )
    device = getattr(generator, "device", torch.device("cpu")) if is_pipeline else torch.device("cpu")

    for b, start, n in _process_batches(num_samples, batch_size, rank, world_size):
        if not is_pipeline:
            out = generator(n)
            images = out if isinstance(out, torch.Tensor) else _pipeline_output_images(out)
            yield images
            continue
        kwargs = dict(pipeline_kwargs or {})
        kwargs["generator"] = torch.Generator(device=device if device.type != "mps" else "cpu").manual_seed(seed + b)
        if "output_type" in params:
            kwargs["output_type"] = "pt"
        if class_labels is not None:
            if "class_labels" not in params:
                raise ValueError(f"{type(generator).__name__} takes no class_labels; drop --class_labels/--num_classes.")
            # one label per image sets the batch (FDOneStepPipeline refuses a batch_size next to class labels)
            kwargs["class_labels"] = [int(class_labels[(start + i) % len(class_labels)]) for i in range(n)]
        elif prompts is not None:
            prompt_key = "prompt" if "prompt" in params else None
            if prompt_key is None:
                raise ValueError(f"{type(generator).__name__} takes no prompt; drop --prompts.")
            kwargs[prompt_key] = _cycled(prompts, start, n)
        else:
            if "batch_size" in params:
                kwargs["batch_size"] = n
            elif "num_images_per_prompt" in params:
                kwargs["num_images_per_prompt"] = n
        with torch.no_grad():
            images = _pipeline_output_images(generator(**kwargs))
        if images.shape[0] != n:
            raise RuntimeError(f"The pipeline returned {images.shape[0]} images for a batch of {n}.")
        if return_labels:
            labels = kwargs["class_labels"] if class_labels is not None else _cycled(prompt_labels, start, n)
            yield images, torch.tensor(labels, dtype=torch.int64)
        else:
            yield images


def _process_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> Iterator[tuple]:
    """``(batch index b, first sample index, size)`` of this process's batches: every ``world_size``-th."""
    for b in range(math.ceil(num_samples / batch_size)):
        if b % world_size == rank:
            yield b, b * batch_size, min(batch_size, num_samples - b * batch_size)


def _cycled(values: Sequence, start: int, n: int) -> list:
    """Samples ``start .. start + n - 1`` take ``values[i % len(values)]`` (prompts, their labels)."""
    return [values[(start + i) % len(values)] for i in range(n)]


def _clip_scored(batches, scorer, prompts: Sequence[str], num_samples: int, batch_size: int, rank: int,
                 world_size: int) -> Iterator:
    """Pass ``generate_batches``' batches through, scoring each image with its prompt (``scorer.update``)."""
    for (_, start, n), batch in zip(_process_batches(num_samples, batch_size, rank, world_size), batches):
        scorer.update(batch[0] if isinstance(batch, tuple) else batch, _cycled(prompts, start, n))
        yield batch


# What ``train_fd_onestep.py --use_lora`` writes: the LoRA (diffusers format) and, next to it, the base model
# and the ``FDOneStepPipeline.from_teacher`` settings it was trained with.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LORA_INFO_FILE = "fd_onestep_lora.json"


def lora_loading_code(folder: str | os.PathLike) -> str:
    """Python that loads the LoRA output folder ``folder`` onto its base model (what ``fd_onestep_lora.json``'s
    ``how_to_load`` holds): ``pipe`` is the one-step pipeline with the LoRA (``load_lora_weights`` returns None)."""
    return (
        "import json\n"
        "from fd_onestep import FDOneStepPipeline\n"
        f"folder = {str(folder)!r}\n"
        f"info = json.load(open(f'{{folder}}/{LORA_INFO_FILE}'))\n"
        "pipe = FDOneStepPipeline.from_teacher(info['base_model'], revision=info.get('revision'), "
        "variant=info.get('variant'), **info['one_step_settings'])\n"
        "pipe.load_lora_weights(folder)\n"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def load_pipeline(
    pretrained: str | os.PathLike,
    *,
    cache_dir: Optional[str | os.PathLike] = None,
    local_files_only: Optional[bool] = None,
    lora_weights: Optional[str | os.PathLike] = None,
):
    """The pipeline ``fd-onestep evaluate --pipeline`` samples from: a local folder or a Hub id.

    - A folder with ``fd_onestep_lora.json`` (a ``--use_lora`` run of the training script):
      ``FDOneStepPipeline.from_teacher(base_model, revision=..., variant=..., **one_step_settings)``, then
      ``load_lora_weights(folder)`` -- the generator the LoRA was trained as. ``lora_weights``: load the LoRA
      from this folder instead (a checkpoint's ``<denoiser>_lora`` folder of the same run), the base and
      settings still from ``folder``'s ``fd_onestep_lora.json``.
    - A ``model_index.json`` whose ``_class_name`` is ``FDOneStepPipeline`` (the training script's output, or
      ``save_pretrained``): ``FDOneStepPipeline.from_pretrained`` (the installed class; no remote code).
    - Any other diffusers pipeline: ``DiffusionPipeline.from_pretrained``.

    Raises ``FileNotFoundError`` naming what could not be loaded and how to make it loadable.
    """
    from diffusers import DiffusionPipeline

    from .pipelines.pipeline_fd_onestep import FDOneStepPipeline

    hub = {k: v for k, v in (("cache_dir", cache_dir), ("local_files_only", local_files_only)) if v is not None}
    folder = Path(pretrained).expanduser()
    info_path = folder / LORA_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        base = info.get("base_model")
        settings = dict(info.get("one_step_settings") or {})
        settings.update({k: info[k] for k in ("revision", "variant") if info.get(k) is not None})
        try:
            pipe = FDOneStepPipeline.from_teacher(base, **settings, **hub)
        except Exception as err:  # noqa: BLE001 - rephrased with the fix
            raise FileNotFoundError(
                f"Could not load the base model '{base}' of the LoRA in '{folder}' (base_model in {info_path.name}; "
                f"{_first_line(err)}). Make that model available (the same local path, or a Hub id in the HF "
                f"cache), or point base_model in '{info_path}' at a copy of it."
            ) from None
        pipe.load_lora_weights(str(folder if lora_weights is None else lora_weights))
        return pipe
    if (folder / LORA_WEIGHTS_FILE).is_file() and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"'{folder}' holds a LoRA ({LORA_WEIGHTS_FILE}) but no {LORA_INFO_FILE} naming its base model and "
            "one-step settings (the training script writes it). Write it as {\"base_model\": ..., "
            "\"one_step_settings\": {...}}, or build the pipeline yourself: "
            "FDOneStepPipeline.from_teacher(base_model, **settings) then load_lora_weights(folder)."
        )
    try:
        config = DiffusionPipeline.load_config(str(pretrained), **hub)
        ours = config.get("_class_name") == FDOneStepPipeline.__name__
        return (FDOneStepPipeline if ours else DiffusionPipeline).from_pretrained(str(pretrained), **hub)
    except Exception as err:  # noqa: BLE001 - rephrased with the fix
        raise FileNotFoundError(
            f"Could not load the pipeline '{pretrained}' ({_first_line(err)}). Pass a local pipeline folder "
            "(save_pretrained, or a training run's output_dir) or a hub id available in the HF cache."
        ) from None


def evaluate_pipeline(
    generator: Callable,
    encoders: Mapping[str, FeatureEncoder],
    references: Mapping[str, "object"],
    num_samples: int,
    *,
    show_progress: bool = True,
    class_references: Optional[Mapping[str, "object"]] = None,
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    classifier_name: Optional[str] = None,
    metadata: Optional[Mapping[str, str]] = None,
    clip_scorer=None,
    **sampling,
) -> EvaluationResult:
    """Generate ``num_samples`` images and evaluate them.

    ``sampling``: how the images are drawn, the keywords of :func:`generate_batches` (``batch_size``, ``seed``,
    ``class_labels``, ``num_classes``, ``prompts``, ``pipeline_kwargs``). Under ``torch.distributed`` every
    process generates every ``world_size``-th batch and the moments are summed, so the result equals the
    single-process one.

    ``metadata``: what was evaluated, recorded with the result (default ``source``: the pipeline's
    ``_name_or_path``); the seed is added.

    Class-conditional pipelines (``class_labels`` or ``num_classes``): with ``class_references``
    (``{name: ClassConditionalStats}``) and / or a ``classifier`` the result also carries per-class FD, FJD
    and adherence of the requested labels (:func:`evaluate_images`). Text-to-image pipelines with ``prompts`` and
    ``prompt_labels`` (the class each prompt names) and a ``classifier``: adherence of the named classes.

    ``clip_scorer``: a :class:`fd_onestep.clip_score.CLIPScore` (reset here) that scores every image with its prompt
    (needs ``prompts``): ``EvaluationResult.clip_score``.
    """
    from .clip_score import CLIP_SCORE_DEFINITION
    from .dataset_stats import process_info

    _check_references(encoders, references)
    if clip_scorer is not None and not sampling.get("prompts"):
        raise ValueError("CLIP score compares images with their prompts: pass prompts (CLI: --prompts_file or --dataset "
                         "with --caption_column), or drop the CLIP model.")
    rank, world_size = process_info()
    batches = generate_batches(generator, num_samples, **sampling, rank=rank, world_size=world_size,
                               return_labels=bool(class_references) or classifier is not None)
    defaults = inspect.signature(generate_batches).parameters
    if clip_scorer is not None:
        batch_size = sampling.get("batch_size", defaults["batch_size"].default)
        batches = _clip_scored(batches, clip_scorer.reset(), sampling["prompts"], num_samples, batch_size, rank, world_size)
    name = getattr(getattr(generator, "config", None), "_name_or_path", None) or type(generator).__name__
    seed = sampling.get("seed", defaults["seed"].default)
    result = evaluate_images(
        batches, encoders, references, all_reduce=world_size > 1, show_progress=show_progress, total=num_samples,
        metadata={"source": str(name), **dict(metadata or {}), "seed": str(seed)}, class_references=class_references,
        classifier=classifier, classifier_name=classifier_name,
    )
    if clip_scorer is not None:
        if world_size > 1:
            clip_scorer.all_reduce(next(iter(encoders.values())).device)
        result.clip_score = CLIPScoreResult(clip_scorer.name, clip_scorer.compute(), clip_scorer.count,
                                            CLIP_SCORE_DEFINITION)
    return result


def _header_readable(path) -> bool:
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except OSError:
        return False


def evaluate_folder(
    folder: str | os.PathLike,
    encoders: Mapping[str, FeatureEncoder],
    references: Mapping[str, "object"],
    *,
    batch_size: int = 64,
    max_samples: Optional[int] = None,
    resolution: Optional[int] = None,
    num_workers: int = 0,
    show_progress: bool = True,
    skip_unreadable: bool = False,
) -> EvaluationResult:
    """Evaluate the images of a folder (sorted, read like pytorch-fid) against the references.

    ``skip_unreadable``: images that cannot be decoded (truncated, corrupt) are left out instead of stopping
    the evaluation; their number (over all processes) is recorded as ``skipped_unreadable_images``.

    ``resolution``: center-crop-resize every image to ``resolution`` x ``resolution`` first (as
    ``fd-onestep stats --resolution`` does for the reference). Without it the images must all have one size
    (checked from the file headers before any image is encoded; ``ValueError`` naming two files otherwise):
    a folder holding two generators' outputs, or two resolutions of one, is a mistake, not one distribution.
    """
    from .dataset_stats import iter_folder_batches, process_info
    from .images import common_image_size, list_image_files

    _check_references(encoders, references)
    if resolution is None:
        files = list_image_files(folder)[:max_samples]
        if skip_unreadable:  # a file whose header cannot be read is skipped (and counted) when the pixels are read
            files = [f for f in files if _header_readable(f)]
        common_image_size(files)
    rank, world_size = process_info()
    skipped: List[str] = []
    batches, total = iter_folder_batches(
        folder, batch_size=batch_size, resolution=resolution, max_samples=max_samples, rank=rank,
        world_size=world_size, num_workers=num_workers, skip_unreadable=skip_unreadable, skipped=skipped,
    )
    metadata = {"source": str(folder)}
    if resolution is not None:
        metadata["resolution"] = str(resolution)
    result = evaluate_images(
        batches, encoders, references, all_reduce=world_size > 1, show_progress=show_progress, total=total,
        metadata=metadata,
    )
    if skip_unreadable:
        from .distributed import all_reduce_sum

        # on the process's device: NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        count = all_reduce_sum(torch.tensor([len(skipped)], dtype=torch.int64, device=device))
        result.metadata["skipped_unreadable_images"] = str(int(count.item()))
    return result


def load_references(paths: Sequence[str | os.PathLike], encoders: Mapping[str, FeatureEncoder]) -> Dict[str, "object"]:
    """Match saved ReferenceStats files to encoders by encoder id (order-independent).

    Per-class statistics (``<encoder>.classes.safetensors``, which a ``stats/*.safetensors`` glob also picks up)
    are left out with a warning naming ``--class_stats``. Raises ``ValueError`` naming the encoder ids when an
    encoder has no matching file.
    """
    import logging

    from .dataset_stats import CLASS_STATS_SUFFIX
    from .reference_stats import ReferenceStats

    per_class = [str(p) for p in paths if str(p).endswith(CLASS_STATS_SUFFIX)]
    if per_class:
        if len(per_class) == len(paths):
            raise ValueError(f"{per_class} are per-class statistics (pass them with --class_stats); --reference_stats "
                             "takes the <encoder>.safetensors files next to them.")
        logging.getLogger(__name__).warning(
            "reference stats: left out the per-class statistics %s (pass them with --class_stats for per-class FD "
            "and FJD).", per_class)
        paths = [p for p in paths if not str(p).endswith(CLASS_STATS_SUFFIX)]
    loaded = [ReferenceStats.load(p) for p in paths]
    references = {}
    for name, encoder in encoders.items():
        match = [ref for ref in loaded if ref.encoder_id == encoder.encoder_id]
        if not match:
            if len(loaded) == len(encoders):
                # Same count, no id match: pair by order so check_compatible reports the mismatch.
                references[name] = loaded[list(encoders).index(name)]
                continue
            raise ValueError(
                f"None of the reference stats {[str(p) for p in paths]} (encoder ids {[r.encoder_id for r in loaded]}) "
                f"was computed with encoder '{name}' ({encoder.encoder_id}). Compute them with "
                f"`fd-onestep stats --encoders {name} ...` or drop the encoder."
            )
        references[name] = match[0]
    return references


def load_class_references(paths: Sequence[str | os.PathLike], encoders: Mapping[str, FeatureEncoder]) -> Dict[str, "object"]:
    """Match saved ClassConditionalStats files (``<encoder>.classes.safetensors``) to encoders by encoder id.

    Encoders without a file get no per-class FD / FJD; a file that matches none of the encoders is an error.
    """
    from .conditioning_metrics import ClassConditionalStats

    references = {}
    for path in paths:
        ref = ClassConditionalStats.load(path)
        match = [name for name, encoder in encoders.items() if encoder.encoder_id == ref.encoder_id]
        if not match:
            raise ValueError(
                f"the class statistics {str(path)!r} were computed with encoder {ref.encoder_id!r}, which is not among "
                f"the encoders {[e.encoder_id for e in encoders.values()]}; add it to --encoders or drop the file."
            )
        references[match[0]] = ref
    return references


def image_classifier(spec: str | os.PathLike, device=None, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, C, H, W) in [-1, 1] -> predicted classes int64 (B,)`` for adherence.

    ``spec``: any ``transformers`` image classifier, a local folder or a Hub id (``AutoModelForImageClassification``
    with its image processor; :func:`fd_onestep.classifiers.load_image_classifier`, ``kwargs`` go to it). The
    digits demo's classifier is the folder ``fd_onestep.demos.digits.classifier_path()``.
    """
    from .classifiers import label_predictor, load_image_classifier

    return label_predictor(load_image_classifier(spec, device=device, **kwargs))


# --- the text-to-image protocol ------------------------------------------------------------------------
# Prompts and reference images from one captioned dataset: row i's caption prompts generated sample i, and the
# reference statistics are those of the same rows' images (cached on disk by the images' content).


@dataclass
class CaptionedRows:
    """The first ``num_samples`` rows of a captioned dataset split: the protocol's prompts and reference images.

    Attributes:
        captions: one prompt per row; labels: the class each caption names (``label_column``), or None.
        content_hash: sha256 of the rows' decoded images (mode, size, pixels), and of the validation rows' when a
            validation split is used: the key of the cached reference statistics.
    """

    dataset: str
    split: str
    caption_column: str
    image_column: str
    captions: List[str]
    labels: Optional[List[int]]
    content_hash: str
    validation_split: Optional[str] = None


def _hash_images(images, digest) -> None:
    for image in images:
        digest.update(f"{image.mode}:{image.size}:".encode())
        digest.update(image.tobytes())


def read_captioned_rows(
    dataset: str | os.PathLike,
    *,
    caption_column: str,
    num_samples: int,
    image_column: Optional[str] = None,
    split: str = "train",
    label_column: Optional[str] = None,
    validation_split: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
) -> CaptionedRows:
    """Open ``dataset`` (``datasets.load_dataset``: a Hub id, a local folder or data files; or a ``save_to_disk``
    folder) and read the first ``num_samples`` rows' captions, and labels with ``label_column``.

    Raises ``ValueError`` naming the columns when ``caption_column`` / ``label_column`` is not one, and when the
    split (or ``validation_split``) has fewer than ``num_samples`` rows.
    """
    import hashlib

    from .dataset_stats import open_dataset

    ds, image_col = open_dataset(dataset, split=split, cache_dir=cache_dir, image_column=image_column)
    for option, column in (("--caption_column", caption_column), ("--label_column", label_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"{option} {column!r} is not a column of {dataset} ({split}); its columns are "
                             f"{ds.column_names}.")
    if len(ds) < num_samples:
        raise ValueError(f"{dataset} ({split}) has {len(ds)} rows, fewer than --num_samples {num_samples}: lower "
                         "--num_samples or pick a larger split.")
    rows = ds.select(range(num_samples))
    captions = [str(c) for c in rows[caption_column]]
    labels = [int(c) for c in rows[label_column]] if label_column is not None else None
    digest = hashlib.sha256(f"{image_col}:{num_samples}:".encode())
    _hash_images(rows[image_col], digest)
    if validation_split is not None:
        val, val_col = open_dataset(dataset, split=validation_split, cache_dir=cache_dir, image_column=image_column)
        if len(val) < 2:
            raise ValueError(f"{dataset} ({validation_split}) has {len(val)} rows; FD_r needs at least 2 held-out images.")
        digest.update(f"validation:{validation_split}:".encode())
        _hash_images(val.select(range(min(num_samples, len(val))))[val_col], digest)
    return CaptionedRows(str(dataset), split, caption_column, image_col, captions, labels, digest.hexdigest(),
                         validation_split)


def default_reference_cache() -> Path:
    """Where the protocol caches reference statistics: ``$FD_ONESTEP_CACHE`` or ``~/.cache/fd_onestep``, then
    ``reference_stats/``."""
    root = os.environ.get("FD_ONESTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fd_onestep")
    return Path(root) / "reference_stats"


def captioned_reference_stats(
    encoders: Mapping[str, FeatureEncoder],
    rows: CaptionedRows,
    *,
    cache: Optional[str | os.PathLike] = None,
    resolution: Optional[int] = None,
    batch_size: int = 64,
    cache_dir: Optional[str | os.PathLike] = None,
    show_progress: bool = True,
) -> Dict[str, "object"]:
    """``{name: ReferenceStats}`` of ``rows``' images (with ``validation_fd`` of the first ``len(rows.captions)``
    rows of ``rows.validation_split``, the FD_r denominator), read from ``cache`` (default
    :func:`default_reference_cache`) when the same images were measured with the same encoder, else computed by
    :func:`fd_onestep.dataset_stats.compute_reference_stats` and written there."""
    import hashlib

    from .dataset_stats import compute_reference_stats, save_reference_stats
    from .reference_stats import ReferenceStats

    key = hashlib.sha256(f"{rows.content_hash}:{resolution}".encode()).hexdigest()[:24]
    folder = Path(cache or default_reference_cache()) / key
    references, missing = {}, {}
    for name, encoder in encoders.items():
        path = folder / f"{name}.safetensors"
        cached = ReferenceStats.load(path) if path.is_file() else None
        if cached is not None and cached.encoder_id == encoder.encoder_id:
            references[name] = cached
        else:
            missing[name] = encoder
    if missing:
        computed = compute_reference_stats(
            missing, rows.dataset, split=rows.split, image_column=rows.image_column, max_samples=len(rows.captions),
            validation_split=rows.validation_split, resolution=resolution, batch_size=batch_size, cache_dir=cache_dir,
            show_progress=show_progress)
        save_reference_stats(computed, folder)
        references.update(computed)
    return {name: references[name] for name in encoders}


def protocol_to_dict(results: Mapping[str, EvaluationResult], rows: CaptionedRows) -> dict:
    """The protocol's JSON: the dataset rows it used and every generator's :meth:`EvaluationResult.to_dict`."""
    return {
        "protocol": {"dataset": rows.dataset, "split": rows.split, "caption_column": rows.caption_column,
                     "image_column": rows.image_column, "num_rows": len(rows.captions),
                     "validation_split": rows.validation_split, "content_hash": rows.content_hash,
                     "definition": "sample i is generated from caption i; the reference statistics are those of the "
                     "same rows' images; FDr = FD / FD of the validation split's first num_rows images"},
        "generators": {name: result.to_dict() for name, result in results.items()},
    }


def protocol_markdown(results: Mapping[str, EvaluationResult]) -> str:
    """One table, one column per generator: FD and FDr per representation, FD_r^k, CLIP score and adherence, every
    number with its sample count (``value (N)``)."""

    def cell(value, n):
        return "-" if value is None else f"{value:.4f} ({n})"

    first = next(iter(results.values()))
    names = list(results)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for rep in first.representations:
        for label, key in (("FD", "fd"), ("FDr", "fd_r")):
            cells = [cell(getattr(r.representations[rep], key), r.representations[rep].num_samples) for r in results.values()]
            lines.append(f"| {label} {rep} | " + " | ".join(cells) + " |")
    if any(r.fd_r_k is not None for r in results.values()):
        lines.append(f"| **FD_r^{first.k}** | " + " | ".join(f"**{cell(r.fd_r_k, r.num_samples)}**" for r in results.values()) + " |")
    if any(r.clip_score is not None for r in results.values()):
        model = next(r.clip_score.model for r in results.values() if r.clip_score is not None)
        lines.append(f"| CLIP score (`{Path(model).name}`) | " + " | ".join(
            cell(r.clip_score.score, r.clip_score.num_samples) if r.clip_score else "-" for r in results.values()) + " |")
    if any(r.conditioning is not None and r.conditioning.adherence is not None for r in results.values()):
        classifier = next(r.conditioning.classifier for r in results.values() if r.conditioning is not None)
        lines.append(f"| adherence (`{Path(str(classifier)).name}`) | " + " | ".join(
            cell(r.conditioning.adherence, r.num_samples) if r.conditioning else "-" for r in results.values()) + " |")
    return "\n".join(lines)


RUN_ARGS_FILE = "fd_onestep_run_args.json"
TEACHER_SCHEDULERS = ("dpmsolver++", "ddim", "ddpm", "euler")


def load_teacher(
    run: str | os.PathLike,
    *,
    teacher: Optional[str | os.PathLike] = None,
    scheduler: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    local_files_only: Optional[bool] = None,
) -> tuple:
    """The multi-step teacher of a training run, for the side-by-side: ``(pipeline, call kwargs)``.

    The teacher is ``teacher`` if given, else the run's base model (``fd_onestep_lora.json``'s ``base_model``, or
    ``pretrained_model_name_or_path`` in ``fd_onestep_run_args.json``), loaded by :func:`load_pipeline`. ``scheduler``
    (``dpmsolver++``, ``ddim``, ``ddpm``, ``euler``; default: the run's ``--teacher_sampler``, else the teacher's own
    scheduler) is built ``from_config`` of the teacher's scheduler. The call kwargs carry the run's guidance scale,
    so both columns sample at one guidance. Raises ``ValueError`` naming ``--teacher`` when the run does not say.
    """
    folder = Path(run).expanduser()
    settings = {}
    if (folder / LORA_INFO_FILE).is_file():
        info = json.loads((folder / LORA_INFO_FILE).read_text())
        settings["teacher"] = info.get("base_model")
        settings["guidance_scale"] = (info.get("one_step_settings") or {}).get("guidance_scale")
    if (folder / RUN_ARGS_FILE).is_file():
        run_args = json.loads((folder / RUN_ARGS_FILE).read_text()).get("args", {})
        settings.setdefault("teacher", run_args.get("pretrained_model_name_or_path"))
        if settings.get("guidance_scale") is None:
            settings["guidance_scale"] = run_args.get("guidance_scale")
        settings["scheduler"] = run_args.get("teacher_sampler")
    source = teacher or settings.get("teacher")
    if not source:
        raise ValueError(f"'{run}' does not name its teacher (no {LORA_INFO_FILE} or {RUN_ARGS_FILE}): pass it with "
                         "--teacher <pipeline folder or Hub id>.")
    pipe = load_pipeline(source, cache_dir=cache_dir, local_files_only=local_files_only)
    scheduler = scheduler or settings.get("scheduler")
    if scheduler is not None:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = dict(zip(TEACHER_SCHEDULERS, (DPMSolverMultistepScheduler, DDIMScheduler, DDPMScheduler,
                                                EulerDiscreteScheduler)))
        if scheduler not in classes:
            raise ValueError(f"unknown teacher scheduler {scheduler!r}; use one of {list(classes)}.")
        pipe.scheduler = classes[scheduler].from_config(pipe.scheduler.config)
    kwargs = {} if settings.get("guidance_scale") is None else {"guidance_scale": float(settings["guidance_scale"])}
    return pipe, kwargs
