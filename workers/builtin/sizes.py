"""Bytes of each family built-in's float32 weights once built, for listing without torch.

The sum over every `torch.nn.Module` component of its `state_dict()` tensors (parameters and
persistent buffers), counted as `farm.jobs.BUILTIN_SIZES` counts `tiny`; so T5's embedding,
which `T5EncoderModel` holds as both `shared` and `encoder.embed_tokens`, counts twice (25,088
bytes), and SD3's fixed positional-embedding buffer counts too. Nothing here imports torch;
tests/workers/builtin/test_tiny_families.py checks the numbers against the builders.
"""

from __future__ import annotations

FAMILY_SIZES: dict[str, int] = {
    "tiny-sdxl": 3_039_684,
    "tiny-sdxl-inpaint": 3_040_044,
    "tiny-sd3": 2_077_492,
    "tiny-flux": 870_224,
    "tiny-flux-fill": 880_464,
    "tiny-sdxl-ip-adapter": 132_392,
}
