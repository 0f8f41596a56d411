"""The one flag table: the render flags of `farm submit` and `farm batch submit`, and the spec
field each fills.

A flag is the field's name (`--guidance-scale` → `guidance_scale`), or its short name where
diffusers' is long (`--steps` → `num_inference_steps`, `farm.jobs.specs.SHORT_NAMES`); the
diffusers name is accepted too (`--num-inference-steps`), so whoever knows diffusers knows the
flags. `--mask` fills `mask_image`. A flag of another kind (`farm submit txt2img --image`) is
refused by name (`check_kind_flags`), not with pydantic's "Extra inputs are not permitted".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from farm.errors import InvalidJob
from farm.jobs.specs import RENDER_KINDS, SCHEDULERS, SHORT_NAMES, SPECS


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
        Flag("scheduler", help=", ".join(SCHEDULERS)),
        Flag("width", int),
        Flag("height", int),
        Flag("num_images", int, help="images per job"),
        Flag("priority", int, help="0..9, higher runs sooner"),
        Flag("key", help="idempotency key: the same key submits once"),
        Flag(
            "preserve_unmasked",
            bool,
            help="inpaint: pixels outside the mask come back exactly as in the source "
            "(`farm submit`: off, as diffusers; `farm batch submit`: on, so labels stay valid)",
        ),
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
