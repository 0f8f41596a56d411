"""Fixtures the render tests share."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw


@pytest.fixture
def style_image() -> Image.Image:
    """A style job's reference picture: a magenta block on green, not the content's size."""
    image = Image.new("RGB", (48, 40), (20, 180, 60))
    ImageDraw.Draw(image).rectangle((4, 4, 30, 20), fill=(240, 20, 200))
    return image
