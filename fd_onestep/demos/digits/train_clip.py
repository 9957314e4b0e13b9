#!/usr/bin/env python
"""Train the bundled digits CLIP (``clip-digits``): a stock ``CLIPModel`` that scores how well a digit image matches
a prompt, the CLIP score model of the text-conditional digits demo (``fd-onestep evaluate --clip_model``).

- ``CLIPProcessor``: the text teacher's tokenizer (``teacher-text/tokenizer``, so every digit name and numeral is
  one token) and a ``CLIPImageProcessor`` for 16x16 images (gray images enter as RGB gray, mean = std = 0.5:
  the library's [-1, 1]);
- ``CLIPModel`` from a tiny config (ViT with 4x4 patches, width 32, 2 layers; text tower width 32, 2 layers,
  8 positions), trained from scratch on the digits train split. Each image is paired with a prompt naming its
  digit in one of ``fd_onestep.demos.digits.TRAINING_PHRASINGS``. The loss is CLIP's symmetric cross-entropy
  over the batch with every pair of the same digit counted as a match (soft targets: a batch of 10 classes holds
  many true pairs, which plain CLIP would push apart).

``HELD_OUT_PHRASINGS`` and the validation images are never trained on; the record states the ranking accuracy
on them (``fd_onestep.demos.digits.clip_ranking_accuracy``). Writes ``--output_dir`` (``save_pretrained``:
safetensors, config, processor) and ``<record_dir>/<name>_training_log.json``.

    python -m fd_onestep.demos.digits.train_clip --output_dir fd_onestep/demos/digits/assets/clip-digits
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from fd_onestep.clip_score import clip_score, load_clip_model
from fd_onestep.demos.digits import (
    DIGITS_RESOLUTION,
    HELD_OUT_PHRASINGS,
    TEXT_TEACHER_PATH,
    TRAINING_PHRASINGS,
    clip_ranking_accuracy,
    digit_prompts,
    load_digits_split,
)
from fd_onestep.demos.digits.asset_training import LossLog, asset_script_parser, clipped_step
from fd_onestep.demos.digits.asset_training import start_asset_run, write_training_record


def parse_args(argv=None):
    p = asset_script_parser(__doc__, "CLIP model folder to write.", train_steps=1500, train_batch_size=128,
                            learning_rate=2e-3, lr_warmup_steps=100, num_threads=1)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--logging_steps", type=int, default=100)
    return p.parse_args(argv)


def build_processor() -> CLIPProcessor:
    tokenizer = CLIPTokenizer.from_pretrained(TEXT_TEACHER_PATH / "tokenizer", local_files_only=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": DIGITS_RESOLUTION}, crop_size={"height": DIGITS_RESOLUTION, "width": DIGITS_RESOLUTION},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(tokenizer) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=DIGITS_RESOLUTION, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def pixel_values(images: torch.Tensor, processor) -> torch.Tensor:
    """The processor's input for [-1, 1] gray images, as ``fd_onestep.clip_score`` prepares them (through PIL)."""
    from fd_onestep.images import tensor_to_pil

    return processor(images=tensor_to_pil(images), return_tensors="pt")["pixel_values"]


def main(argv=None):
    args = parse_args(argv)
    output_dir, record_dir = start_asset_run(args)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_split("train")  # (1437, 1, 16, 16) in [-1, 1], (1437,)
    processor = build_processor()
    pixels = pixel_values(images, processor)  # once: the processor is deterministic
    model = build_model(processor.tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps, args.train_steps)
    log = LossLog(args.logging_steps, args.train_steps)
    start = time.time()
    model.train()
    for step in tqdm(range(1, args.train_steps + 1), desc="clip", mininterval=10):
        rows = torch.randint(len(images), (args.train_batch_size,), generator=generator)
        text = processor.tokenizer(digit_prompts(labels[rows], TRAINING_PHRASINGS, generator), padding=True,
                                   truncation=True, return_tensors="pt")
        out = model(pixel_values=pixels[rows], **text)
        same = (labels[rows][:, None] == labels[rows][None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2
        clipped_step(loss, model.parameters(), optimizer, lr_scheduler, args.max_grad_norm)
        entry = log.add(step, loss)
        if entry:
            print(f"step {step} loss {entry['loss']:.4f} {entry['time_s']:.0f}s", flush=True)
    train_seconds = time.time() - start
    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)

    # measured on the saved folder, loaded as a user loads it
    model, processor = load_clip_model(output_dir, local_files_only=True)
    val_images, val_labels = load_digits_split("validation")
    held_out = {}
    for name, phrasings in (("training_phrasings", TRAINING_PHRASINGS), ("held_out_phrasings", HELD_OUT_PHRASINGS)):
        held_out[name] = clip_ranking_accuracy(val_images, val_labels, model, processor, phrasings)
        shuffled = val_labels[torch.randperm(len(val_labels), generator=torch.Generator().manual_seed(1))]
        held_out[name]["clip_score_matching"] = clip_score(
            val_images, digit_prompts(val_labels, phrasings, torch.Generator().manual_seed(2)), model, processor)
        held_out[name]["clip_score_shuffled_prompts"] = clip_score(
            val_images, digit_prompts(shuffled, phrasings, torch.Generator().manual_seed(2)), model, processor)
        print(name, held_out[name], flush=True)
    write_training_record(
        record_dir, output_dir, log, train_seconds, None,
        model="CLIPModel (ViT 4x4 patches, width 32, 2 layers; text width 32, 2 layers), projection 32",
        parameters=sum(p.numel() for p in model.parameters()), seed=args.seed, train_steps=args.train_steps,
        train_batch_size=args.train_batch_size, learning_rate=args.learning_rate, num_threads=args.num_threads,
        train_images=len(images), validation_images=len(val_images),
        validation=held_out,
        validation_definition="digits validation split (never trained on); pairwise: share of (image, other digit) "
        "pairs whose matching prompt has the higher cosine, in the same phrasing; top1: share of (image, phrasing) "
        "whose matching prompt beats all 9 others; clip_score_*: CLIP score of each image with a prompt of its own "
        "digit / of a shuffled image's digit, in a phrasing drawn per image",
    )


if __name__ == "__main__":
    main()
