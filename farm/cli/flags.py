"""The one flag table: the render flags of `farm submit` and `farm batch submit`, and the spec
field each fills.

A flag is the field's name (`--guidance-scale` → `guidance_scale`), or its short name where
diffusers' is long (`--steps` → `num_inference_steps`, `farm.jobs.specs.SHORT_NAMES`); the
diffusers name is accepted too (`--num-inference-steps`), so whoever knows diffusers knows the
flags. `--mask` fills `mask_image`. A flag of another kind (`farm submit txt2img --image`) is
refused by name (`check_kind_flags`), not with pydantic's "Extra inputs are not permitted".
Family arguments are flags of their diffusers names too (`--prompt-2`, `--original-size
1024,1024`, `--true-cfg-scale 4`), refused at submit on a model whose pipeline does not take
them; `--refiner REF` with `--denoising-end F` is SDXL's base → refiner render.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from farm.errors import InvalidJob
from farm.jobs.families import FAMILY_ARGS, SCHEDULER_NAMES
from farm.jobs.specs import RENDER_KINDS, SHORT_NAMES, SPECS


def pair(text: str) -> tuple[int, int] | str:
    """`H,W` (diffusers' order for SDXL's sizes and crop corner) as a pair of integers;
    anything else as it is, for the spec to refuse in one line naming the field."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return text
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Flag:
    name: str
    """The flag's own name, `num_images` for `--num-images`."""
    type: Callable[[str], Any] = str
    help: str | None = None

    @property
    def field(self) -> str:
        """The spec field it fills."""
        return "mask_image" if self.name == "mask" else SHORT_NAMES.get(self.name, self.name)

    @property
    def options(self) -> list[str]:
        names = [self.name] if self.field == self.name else [self.name, self.field]
        return ["--" + n.replace("_", "-") for n in names]


RENDER_FLAGS = {
    f.name: f
    for f in [
        Flag("prompt", help="what to render (required by txt2img, img2img and inpaint)"),
        Flag("negative_prompt"),
        Flag("image", help="input image: a path, or an s3:// / file:// URI in the farm's store"),
        Flag(
            "mask",
            help="mask (white = repaint): a path or URI, or a generator drawn by the worker: "
            "box, strokes, full, with parameters (strokes:max_width=0.2,seed=7)",
        ),
        Flag("style_image", help="style: the reference image"),
        Flag("style_scale", float, help="style: how strongly it applies (default 0.6)"),
        Flag("ip_adapter", help="style: IP-Adapter ref (default tiny-ip-adapter for tiny)"),
        Flag("ip_adapter_weight_name", help="style: the weights file in the adapter's folder"),
        Flag("seed", int),
        Flag("steps", int, help="denoising steps"),
        Flag("guidance_scale", float),
        Flag("strength", float, help="img2img and inpaint: how much of the input is repainted"),
        Flag(
            "scheduler",
            help=", ".join(SCHEDULER_NAMES) + " (which fit depends on the model's family)",
        ),
        Flag("width", int),
        Flag("height", int),
        Flag("num_images", int, help="images per job"),
        Flag("priority", int, help="0..9, higher runs sooner"),
        Flag("key", help="idempotency key: the same key submits once"),
        Flag(
            "webhook",
            help="http(s) URL the farm POSTs the job's record to when it ends, signed (sent by "
            "the webhook sender that `farm serve` and `farm up` run)",
        ),
        Flag(
            "preview_every",
            int,
            help="publish a small preview every N steps (the API's events, the dashboard)",
        ),
        Flag(
            "preserve_unmasked",
            bool,
            help="inpaint: pixels outside the mask come back exactly as in the source "
            "(`farm submit`: off, as diffusers; `farm batch submit`: on, so labels stay valid)",
        ),
        Flag("prompt_2", help="SDXL, SD3, FLUX.1: the second text encoder's prompt"),
        Flag("negative_prompt_2", help="SDXL, SD3, FLUX.1"),
        Flag("prompt_3", help="SD3: the T5 encoder's prompt"),
        Flag("negative_prompt_3", help="SD3"),
        Flag("original_size", pair, help="SDXL micro-conditioning: HEIGHT,WIDTH"),
        Flag("target_size", pair, help="SDXL micro-conditioning: HEIGHT,WIDTH"),
        Flag("crops_coords_top_left", pair, help="SDXL micro-conditioning: TOP,LEFT"),
        Flag("aesthetic_score", float, help="SDXL img2img and inpaint (default 6.0)"),
        Flag("negative_aesthetic_score", float, help="SDXL img2img and inpaint (default 2.5)"),
        Flag("true_cfg_scale", float, help="FLUX.1: true CFG with a negative prompt above 1"),
        Flag("max_sequence_length", int, help="SD3 (256), FLUX.1 (512): T5 tokens"),
        Flag("denoising_start", float, help="SDXL img2img and inpaint"),
        Flag("denoising_end", float, help="SDXL: the fraction of steps the base runs"),
        Flag("refiner", help="SDXL: a refiner model, from denoising_end on"),
    ]
}
"""Every render flag, by name."""

SUBMIT_FLAGS = tuple(RENDER_FLAGS)
"""`farm submit`'s job flags."""

BATCH_FLAGS = (
    "prompt",
    "negative_prompt",
    "mask",
    "steps",
    "guidance_scale",
    "strength",
    "scheduler",
    "width",
    "height",
    "num_images",
    "priority",
    "preserve_unmasked",
    *FAMILY_ARGS,
    "refiner",
)
"""`farm batch submit`'s flags that set the defaults every row gets (rows override them)."""


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str], **helps: str) -> None:
    """The flags `names` on `parser` (`helps` overrides a flag's help there)."""
    for name in names:
        flag = RENDER_FLAGS[name]
        if flag.type is bool:  # --preserve-unmasked / --no-preserve-unmasked; unset: None
            parser.add_argument(
                *flag.options,
                dest=name,
                action=argparse.BooleanOptionalAction,
                help=helps.get(name, flag.help),
            )
            continue
        parser.add_argument(
            *flag.options, dest=name, type=flag.type, help=helps.get(name, flag.help)
        )


def check_kind_flags(kind: str, fields: dict[str, Any]) -> None:
    """Refuse a flag whose field the kind has not (`txt2img --image`), naming the flag and
    the kinds that take it."""
    taken = SPECS[kind].model_fields
    for flag in RENDER_FLAGS.values():
        if flag.field in fields and flag.field not in taken:
            kinds = [k for k in RENDER_KINDS if flag.field in SPECS[k].model_fields]
            raise InvalidJob(
                f"{flag.options[0]}: not a {kind} flag (it is for {', '.join(kinds)})",
                field=flag.field,
            )


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """Spec field → value of each of the flags `names` that was given."""
    out = {}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out[RENDER_FLAGS[name].field] = value
    return out
