"""What does not fit a model's family is refused at submit, through the real `farm` command:
a scheduler that does not run with its pipeline (with the list of those that do), a kind it
cannot run, an argument its pipeline does not take. One line naming the field, exit 2, nothing
in Redis or storage. Built-ins, a local folder and a local Hugging Face cache snapshot alike."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.cli.test_invalid_input import nothing_written
from tests.support.cli import run_cli
from tests.workers.models.test_offline_models import put_in_hub_cache

CASES = {
    # name: (args, field, words the line must hold)
    "flux-euler_a": (
        ["txt2img", "--model", "tiny-flux", "--scheduler", "euler_a"],
        "scheduler",
        "runs euler, dpmpp_2m, dpmpp_2s, deis, unipc",
    ),
    "flux-img2img-dpmpp": (
        ["img2img", "--model", "tiny-flux", "--image", "{d}/in.png", "--scheduler", "dpmpp_2m"],
        "scheduler",
        "FluxImg2ImgPipeline runs euler",
    ),
    "sd3-sd-sampler": (
        ["txt2img", "--model", "tiny-sd3", "--scheduler", "EulerAncestralDiscreteScheduler"],
        "scheduler",
        "runs euler, heun, dpmpp_2m",
    ),
    "fill-txt2img": (["txt2img", "--model", "tiny-flux-fill"], "model", "FLUX.1 Fill"),
    "sdxl-inpaint-img2img": (
        ["img2img", "--model", "tiny-sdxl-inpaint", "--image", "{d}/in.png"],
        "model",
        "9-channel UNet",
    ),
    "sdxl-prompt_3": (["txt2img", "--model", "tiny-sdxl", "--prompt-3", "x"], "prompt_3", "sdxl"),
    "sd3-true_cfg": (["txt2img", "--model", "tiny-sd3", "--true-cfg-scale", "2"], "true_cfg_scale", "sd3"),
    "flux-original_size": (
        ["txt2img", "--model", "tiny-flux", "--original-size", "64,64"],
        "original_size",
        "flux",
    ),
    "sdxl-txt2img-aesthetic": (
        ["txt2img", "--model", "tiny-sdxl", "--aesthetic-score", "5"],
        "aesthetic_score",
        "StableDiffusionXLPipeline",
    ),
    "sd-max_sequence_length": (
        ["txt2img", "--model", "tiny", "--max-sequence-length", "64"],
        "max_sequence_length",
        "takes no max_sequence_length",
    ),
    "fill-negative": (
        [
            "inpaint", "--model", "tiny-flux-fill", "--image", "{d}/in.png", "--mask", "full",
            "--negative-prompt", "fog",
        ],
        "negative_prompt",
        "FluxFillPipeline",
    ),
    "flux-refiner": (["txt2img", "--model", "tiny-flux", "--refiner", "tiny-sdxl"], "refiner", "SDXL"),
    "sdxl-refiner-sd3": (
        ["txt2img", "--model", "tiny-sdxl", "--refiner", "tiny-sd3", "--denoising-end", "0.8"],
        "refiner",
        "not an SDXL model",
    ),
    "sdxl-refiner-without-end": (
        ["txt2img", "--model", "tiny-sdxl", "--refiner", "tiny-sdxl"],
        "denoising_end",
        "0.8",
    ),
    "pair": (["txt2img", "--model", "tiny-sdxl", "--original-size", "64"], "original_size", "64"),
    "no-step": (
        ["img2img", "--model", "tiny-sdxl", "--image", "{d}/in.png", "--steps", "2"],
        "strength",
        "runs no denoising step",
    ),
    "sd3-style": (
        ["style", "--model", "tiny-sd3", "--image", "{d}/in.png", "--style-image", "{d}/in.png"],
        "model",
        "style (IP-Adapter) jobs do not run on that family yet",
    ),
    "flux-style": (
        [
            "style", "--model", "tiny-flux", "--image", "{d}/in.png", "--style-image",
            "{d}/in.png", "--ip-adapter", "tiny-sdxl-ip-adapter",
        ],
        "model",
        "style (IP-Adapter) jobs do not run on that family yet",
    ),
    "sdxl-inpaint-finetune": (
        ["finetune", "--model", "tiny-sdxl-inpaint", "--images", "{d}/photos", "--steps", "2"],
        "model",
        "an inpainting model (9-channel UNet): it runs inpaint jobs only, not finetune",
    ),
    "fill-finetune": (
        ["finetune", "--model", "tiny-flux-fill", "--images", "{d}/photos", "--steps", "2"],
        "model",
        "an inpainting model (FLUX.1 Fill): it runs inpaint jobs only, not finetune",
    ),
    "folder-fill-txt2img": (["txt2img", "--model", "{d}/fill"], "model", "FLUX.1 Fill"),
    "hub-fill-txt2img": (["txt2img", "--model", "org/fill"], "model", "FLUX.1 Fill"),
    "hub-flux-euler_a": (
        ["txt2img", "--model", "org/fill-base", "--scheduler", "euler_a"],
        "scheduler",
        "runs euler",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An input picture, training photos, FLUX.1 Fill (and FLUX.1) exported by the real
    `farm models export`, and a local Hugging Face cache holding them."""
    from farm.settings import FarmSettings

    root = tmp_path_factory.mktemp("family-models")
    Image.new("RGB", (64, 64), "teal").save(root / "in.png")
    (root / "photos").mkdir()
    Image.new("RGB", (64, 64), "red").save(root / "photos" / "0.png")
    for name, folder in (("tiny-flux-fill", "fill"), ("tiny-flux", "flux")):
        res = run_cli(FarmSettings(), "models", "export", name, root / folder, timeout=300)
        assert res.returncode == 0, res.stderr
    hub = root / "hub"
    put_in_hub_cache(hub, "org/fill", root / "fill")
    put_in_hub_cache(hub, "org/fill-base", root / "flux")
    return root


@pytest.mark.parametrize("case", CASES)
def test_what_does_not_fit_the_family_is_refused_at_submit(empty_farm, models, case):  # noqa: F811
    args, field, words = CASES[case]
    args = [a.format(d=models) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", "a fox"]

    res = run_cli(empty_farm, "submit", *args, HF_HUB_CACHE=str(models / "hub"), timeout=60)

    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"farm: error: {field}: "), res.stderr
    assert words in lines[0], lines[0]
    assert nothing_written(empty_farm)
