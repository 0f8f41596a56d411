"""Full-size SD 1.5 inpainting, SDXL and FLUX.1 on one GPU: images/s of diffusers called directly
vs the farm's worker path, at batch 1 and at FARM_MAX_BATCH, in fp16 and bf16, with and without
torch.compile (and channels_last).

On a GPU machine, one prepared command per architecture (estimates, not yet run: no GPU was
lent to this task; the compilations take about half of each):

    python bench/gpu.py --arch sd15-inpaint --json gpu-sd15.json     # about 6-8 minutes on an H100
    python bench/gpu.py --arch sdxl --compile off --json gpu-sdxl.json    # about 5 minutes
    python bench/gpu.py --arch flux --compile off --batch 2 --json gpu-flux.json   # about 6 minutes

(`--arch all` runs the three in a row; where one command may run 10 minutes at most, split by
architecture and by `--compile off|on`.)

On CPU, tiny shapes, seconds (what the tests run):

    python bench/gpu.py --small --arch sd15-inpaint --compile off --rounds 1 --batch 2
    python bench/gpu.py --small --arch sdxl,flux --compile off --dtype fp32 --rounds 1 --batch 2

The models are the architectures built from their configs with seeded random weights (nothing
is downloaded): random weights give noise, not pictures, but the same FLOPs as the real models.

    sd15-inpaint  SD 1.5 inpainting: UNet in_channels 9, block_out_channels (320, 640, 1280, 1280),
                  cross_attention_dim 768 (859,535,364 parameters); VAE (128, 256, 512, 512); CLIP
                  text model 768 wide, 12 layers; PNDM; inpaint, 512×512, 30 steps
    sdxl          stable-diffusion-xl-base-1.0: UNet (320, 640, 1280), transformer layers (1, 2, 10),
                  cross_attention_dim 2048, text_time conditioning (2,567,463,684 parameters); CLIP
                  ViT-L and OpenCLIP bigG (694,659,840) text encoders; Euler; txt2img, 1024×1024,
                  30 steps
    flux          FLUX.1-dev: 19 double- and 38 single-stream blocks, 24 heads of 128
                  (11,901,408,320 parameters), guidance-distilled; T5-XXL encoder (4,762,310,656)
                  and CLIP-L; the 16-channel VAE; flow-matching Euler with dynamic shift; txt2img,
                  1024×1024, 28 steps
(The counts are those of the released models, checked on the meta device.)

dtype: `auto` is what a worker's FARM_DTYPE=auto picks (fp16 for SD and SDXL, bf16 for FLUX.1 on
CUDA; fp32 on CPU); `both` measures fp16 and bf16 rows. `--small` builds the same families at
the size of diffusers' test components (the farm's built-ins for SDXL and FLUX.1).

"direct" is the family's pipeline `__call__` with a batch of prompts (and images, masks) and one
generator per image, as a diffusers user would write it. "farm" is the worker's render path on
the same pipeline object: `workers.render.render_batch` with the farm's specs (resolution
against the model's family, input checks, mask shaping, scheduler copy, per-image generators,
step callback, results at the input's size), after `workers.models.optimize.optimize` (what
FARM_CHANNELS_LAST / FARM_COMPILE do in a worker: the UNet or transformer, and the VAE). Redis,
storage and PNG encoding are not in it (bench/overhead.py measures the whole farm on CPU). Each
configuration gets one warm-up call of each (compiles happen there), then `--rounds`
alternating rounds; each table shows medians and the ratios farm/direct and direct / (direct
at batch 1, no options) for its architecture and dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.jobs.specs import Inpaint, Txt2Img  # noqa: E402
from farm.settings import FarmSettings  # noqa: E402

FULL = {
    "size": 512,
    "steps": 30,
    "unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "sample_size": 64,
    },
    "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "layers": 12, "heads": 12},
}
"""SD 1.5 (inpainting) as its configs on the Hub describe it."""

SMALL = {
    "size": 32,
    "steps": 4,
    "unet": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "sample_size": 8,
    },
    "vae": {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 64},
    "text": {"hidden_size": 32, "intermediate_size": 37, "layers": 2, "heads": 4},
}
"""The same architecture at the size of diffusers' test components: runs on CPU in seconds."""


def build_pipeline(shapes: dict[str, Any], device: str, dtype: Any) -> Any:
    """SD 1.5 inpainting from configs, seeded random weights, on `device` in `dtype`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from workers.builtin.tiny import _tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # weights created where they run: no 4 GB copy
        unet = UNet2DConditionModel(in_channels=9, out_channels=4, **shapes["unet"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(shapes["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(shapes["vae"]["block_out_channels"]),
            latent_channels=4,
            **shapes["vae"],
        )
        t = shapes["text"]
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=t["hidden_size"],
                intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"],
                max_position_embeddings=77,
                vocab_size=49408,
                hidden_act="quick_gelu",
                projection_dim=t["hidden_size"],
            )
        )
    scheduler = PNDMScheduler(  # SD 1.5's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe


SDXL = {
    "size": 1024,
    "steps": 30,
    "unet": {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
"""stabilityai/stable-diffusion-xl-base-1.0's UNet config (and its encoders, VAE, scheduler below)."""

