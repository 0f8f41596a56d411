"""`farm demo`: a small inpainting augmentation on an embedded farm, end to end.

Generates a few sample pictures and box masks, starts a private Redis and a worker, submits
`variations` inpaint jobs per picture on the built-in `tiny-inpaint` model with
`preserve_unmasked` (label-preserving inpainting, what `farm batch submit` does for a dataset:
only the masked box is repainted, every other pixel comes back as it was), follows their
progress, downloads the results and writes a labelled contact sheet: columns `source | mask |
variation 1 …`, the prompt and seeds under each row. The tiny model has random weights: its
paintings are noise, but every moving part is real, and the sheet shows that only the masked
boxes changed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from farm.client import Farm
from farm.inputs import images
from farm.jobs.specs import Inpaint
from farm.local.up import LocalFarm
from farm.settings import FarmSettings

SIZE = 64


def sample_image(seed: int) -> Image.Image:
    """A deterministic picture: a two-colour gradient with a few shapes."""
    rng = random.Random(seed)
    a = [rng.randrange(256) for _ in range(3)]
    b = [rng.randrange(256) for _ in range(3)]
    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    assert px is not None
    for y in range(SIZE):
        t = y / (SIZE - 1)
        row = tuple(int(a[c] * (1 - t) + b[c] * t) for c in range(3))
        for x in range(SIZE):
            px[x, y] = row
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(SIZE - 16), rng.randrange(SIZE - 16)
        box = (x0, y0, x0 + rng.randrange(8, 24), y0 + rng.randrange(8, 24))
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def box_mask(seed: int) -> Image.Image:
    """White (repaint) box somewhere in the middle, black elsewhere."""
    rng = random.Random(seed + 10_000)
    mask = Image.new("L", (SIZE, SIZE), 0)
    w, h = rng.randrange(16, 40), rng.randrange(16, 40)
    x0, y0 = rng.randrange(0, SIZE - w), rng.randrange(0, SIZE - h)
    ImageDraw.Draw(mask).rectangle((x0, y0, x0 + w, y0 + h), fill=255)
    return mask


def write_samples(folder: Path, n: int, size: int = SIZE) -> list[tuple[Path, Path]]:
    """`n` sample pictures and box masks as PNG files: [(image, mask)], for demos and benches."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        img, mask = folder / f"{i}.png", folder / f"{i}.mask.png"
        sample_image(i).resize((size, size)).save(img)
        box_mask(i).resize((size, size)).save(mask)
        pairs.append((img, mask))
    return pairs


def run_demo(out: Path, workers: int = 1, n_images: int = 4, variations: int = 2) -> int:
    from farm.cli.progress import JobsBar

    out = out.resolve()
    # 1. Sample inputs (deterministic, small).
    pairs = write_samples(out / "inputs", n_images)
    settings = FarmSettings(home=out / ".farm")
    print(
        f"demo: starting an embedded farm ({workers} worker(s)) under {settings.home}", flush=True
    )
    with (
        LocalFarm(settings, workers=workers, preload=["tiny-inpaint"]) as lf,
        Farm(lf.settings) as farm,
    ):
        # 2. Submit: one job per picture and variation; each its own seed.
        specs = [
            Inpaint(
                model="tiny-inpaint",
                prompt="a small red house",
                image=str(img),
                mask_image=str(mask),
                seed=1000 * i + v,
                num_inference_steps=20,
                preserve_unmasked=True,
                key=f"demo:{i}:{v}:kept",
            )
            for i, (img, mask) in enumerate(pairs)
            for v in range(variations)
        ]
        jobs = farm.submit_many(specs)
        print(f"demo: submitted {len(jobs)} inpaint jobs; rendering", flush=True)
        # 3. Follow progress to the end.
        records = farm.wait([j.id for j in jobs], timeout=600, on_progress=JobsBar(sys.stderr))
        failed = [r for r in records if r.state.value != "succeeded"]
        for r in failed:
            print(f"demo: job {r.id} {r.state.value}: {r.error}", file=sys.stderr)
        # 4. Download and lay out a labelled contact sheet: source | mask | variations.
        rows: list[list[Image.Image | None]] = []
        captions = []
        changed_outside = 0
        for i, (img, mask_path) in enumerate(pairs):
            row_jobs = jobs[i * variations : (i + 1) * variations]
            source = Image.open(img).convert("RGB")
            mask = Image.open(mask_path).convert("L")
            row: list[Image.Image | None] = [source, mask.convert("RGB")]
            for job in row_jobs:
                files = farm.download(job.id, out / "jobs" / job.id)
                output = Image.open(next(p for p in files if p.name == "0.png")).convert("RGB")
                changed_outside += _changed_outside(source, output, mask)
                row.append(output)
            rows.append(row)
            seeds = ", ".join(str(1000 * i + v) for v in range(variations))
            captions.append(f"a small red house · seeds {seeds}")
    sheet_path = out / "contact-sheet.png"
    header = ["source", "mask", *(f"variation {v + 1}" for v in range(variations))]
    images.grid(rows, header=header, captions=captions).save(sheet_path)
    print(f"demo: {len(jobs) - len(failed)}/{len(jobs)} jobs succeeded")
    print(
        "demo: preserve_unmasked: "
        + (
            "every pixel outside the masks is the source's"
            if not changed_outside
            else f"{changed_outside} pixels outside the masks changed"
        )
    )
    print(f"demo: results in {out / 'jobs'}")
    print(f"demo: contact sheet (source | mask | variations, labelled) at {sheet_path}")
    return 0 if not failed and not changed_outside else 1


def _changed_outside(source: Image.Image, output: Image.Image, mask: Image.Image) -> int:
    """Pixels outside the mask (black) where the output differs from the source."""
    r, g, b = ImageChops.difference(source, output).split()
    differ = ImageChops.lighter(ImageChops.lighter(r, g), b).point(lambda v: 255 if v else 0)
    keep = mask.point(lambda v: 255 if v == 0 else 0)
    return ImageChops.multiply(differ, keep).histogram()[255]
