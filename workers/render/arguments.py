"""A micro-batch's arguments as its family's pipeline takes them: per image, or shared.

A batch of one passes each argument as the job gives it: exactly the call a diffusers user
writes. A larger batch passes what differs per image as lists, one entry per image, with the
fallback each pipeline applies to a missing value written out (`prompt_2` → `prompt`,
`negative_prompt_2` → `negative_prompt` → ""), so every image gets the embeddings it gets
alone; what a pipeline takes once per call (SDXL's sizes, `true_cfg_scale`,
`max_sequence_length`, `denoising_end`…) is shared, and part of the batch signature
(`farm.jobs.signature`), as is whether there is a negative prompt at all where that changes
the pixels (SDXL's `force_zeros_for_empty_prompt`, FLUX.1's true CFG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from farm.jobs.families import FAMILY_ARGS, PER_IMAGE_ARGS, Pipeline

_FALLBACK = {
    "prompt_2": ("prompt",),
    "prompt_3": ("prompt",),
    "negative_prompt_2": ("negative_prompt",),
    "negative_prompt_3": ("negative_prompt",),
}
"""What the pipelines use for a per-image argument left out: the first of these that is set."""

SHARED_ARGS = tuple(a for a in FAMILY_ARGS if a not in PER_IMAGE_ARGS)


def per_image(values: Sequence[Any], n_jobs: int, n: int) -> Any:
    """A batch of one passes its one value as it is; a batch passes one entry per image."""
    if n_jobs == 1:
        return values[0]
    return [v for v in values for _ in range(n)]


def prompts(specs: Sequence[Any], pipeline: Pipeline, n: int) -> dict[str, Any]:
    """`prompt`, `negative_prompt` and the family's other prompts, as `pipeline` takes them."""
    n_jobs = len(specs)
    out: dict[str, Any] = {"prompt": per_image([s.prompt for s in specs], n_jobs, n)}
    if "negative_prompt" in pipeline.args:
        out["negative_prompt"] = _negatives(specs, n)
    for name in PER_IMAGE_ARGS:
        if name not in pipeline.args:
            continue
        values = [getattr(s, name) for s in specs]
        if n_jobs == 1 or all(v is None for v in values):
            out[name] = values[0] if n_jobs == 1 else None
        else:
            out[name] = per_image([_or_fallback(s, name) for s in specs], n_jobs, n)
    return out


def shared(spec: Any, pipeline: Pipeline) -> dict[str, Any]:
    """The family arguments the call shares (the lead's: the batch signature holds them),
    where given (resolved defaults included), and only those `pipeline` takes."""
    return {
        name: getattr(spec, name)
        for name in SHARED_ARGS
        if name in pipeline.args and getattr(spec, name) is not None
    }


def _negatives(specs: Sequence[Any], n: int) -> str | list[str] | None:
    if len(specs) == 1:
        return specs[0].negative_prompt
    if all(s.negative_prompt is None for s in specs):
        return None  # diffusers' own "no negative prompt", for each, as alone
    return [s.negative_prompt or "" for s in specs for _ in range(n)]


def _or_fallback(spec: Any, name: str) -> str:
    value = getattr(spec, name)
    for other in _FALLBACK[name]:
        value = value or getattr(spec, other)
    return value or ""
