"""`farm demo`: a small inpainting augmentation on an embedded farm, end to end.

Generates a few sample pictures and box masks, starts a private Redis and a worker, submits
`variations` inpaint jobs per picture on the built-in `tiny-inpaint` model, follows their
progress, downloads the results and writes a contact sheet (input | mask | outputs per row).
The tiny model has random weights: its paintings are noise, but every moving part is real.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

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
                key=f"demo:{i}:{v}",
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
        # 4. Download and lay out a contact sheet: input | mask | outputs.
        rows = []
        for i, (img, _) in enumerate(pairs):
            row_jobs = jobs[i * variations : (i + 1) * variations]
            row = [Image.open(img).convert("RGB")]
            for v, job in enumerate(row_jobs):
                files = farm.download(job.id, out / "jobs" / job.id)
                if v == 0:
                    row.append(Image.open(out / "jobs" / job.id / "mask.png").convert("RGB"))
                row += [
                    Image.open(p).convert("RGB")
                    for p in files
                    if p.suffix == ".png" and p.name != "mask.png"
                ]
            rows.append(row)
    sheet_path = out / "contact-sheet.png"
    images.grid(rows).save(sheet_path)
    print(f"demo: {len(jobs) - len(failed)}/{len(jobs)} jobs succeeded")
    print(f"demo: results in {out / 'jobs'}")
    print(f"demo: contact sheet (input | mask | outputs) at {sheet_path}")
    return 0 if not failed else 1
