"""How long a cancel waits during a fine-tune step: before (checked only after each optimizer
step) and now (`should_stop` asked at every layer, forward and backward), side by side.

    python bench/finetune_cancel.py [--resolution 256] [--rounds 5]

Each round trains the built-in `tiny` (1 torch thread) and, at a random moment inside a step,
asks it to stop; it prints the seconds from the request to the trainer's return, for the old
check (after the step, `on_step`) and the new one (within it), and their medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.jobs.specs import Finetune  # noqa: E402
from workers.models.pipelines import PipelineCache  # noqa: E402
from workers.train.train_lora import LoraTrainer  # noqa: E402


def one_round(pipe, res: int, step_s: float, within: bool, rng: random.Random) -> float:
    images = [Image.new("RGB", (res, res), c) for c in ("red", "navy")]
    spec = Finetune(
        model="tiny", images=["a", "b"], captions=["x", "y"], resolution=res, max_train_steps=50
    )
    stop = threading.Event()
    asked: list[float] = []
    with LoraTrainer(pipe, spec, images, ["x", "y"]) as trainer:

        def request() -> None:
            while trainer.step < 1:  # the first step done: the next is well under way
                time.sleep(0.01)
            time.sleep(rng.uniform(0, step_s))
            asked.append(time.perf_counter())
            stop.set()

        threading.Thread(target=request, daemon=True).start()
        trainer.run(
            lambda *_: stop.is_set(),
            lambda ckpt: None,
            stop.is_set if within else None,
        )
        return time.perf_counter() - asked[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = PipelineCache("cpu").get("tiny", "txt2img")
    rng = random.Random(0)
    # One step's length, to draw the moment of the request inside a step.
    with LoraTrainer(
        pipe,
        Finetune(
            model="tiny",
            images=["a"],
            captions=["x"],
            resolution=args.resolution,
            max_train_steps=1,
        ),
        [Image.new("RGB", (args.resolution, args.resolution), "red")] * 2,
        ["x", "x"],
    ) as trainer:
        t = time.perf_counter()
        trainer.run(lambda *_: False, lambda ckpt: None)
        step_s = time.perf_counter() - t
    print(f"resolution {args.resolution}: one step {step_s:.2f} s")
    after, within = [], []
    for r in range(args.rounds):  # alternating, so both see the same machine
        after.append(one_round(pipe, args.resolution, step_s, False, rng))
        within.append(one_round(pipe, args.resolution, step_s, True, rng))
        print(f"round {r}: after the step {after[-1]:.3f} s, within it {within[-1]:.3f} s")
    a, w = statistics.median(after), statistics.median(within)
    print(f"median wait: after the step {a:.3f} s, within it {w:.3f} s; ratio {a / w:.0f}x")


if __name__ == "__main__":
    main()
