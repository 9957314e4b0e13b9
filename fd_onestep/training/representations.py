"""The run's representations: the encoders of the loss and the held-out ones with their reference statistics
(and per-class statistics), their short names, and the classifier for adherence."""

from __future__ import annotations

from pathlib import Path


from fd_onestep.training.config import load_object



def demo_of(args):
    """The hooks of the bundled demo the run's config names (key ``demo``: ``"module:attribute"``), or None.

    A demo's hooks object may give: ``encoder_aliases`` ({spec: short name}), ``classifier_source(name)``,
    ``training_prompts()`` (prompts and the class each names, or None), ``comparison_prompts()`` (the
    other prompts its comparison encodes, stored in the prompt store, or None), ``real_images(max_images)`` (the
    adversarial term's real images), ``model_card_base(args, pipe)`` (the card's base-model line, or None),
    ``compares_latent`` and ``run_comparison(args, accelerator, gen, model, reps)`` (the end-of-run comparison).
    """
    spec = getattr(args, "demo", None)
    return load_object(spec) if spec else None


def label_aliases(args) -> dict[str, str]:
    """Encoder spec -> short name, for specs that have no folder to name them: the demo's builtin representations
    (the digits demos: "pixels-gray:16" -> "pixels-digits"); none for other runs."""
    demo = demo_of(args)
    return dict(demo.encoder_aliases) if demo is not None else {}


def encoder_label(name: str, aliases: dict[str, str] | None = None) -> str:
    """Short name of an encoder for logs, metrics and tables: its alias if given (see :func:`label_aliases`),
    its folder name for local paths ("/x/tiny-dinov2" -> "tiny-dinov2"), else the name with path separators
    replaced ("pixels-gray:16" -> "pixels-gray_16")."""
    if aliases and name.strip() in aliases:
        return aliases[name.strip()]
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve().name
    return name.strip().replace("/", "_").replace(":", "_").replace("@", "_")


def encoder_labels(names: list[str], what: str, aliases: dict[str, str] | None = None) -> list[str]:
    labels = [encoder_label(n, aliases) for n in names]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} {names} have clashing short names {labels}; rename the folders so they differ.")
    return labels


def load_reference(path: str, encoder_id: str):
    from fd_onestep.reference_stats import ReferenceStats

    if str(path).endswith(".npz"):
        return ReferenceStats.from_npz(path, encoder_id=encoder_id)
    return ReferenceStats.load(path)


class Representations:
    """The encoders of the loss and the eval-only ones, each with its reference statistics (by short name), and
    the per-class statistics (``ClassConditionalStats``) of those that have them."""

    def __init__(self, encoders: dict, references: dict, eval_encoders: dict, eval_references: dict,
                 class_references: dict | None = None):
        self.encoders, self.references = encoders, references
        self.eval_encoders, self.eval_references = eval_encoders, eval_references
        self.class_references = dict(class_references or {})
        self.classifier = None  # images -> predicted labels (--classifier), for adherence
        self.classifier_model = None  # its (model, image_processor), which the comparison's class histogram needs

    @property
    def all_encoders(self) -> dict:
        return {**self.encoders, **self.eval_encoders}

    @property
    def all_references(self) -> dict:
        return {**self.references, **self.eval_references}


def build_encoders(args, names, stats_paths, device, class_stats_paths=()):
    """{label: FeatureEncoder}, {label: ReferenceStats}, {label: ClassConditionalStats}; stats checked against
    their encoder first."""
    from fd_onestep.conditioning_metrics import ClassConditionalStats
    from fd_onestep.encoders import INCEPTION_NAMES, load_encoder

    encoder_autocast = None if args.encoder_autocast == "no" else args.encoder_autocast
    aliases = label_aliases(args)
    encoders, references, class_references = {}, {}, {}
    class_stats_paths = list(class_stats_paths) or [None] * len(names)
    for name, path, class_path in zip(names, stats_paths, class_stats_paths):
        is_inception = name.strip().lower() in INCEPTION_NAMES
        enc = load_encoder(name, device=device, autocast_dtype=encoder_autocast,
                           gradient_checkpointing=args.encoder_gradient_checkpointing,
                           local_files_only=True if args.local_files_only else None,
                           cache_dir=None if is_inception else args.cache_dir,
                           weights_path=args.inception_weights if is_inception else None)
        enc.requires_grad_(False)
        enc.eval()
        ref = load_reference(path, enc.encoder_id)
        try:
            ref.check_compatible(enc.encoder_id, enc.feature_dim)
        except ValueError as err:
            raise ValueError(f"--encoders {name!r} with reference stats {path!r}: {err}") from None
        label = encoder_label(name, aliases)
        encoders[label], references[label] = enc, ref
        if class_path is not None:
            class_ref = ClassConditionalStats.load(class_path)
            try:
                class_ref.check_compatible(enc.encoder_id, enc.feature_dim)
            except ValueError as err:
                raise ValueError(f"--encoders {name!r} with per-class stats {class_path!r}: {err}") from None
            class_references[label] = class_ref
    return encoders, references, class_references


def build_representations(args, device) -> Representations:
    encoders, references, class_refs = build_encoders(args, args.encoders, args.reference_stats, device,
                                                      args.class_reference_stats)
    eval_encoders, eval_references, eval_class_refs = build_encoders(
        args, args.eval_encoders, args.eval_reference_stats, device, args.eval_class_reference_stats)
    reps = Representations(encoders, references, eval_encoders, eval_references, {**class_refs, **eval_class_refs})
    if args.classifier:
        from fd_onestep.classifiers import label_predictor, load_image_classifier

        demo = demo_of(args)
        source = (demo.classifier_source(args.classifier) if demo is not None else None) or args.classifier
        reps.classifier_model = load_image_classifier(source, device=device, local_files_only=True)
        reps.classifier = label_predictor(reps.classifier_model)
    return reps
