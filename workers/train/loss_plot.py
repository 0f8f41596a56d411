"""A fine-tune's loss curve as a PNG, drawn with PIL (no plotting library on workers).

    >>> png = loss_curve_png([0.9, 0.8, 0.82, 0.7], resumed_from=[2])

The raw loss per optimizer step in light grey, its moving average in blue, a dashed line where
an attempt resumed from a checkpoint, and the first and last values written on the axes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 360
MARGIN = 48


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_png(losses: list[float], resumed_from: Sequence[int] = ()) -> bytes:
    """The curve of `losses` (one per step, step 1 first) as PNG bytes."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        n = len(losses)

        def point(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, n - 1))
            y = bottom - (bottom - top) * ((v - low) / span)
            return x, y

        for step in resumed_from:
            if 0 < step < n:
                x = point(step - 1, low)[0]
                for y in range(top, bottom, 8):
                    draw.line((x, y, x, min(y + 4, bottom)), fill=(200, 80, 80))
        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190), width=1)
        smooth = moving_average(losses, max(1, n // 20))
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
        draw.text((left, bottom + 6), "step 1", fill="black")
        draw.text((right - 60, bottom + 6), f"step {n}", fill="black")
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left + 8, top + 4), "training loss", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
