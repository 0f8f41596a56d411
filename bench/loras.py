"""What a LoRA adapter costs a job on a warm pipeline: load, set scale, render, unload.

    python bench/loras.py [--rounds 15] [--steps 20] [--rank 4] [--size 64]

One process, one torch thread, the built-in tiny model warm in a `PipelineCache`. Each round
renders the same txt2img job three ways, interleaved so that the machine's drift hits all
alike: the base model; with one adapter from a warm `AdapterCache` (parsed once: what a
worker pays per job for a hot adapter); and with a cold `AdapterCache` (read from the store
and parsed each time: a new adapter). Also times load + unload alone. Prints the medians and
the ratios to the base render.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from farm.jobs.specs import LoraRef, Txt2Img
from farm.keys import adapter_input_key  # noqa: E402
from farm.storage.local import LocalStore
from workers.builtin.tiny_lora import save_tiny_lora
from workers.models.pipelines import PipelineCache
from workers.render.loras import AdapterCache
from workers.render.render import render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_lora(Path(tmp) / "a.safetensors", seed=1, rank=args.rank)
        nbytes = path.stat().st_size
        store = LocalStore(Path(tmp) / "store")
        uri = store.put(adapter_input_key("bench"), path.read_bytes())
        pipe = PipelineCache("cpu").get("tiny", "txt2img")
        loras = [LoraRef(ref=uri, scale=0.8)]
        warm = AdapterCache(store)
        spec = Txt2Img(
            model="tiny",
            prompt="a fox",
            seed=1,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
        )

        def base() -> None:
            render(pipe, spec)

        def hot() -> None:
            with warm.applied(pipe, loras):
                render(pipe, spec)

        def cold() -> None:
            with AdapterCache(store).applied(pipe, loras):
                render(pipe, spec)

        def load_unload() -> None:
            with warm.applied(pipe, loras):
                pass

        ways = {"base": base, "hot": hot, "cold": cold, "load+unload": load_unload}
        for fn in ways.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"tiny txt2img {args.size}x{args.size}, {args.steps} steps, adapter rank {args.rank} "
        f"({nbytes} bytes), {args.rounds} rounds"
    )
    for name, m in med.items():
        print(f"  {name:12} median {m * 1000:8.1f} ms   ratio to base {m / med['base']:.3f}")


if __name__ == "__main__":
    main()
