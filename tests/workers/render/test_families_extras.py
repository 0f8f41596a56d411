"""Beyond one call per kind: SDXL's base → refiner render in one job, LoRA adapters on SDXL and
FLUX.1 (against diffusers' `load_lora_weights`), and every kind rendering at the working size on
every family (SD3 and FLUX.1 img2img included), outputs at the input's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from farm.errors import InvalidJob
from farm.jobs.specs import Img2Img, LoraRef, Txt2Img
from farm.keys import adapter_input_key
from farm.storage.local import LocalStore
from workers.builtin.lora import save_family_lora
from workers.render.loras import AdapterCache, peft_layers
from workers.render.render import render, render_batch

PROMPT = "a lighthouse at dusk"


def generators(seed: int = 2) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


# --------------------------------------------------------------------------- refiner


@pytest.fixture(scope="module")
def refiner_folder(family_folders, tmp_path_factory):
    """A second SDXL model to refine with: the built-in's weights, its UNet's perturbed."""
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        family_folders["tiny-sdxl"], local_files_only=True
    )
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in pipe.unet.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std().nan_to_num())
    folder = tmp_path_factory.mktemp("refiner") / "tiny-sdxl-refiner"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_base_then_refiner_in_one_job_equals_diffusers_two_stages(
    cache, oracle, family_folders, refiner_folder, max_diff
):
    spec = Txt2Img(
        model="tiny-sdxl",
        prompt=PROMPT,
        seed=2,
        num_inference_steps=6,
        height=64,
        width=64,
        denoising_end=0.5,
        refiner={"model": str(refiner_folder), "guidance_scale": 6.0},
    )
    steps: list[tuple[int, int]] = []

    (farm,) = render_batch(
        cache.get("tiny-sdxl", "txt2img"),
        [spec],
        refiner=cache.get(str(refiner_folder), "img2img"),
        on_step=lambda s, t: steps.append((s, t)),
    )

    base = oracle(StableDiffusionXLPipeline, family_folders["tiny-sdxl"])
    refiner = oracle(StableDiffusionXLImg2ImgPipeline, refiner_folder)
    gens = generators()
    latents = base(
        prompt=PROMPT,
        num_inference_steps=6,
        denoising_end=0.5,
        height=64,
        width=64,
        output_type="latent",
        generator=gens,
    ).images
    expected = refiner(
        prompt=PROMPT,
        image=latents,
        num_inference_steps=6,
        denoising_start=0.5,
        guidance_scale=6.0,
        generator=gens,
    ).images[0]
    base_only = base(
        prompt=PROMPT, num_inference_steps=6, height=64, width=64, generator=generators()
    ).images[0]

    assert max_diff(farm.images[0], expected) <= 1
    assert max_diff(farm.images[0], base_only) > 4  # the refiner did something
    assert farm.spec.refiner.denoising_start == 0.5  # the base's denoising_end, by default
    assert farm.spec.refiner.aesthetic_score == 6.0  # the refiner pipeline's own default
    assert [s for s, _ in steps] == list(range(1, 7)) and steps[-1] == (6, 6)


def test_a_refiner_needs_a_hand_over_point_and_an_sdxl_base(cache):
    with pytest.raises(InvalidJob, match=r"^denoising_end: a refiner needs"):
        render_batch(
            cache.get("tiny-sdxl", "txt2img"),
            [Txt2Img(model="tiny-sdxl", prompt="x", refiner="tiny-sdxl")],
            refiner=cache.get("tiny-sdxl", "img2img"),
        )
    spec = Txt2Img(model="tiny-sd3", prompt="x", refiner="tiny-sdxl")
    with pytest.raises(InvalidJob, match=r"^refiner: 'tiny-sd3' is sd3"):
        render_batch(
            cache.get("tiny-sd3", "txt2img"), [spec], refiner=cache.get("tiny-sdxl", "img2img")
        )


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    ("model", "cls", "text_encoder"),
    [("tiny-sdxl", StableDiffusionXLPipeline, True), ("tiny-flux", FluxPipeline, False)],
)
def test_lora_renders_equal_load_lora_weights(
    model, cls, text_encoder, cache, oracle, family_folders, tmp_path, max_diff
):
    path = save_family_lora(
        tmp_path / "style.safetensors", model, seed=4, text_encoder=text_encoder
    )
    store = LocalStore(tmp_path / "store")
    key = adapter_input_key("f" * 64)
    store.put(key, path.read_bytes())
    spec = Txt2Img(model=model, prompt=PROMPT, seed=2, num_inference_steps=3, height=32, width=32)
    pipe = cache.get(model, "txt2img")
    plain = render(pipe, spec).images[0]
    weights = {
        name: {k: t.clone() for k, t in module.state_dict().items()}
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }

    with AdapterCache(store).applied(pipe, [LoraRef(ref=store.uri(key), scale=0.7)]):
        got = render(pipe, spec).images[0]
    after = render(pipe, spec).images[0]  # the base again: adapters gone, nothing merged

    theirs = oracle(cls, family_folders[model])
    theirs.load_lora_weights(path.parent, weight_name=path.name, adapter_name="style")
    theirs.set_adapters(["style"], adapter_weights=[0.7])
    call = {"num_inference_steps": 3, "height": 32, "width": 32}
    expected = theirs(prompt=PROMPT, generator=generators(), **call).images[0]
    assert max_diff(got, expected) <= 1
    assert max_diff(got, plain) > 4
    assert peft_layers(pipe) == 0 and max_diff(after, plain) <= 1
    for name, state in weights.items():  # bit for bit: the adapter left nothing behind
        now = getattr(pipe, name).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("model", "cls"),
    [
        ("tiny-sd3", StableDiffusion3Img2ImgPipeline),
        ("tiny-flux", FluxImg2ImgPipeline),
        ("tiny-sdxl", StableDiffusionXLImg2ImgPipeline),
    ],
)
def test_img2img_renders_at_the_working_size_and_returns_the_inputs(
    model, cls, cache, oracle, family_folders, max_diff
):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((43, 35))
    # 4 steps: SDXL img2img's own strength, 0.3, runs int(4 × 0.3) = 1 of them.
    spec = Img2Img(model=model, prompt=PROMPT, image="in.png", seed=2, num_inference_steps=4)

    farm = render(cache.get(model, "img2img"), spec, source)

    # Rendered at 32×40 (the input rounded down to a multiple of 8), returned at 43×35.
    assert (farm.height, farm.width) == (32, 40) and farm.images[0].size == (43, 35)
    pipe = oracle(cls, family_folders[model])
    kwargs = {"num_inference_steps": 4, "generator": generators()}
    if model == "tiny-sdxl":  # its img2img takes no size: the input at the working size
        kwargs["image"] = pipe.image_processor.resize(source, 32, 40)
    else:
        kwargs |= {"image": source, "height": 32, "width": 40}
    expected = pipe(prompt=PROMPT, **kwargs).images[0]
    assert expected.size == (40, 32)
    assert max_diff(farm.images[0], expected.resize((43, 35), Image.Resampling.LANCZOS)) <= 1


def test_sizes_must_fit_the_model(cache):
    # The released SD3 and FLUX.1 need multiples of 16 (VAE 8 × patch 2); the built-ins' VAE
    # is 2×, so 8 is enough there; everything the farm renders is a multiple of 8.
    from farm.jobs.defaults import resolve
    from farm.jobs.families import ModelInfo

    flux = ModelInfo("flux", "FluxPipeline", 64, 1024, vae_scale=8)
    with pytest.raises(InvalidJob, match=r"^height: must be a multiple of 16 for flux"):
        resolve(Txt2Img(model="org/flux", prompt="x", height=520, width=512), flux)
    assert resolve(Txt2Img(model="org/flux", prompt="x"), flux).height == 1024
