"""What attaching an IP-Adapter per style call costs, next to the style render itself.

    python bench/style_swap.py [--model tiny] [--size 64] [--steps 10] [--rounds 9]

Workers keep one UNet per model and put a style job's IP-Adapter into it for the call only
(`workers/render/ip_adapter.py`). The alternative is a style pipeline with a UNet of its own, the
adapter attached for good: no swap, but every model's UNet held twice. Side by side in one run,
alternated round by round on the same warm model: a style render with the swap (attach, call,
detach), the same render on a pipeline whose UNet keeps the adapter attached, and the swap
alone. Prints the medians, the swap's cost as a fraction of a render, the ratio swap/kept
(noise around 1.0 on a busy machine) and the bytes a second UNet would take.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from farm.jobs.specs import Style
from workers.models.pipelines import PipelineCache
from workers.render.ip_adapter import load_for
from workers.render.render import render_batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)

    cache = PipelineCache("cpu")
    spec = Style(
        model=args.model,
        prompt="a harbour at dusk",
        image="content.png",
        ip_adapter_image="style.png",
        seed=1,
        num_inference_steps=args.steps,
        ip_adapter_scale=0.6,
    )
    content = Image.new("RGB", (args.size, args.size), (40, 90, 200))
    style = Image.new("RGB", (args.size, args.size), (20, 180, 60))
    adapter = load_for(cache, spec)

    def swapped() -> None:
        render_batch(
            adapter.pipe, [spec], [content], [None], ip_adapter=adapter, ip_adapter_image=style
        )

    def kept(attached_pipe) -> None:  # the adapter never leaves: the call alone
        attached_pipe(
            prompt=spec.prompt,
            image=content,
            ip_adapter_image=style,
            strength=spec.strength,
            num_inference_steps=spec.num_inference_steps,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    def swap_only() -> None:
        with adapter.attached(spec.ip_adapter_scale):
            pass

    swapped()  # warm up
    times: dict[str, list[float]] = {"swap": [], "kept": [], "attach+detach": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        swapped()
        times["swap"].append(time.perf_counter() - t)
        with adapter.attached(spec.ip_adapter_scale) as pipe:
            t = time.perf_counter()
            kept(pipe)
            times["kept"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(100):
            swap_only()
        times["attach+detach"].append((time.perf_counter() - t) / 100)
    med = {k: statistics.median(v) for k, v in times.items()}
    unet_bytes = sum(p.numel() * p.element_size() for p in adapter.pipe.unet.parameters())
    print(f"model {args.model}, {args.size}px, {args.steps} steps, {args.rounds} rounds (medians)")
    print(f"  style render, adapter attached per call: {med['swap'] * 1e3:8.2f} ms")
    print(f"  style render, adapter kept attached:     {med['kept'] * 1e3:8.2f} ms")
    print(f"  attach + detach alone:                   {med['attach+detach'] * 1e3:8.3f} ms")
    print(f"  attach+detach / style render: {med['attach+detach'] / med['kept']:.4f}")
    print(f"  ratio swap/kept: {med['swap'] / med['kept']:.3f}")
    print(f"  a UNet of its own per style pipeline would hold {unet_bytes / 1e6:.1f} MB more")


if __name__ == "__main__":
    main()
