"""`farm submit finetune`: its flags, named as diffusers' training scripts name them.

    farm submit finetune --model tiny --images photos/ --prompt "a photo of sks dog" \
         --rank 8 --steps 400 --learning-rate 1e-4 --resolution 512 --wait --json

`--prompt` is the `instance_prompt` (DreamBooth style: every image without a caption of its own
gets it) and `--steps` is `max_train_steps`; the other flags are the spec's fields. Render
flags (`--width`, `--image`, …) are refused for a fine-tune, and fine-tune flags for a render.
`farm submit` submits the spec (`spec_from_args`) and, with `--wait`, follows its steps and
loss (`farm.cli.progress.TrainingBar`).

The defaults are diffusers' scripts' own (512 px, 500 steps), made for a real model on a GPU;
on a CPU a 512 px step takes minutes even for the built-in tiny model, which trains a step in
a fraction of a second at `--resolution 64`.
"""

from __future__ import annotations

import argparse
from typing import Any

from farm.errors import InvalidJob

FLAGS = {
    "images": str,
    "rank": int,
    "lora_alpha": float,
    "learning_rate": float,
    "resolution": int,
    "train_batch_size": int,
    "gradient_accumulation_steps": int,
    "checkpointing_steps": int,
    "checkpoints_total_limit": int,
    "mixed_precision": str,
}
"""Fine-tune flags that fill the spec field of the same name (`--learning-rate` → learning_rate)."""

RENDER_ONLY = (
    "negative_prompt",
    "guidance_scale",
    "strength",
    "scheduler",
    "width",
    "height",
    "num_images",
    "image",
    "mask",
    "preserve_unmasked",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tune flags, on `farm submit`'s parser (`--steps`, `--prompt`, `--seed`, `--key`,
    `--priority`, `--wait`, `--json` are shared with renders)."""
    group = parser.add_argument_group("finetune", "flags of `farm submit finetune`")
    group.add_argument("--images", help="training images: a folder, an s3:// prefix, or one image")
    group.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    group.add_argument(
        "--lora-alpha", "--alpha", dest="lora_alpha", type=float, help="LoRA alpha (default rank)"
    )
    group.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 1e-4)")
    group.add_argument(
        "--resolution",
        type=int,
        help="training resolution (default 512, diffusers' own: minutes a step on a CPU; "
        "the built-in tiny trains in seconds at 64)",
    )
    group.add_argument("--train-batch-size", type=int)
    group.add_argument("--gradient-accumulation-steps", type=int)
    group.add_argument(
        "--checkpointing-steps", type=int, help="checkpoint every N steps (default 500)"
    )
    group.add_argument(
        "--checkpoints-total-limit", type=int, help="keep only the newest N checkpoints"
    )
    group.add_argument("--mixed-precision", help="no, fp16, bf16 (GPU workers only)")
    group.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train LoRA layers on the text encoder too",
    )


def refuse_flags(args: argparse.Namespace) -> None:
    """A render given a fine-tune flag: one line naming it, rather than ignoring it."""
    given = [f for f in FLAGS if getattr(args, f) is not None]
    given += ["train_text_encoder"] if args.train_text_encoder else []
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise InvalidJob(f"{flag}: only for `farm submit finetune`", field=given[0])


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fine-tune spec the flags describe (checked by `farm.jobs.Finetune` on submit)."""
    for flag in RENDER_ONLY:
        if getattr(args, flag) is not None:
            raise InvalidJob(
                f"--{flag.replace('_', '-')}: not a fine-tune flag", field=flag.replace("-", "_")
            )
    if args.images is None:
        raise InvalidJob("images: is required (--images DIR|URI)", field="images")
    spec: dict[str, Any] = {"kind": "finetune", "model": args.model}
    for field in FLAGS:
        if getattr(args, field) is not None:
            spec[field] = getattr(args, field)
    named = {
        "instance_prompt": args.prompt,
        "max_train_steps": args.steps,
        "seed": args.seed,
        "priority": args.priority,
        "key": args.key,
    }
    spec.update({k: v for k, v in named.items() if v is not None})
    if args.train_text_encoder:
        spec["train_text_encoder"] = True
    return spec