FLUX = {
    "size": 1024,
    "steps": 28,
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
}
"""black-forest-labs/FLUX.1-dev's transformer config (and its encoders, VAE, scheduler below)."""


def _clip(hidden: int, layers: int, heads: int, inner: int, act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act=act,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(latent_channels: int, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        **extra,
    )


@contextlib.contextmanager
def created(device: str, dtype: Any) -> Iterator[None]:
    """Weights created on `device` in `dtype`: no fp32 copy of 17 B parameters first."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else before)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def build_sdxl(device: str, dtype: Any) -> Any:
    """SDXL base from its configs, seeded random weights, on `device` in `dtype`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from workers.builtin.components import clip_tokenizer

    torch.manual_seed(0)
    with created(device, dtype):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SDXL["unet"])
        vae = _vae(4, scaling_factor=0.13025, sample_size=1024)
        text_encoder = _clip(768, 12, 12, 3072, "quick_gelu", projection=False)
        text_encoder_2 = _clip(1280, 32, 20, 5120, "gelu", projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux(device: str, dtype: Any) -> Any:
    """FLUX.1-dev from its configs, seeded random weights, on `device` in `dtype`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from workers.builtin.components import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    with created(device, dtype):
        transformer = FluxTransformer2DModel(**FLUX["transformer"])
        vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False, sample_size=1024)  # fmt: skip
        text_encoder = _clip(768, 12, 12, 3072, "quick_gelu", projection=False)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_heads=64,
                num_layers=24,
                vocab_size=32128,
                feed_forward_proj="gated-gelu",
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(arch: str, small: bool, device: str, dtype: Any) -> Any:
    """The architecture's pipeline: full size from its configs, or small (`--small`)."""
    if arch == "sd15-inpaint":
        return build_pipeline(SMALL if small else FULL, device, dtype)
    if small:  # the farm's built-ins: diffusers' test-component sizes
        from workers.builtin.families import build_builtin

        pipe = build_builtin({"sdxl": "tiny-sdxl", "flux": "tiny-flux"}[arch])
        pipe.set_progress_bar_config(disable=True)
        return pipe if (device, str(dtype)) == ("cpu", "torch.float32") else pipe.to(device, dtype)
    return {"sdxl": build_sdxl, "flux": build_flux}[arch](device, dtype)


ARCHS = {
    # name: (kind, family, full size and steps, small size and steps)
    "sd15-inpaint": ("inpaint", "sd", (512, 30), (32, 4)),
    "sdxl": ("txt2img", "sdxl", (1024, 30), (32, 4)),
    "flux": ("txt2img", "flux", (1024, 28), (32, 4)),
}


def inputs(size: int, n: int) -> tuple[list[Any], list[Any]]:
    """`n` different source pictures and box masks at `size`×`size`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(n):
        images.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        masks.append(Image.fromarray(mask, "L"))
    return images, masks


def direct(
    pipe: Any, kind: str, batch: int, size: int, steps: int, images: list, masks: list
) -> None:
    """The family's pipeline called as a diffusers user writes it, its own guidance."""
    import torch

    kwargs: dict[str, Any] = {}
    if kind == "inpaint":
        kwargs |= {"guidance_scale": 7.5, "strength": 1.0}
        kwargs["image"] = images[:batch] if batch > 1 else images[0]
        kwargs["mask_image"] = masks[:batch] if batch > 1 else masks[0]
    pipe(
        prompt=[f"a red house, variation {i}" for i in range(batch)],
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
        output_type="pil",
        **kwargs,
    )


def farm_path(
    pipe: Any, kind: str, batch: int, size: int, steps: int, images: list, masks: list
) -> None:
    from workers.render.render import render_batch

    common = {"num_inference_steps": steps, "height": size, "width": size}
    if kind == "inpaint":
        specs: list[Any] = [
            Inpaint(
                model="bench/sd15-inpaint-random",
                prompt=f"a red house, variation {i}",
                image="s3://bench/in.png",
                mask_image="s3://bench/mask.png",
                seed=i,
                **common,
            )
            for i in range(batch)
        ]
    else:
        specs = [
            Txt2Img(model="bench/random", prompt=f"a red house, variation {i}", seed=i, **common)
            for i in range(batch)
        ]
    progress: dict[str, tuple[int, int]] = {}

    def on_step(step: int, total: int) -> bool:  # what the worker's heartbeat watch does
        for spec in specs:
            progress[spec.prompt] = (step, total)
        return False

    render_batch(
        pipe,
        specs,
        images[:batch] if kind == "inpaint" else None,
        masks[:batch] if kind == "inpaint" else None,
        on_step=on_step,
    )


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Any, device: str, batch: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return batch / (time.perf_counter() - t0)


def bench_one(
    pipe: Any,
    kind: str,
    device: str,
    batch: int,
    size: int,
    steps: int,
    images: list,
    masks: list,
    rounds: int,
) -> dict[str, Any]:
    """Medians of `rounds` alternating rounds of the direct call and the farm's path."""
    run_direct = functools.partial(direct, pipe, kind, batch, size, steps, images, masks)
    run_farm = functools.partial(farm_path, pipe, kind, batch, size, steps, images, masks)
    run_direct()  # warm-up: cuDNN autotuning, compiles for this shape
    run_farm()
    d: list[float] = []
    f: list[float] = []
    for r in range(rounds):
        pair = [(run_direct, d), (run_farm, f)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(measure(fn, device, batch))
    return {
        "batch": batch,
        "direct_images_per_s": statistics.median(d),
        "farm_images_per_s": statistics.median(f),
        "farm_over_direct": statistics.median([b / a for a, b in zip(d, f, strict=True)]),
    }


def choices(value: str) -> list[bool]:
    return {"both": [False, True], "off": [False], "on": [True]}[value]


def dtypes(value: str, device: str, family: str) -> list[Any]:
    """The dtypes to measure: `auto` (a worker's FARM_DTYPE=auto), one, or both half ones."""
    from workers.models.precision import DTYPES, choose_dtype

    if value == "both":
        return [DTYPES["fp16"], DTYPES["bf16"]]
    return [choose_dtype(value, device, family)]


def table(rows: list[dict[str, Any]]) -> None:
    print()
    print("batch  channels_last  compile  direct img/s  farm img/s  farm/direct  direct/base")
    for r in rows:
        print(
            f"{r['batch']:>5}  {str(r['channels_last']):>13}  {str(r['compile']):>7}  "
            f"{r['direct_images_per_s']:>12.3f}  {r['farm_images_per_s']:>10.3f}  "
            f"{r['farm_over_direct']:>11.3f}  {r['direct_over_base']:>11.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: CPU, seconds")
    ap.add_argument("--arch", default="all", help=f"{', '.join(ARCHS)}, comma-separated, or all")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32", "both"])
    ap.add_argument("--batch", type=int, help="the larger batch (default FARM_MAX_BATCH)")
    ap.add_argument("--steps", type=int, help="default: the architecture's (4 with --small)")
    ap.add_argument("--size", type=int, help="height and width (default: the architecture's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels-last", choices=["both", "off", "on"], default="both")
    ap.add_argument("--compile", choices=["both", "off", "on"], default="both")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = ap.parse_args()
    archs = list(ARCHS) if args.arch == "all" else args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"--arch: unknown {', '.join(unknown)}; choose from {', '.join(ARCHS)}")

    import torch

    from workers.models.optimize import optimize

    warnings.filterwarnings("ignore")  # random weights in half precision decode to NaN
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_batch = args.batch or FarmSettings().max_batch
    batches = sorted({1, max_batch})
    if device == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread is steadier on a shared machine
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    rows: list[dict[str, Any]] = []
    first: tuple[int, int] | None = None
    for arch in archs:
        kind, family, full, small = ARCHS[arch]
        size = args.size or (small if args.small else full)[0]
        steps = args.steps or (small if args.small else full)[1]
        first = first or (size, steps)
        images, masks = inputs(size, max(batches))
        for dtype in dtypes(args.dtype, device, family):
            print(
                f"{arch} {'(small shapes) ' if args.small else ''}random weights, {dtype}, "
                f"{size}x{size}, {steps} steps, on {name}; torch {torch.__version__}",
                flush=True,
            )
            part = []
            for channels_last in choices(args.channels_last):
                for compiled in choices(args.compile):
                    t0 = time.perf_counter()
                    pipe = optimize(
                        build(arch, args.small, device, dtype),
                        channels_last=channels_last,
                        compile=compiled,
                    )
                    for batch in batches:
                        row = bench_one(
                            pipe, kind, device, batch, size, steps, images, masks, args.rounds
                        )
                        row = {"channels_last": channels_last, "compile": compiled, **row}
                        row |= {"arch": arch, "dtype": str(dtype), "size": size, "steps": steps}
                        row["setup_s"] = round(time.perf_counter() - t0, 1)
                        part.append(row)
                        print(
                            f"  measured batch {batch} cl={channels_last} compile={compiled}",
                            flush=True,
                        )
                    del pipe
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
            plain = [r for r in part if r["batch"] == 1 and not r["channels_last"]]
            base_row = ([r for r in plain if not r["compile"]] or part)[0]
            for row in part:
                row["direct_over_base"] = (
                    row["direct_images_per_s"] / base_row["direct_images_per_s"]
                )
            table(part)
            print(
                f"{arch}, {dtype}: medians of {args.rounds} alternating rounds; base = direct, "
                f"batch 1, channels_last={base_row['channels_last']}, "
                f"compile={base_row['compile']}; device {name}"
            )
            rows += part
    if args.json:
        size, steps = first or (0, 0)
        meta = {"device": name, "dtype": args.dtype, "size": size, "steps": steps}
        meta |= {"small": args.small, "torch": torch.__version__, "rounds": args.rounds}
        meta["archs"] = archs
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
