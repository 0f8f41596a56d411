"""The light side knows each family without torch: what a model is (`model_info`, `family_of`:
built-ins, folders, single files, cached snapshots), and what a job on it resolves to
(`resolve`: the pipeline's own defaults for whatever was left out, one clear line for whatever
does not fit). The table itself is checked against diffusers in tests/workers/models."""

from __future__ import annotations

import json
import struct

import pytest

from farm.errors import InvalidJob
from farm.inputs.models import family_of, model_info
from farm.jobs.defaults import resolve
from farm.jobs.families import BUILTIN_INFO, FAMILIES, ModelInfo
from farm.jobs.specs import Img2Img, Inpaint, Txt2Img, dump_spec, left_out, parse_spec

# --------------------------------------------------------------------------- what a model is


def folder(root, class_name: str, denoiser: str, in_channels: int, sample, vae_blocks=4, **index):
    """A diffusers folder's configs (no weights: the light side reads configs only)."""
    root.mkdir(parents=True)
    components = {denoiser: ["diffusers", "X"], "vae": ["diffusers", "AutoencoderKL"], **index}
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name, **components}))
    for name, config in {
        denoiser: {"in_channels": in_channels, "sample_size": sample},
        "vae": {"block_out_channels": [128] * vae_blocks},
    }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def single_file(path, shapes: dict[str, list[int]]):
    """A safetensors file with these tensors' header (and zeros for their bytes)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def test_builtins_are_known_without_looking_at_anything():
    assert family_of("tiny-flux-fill") == "flux" and family_of("tiny") == "sd"
    assert BUILTIN_INFO["tiny-flux-fill"].kinds == ("inpaint",)
    assert BUILTIN_INFO["tiny-sdxl-inpaint"].inpaint == "9-channel"
    assert BUILTIN_INFO["tiny"].kinds == ("txt2img", "img2img", "inpaint", "style", "finetune")
    assert BUILTIN_INFO["tiny-sd3"].kinds == ("txt2img", "img2img", "inpaint", "finetune")
    assert BUILTIN_INFO["tiny-sdxl"].kinds == BUILTIN_INFO["tiny"].kinds


def test_folders_are_read_from_their_configs(tmp_path):
    sdxl = folder(tmp_path / "sdxl", "StableDiffusionXLPipeline", "unet", 4, 128)
    refiner = folder(
        tmp_path / "refiner",
        "StableDiffusionXLImg2ImgPipeline",
        "unet",
        4,
        128,
        text_encoder=[None, None],
    )
    sd2 = folder(tmp_path / "sd2", "StableDiffusionPipeline", "unet", 4, 96)
    flux = folder(tmp_path / "flux", "FluxPipeline", "transformer", 64, None)
    fill = folder(tmp_path / "fill", "FluxFillPipeline", "transformer", 384, None)
    sd3 = folder(tmp_path / "sd3", "StableDiffusion3Pipeline", "transformer", 16, 128)
    other = folder(tmp_path / "kandinsky", "KandinskyV22Pipeline", "unet", 4, 64)

    assert model_info(str(sdxl)) == ModelInfo("sdxl", "StableDiffusionXLPipeline", 4, 1024, 8)
    assert model_info(str(sd2)).default_size == 768  # SD 2.x: 96 × 8
    assert model_info(str(refiner)).kinds == ("img2img", "inpaint")
    assert model_info(str(flux)).default_size == 1024  # FLUX.1's fixed 128 × 8
    assert model_info(str(flux)).size_multiple == 16 == model_info(str(sd3)).size_multiple
    assert model_info(str(fill)).inpaint == "fill"
    assert family_of(str(sd3)) == "sd3"
    assert model_info(str(other)) is None and family_of(str(tmp_path / "absent")) is None


def test_single_files_are_read_from_their_config_folder_or_their_header(tmp_path):
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    sdxl = single_file(
        tmp_path / "xl.safetensors",
        {
            conv: [320, 9, 3, 3],
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": [1],
        },
    )
    flux = single_file(
        tmp_path / "flux.safetensors",
        {"double_blocks.0.img_attn.norm.key_norm.scale": [128], "img_in.weight": [3072, 384]},
    )
    sd3 = single_file(
        tmp_path / "sd3.safetensors",
        {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": [1]},
    )
    sd = single_file(tmp_path / "sd.safetensors", {conv: [320, 4, 3, 3]})
    folder(tmp_path / "sd.config", "StableDiffusionPipeline", "unet", 4, 64)

    assert model_info(str(sdxl)) == ModelInfo("sdxl", "StableDiffusionXLInpaintPipeline", 9)
    assert model_info(str(flux)).inpaint == "fill" and family_of(str(sd3)) == "sd3"
    assert model_info(str(sd)).default_size == 512  # from sd.config/ beside it
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert model_info(str(tmp_path / "junk.safetensors")) is None


def test_a_cached_snapshot_is_read_like_a_folder(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--org--sd3"
    folder(repo / "snapshots" / "abc", "StableDiffusion3Pipeline", "transformer", 16, 128)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    assert family_of("org/sd3") == "sd3" and family_of("org/absent") is None


# --------------------------------------------------------------------------- resolve


def test_left_out_fields_take_each_familys_own_defaults():
    sdxl = resolve(Txt2Img(model="tiny-sdxl", prompt="x"), BUILTIN_INFO["tiny-sdxl"])
    assert (sdxl.guidance_scale, sdxl.num_inference_steps, sdxl.height) == (5.0, 50, 64)
    assert sdxl.crops_coords_top_left == (0, 0) and sdxl.original_size is None
    i2i = resolve(Img2Img(model="tiny-sdxl", prompt="x", image="a"), BUILTIN_INFO["tiny-sdxl"])
    assert (i2i.strength, i2i.aesthetic_score, i2i.negative_aesthetic_score) == (0.3, 6.0, 2.5)
    sd3 = resolve(Txt2Img(model="tiny-sd3", prompt="x"), BUILTIN_INFO["tiny-sd3"])
    assert (sd3.num_inference_steps, sd3.guidance_scale, sd3.max_sequence_length) == (28, 7.0, 256)
    flux = resolve(Txt2Img(model="tiny-flux", prompt="x"), BUILTIN_INFO["tiny-flux"])
    assert (flux.guidance_scale, flux.true_cfg_scale, flux.max_sequence_length) == (3.5, 1.0, 512)
    assert flux.height == flux.width == 256  # FLUX.1's fixed 128 × the built-in's 2× VAE
    fill = resolve(
        Inpaint(model="tiny-flux-fill", prompt="x", image="a", mask_image="m"),
        BUILTIN_INFO["tiny-flux-fill"],
    )
    assert (fill.num_inference_steps, fill.guidance_scale, fill.strength) == (50, 30.0, 1.0)
    sd = resolve(Img2Img(model="tiny", prompt="x", image="a"), BUILTIN_INFO["tiny"])
    assert (sd.num_inference_steps, sd.guidance_scale, sd.strength) == (50, 7.5, 0.8)


def test_what_was_given_stays_and_resolving_twice_changes_nothing():
    spec = Txt2Img(
        model="tiny-sdxl", prompt="x", guidance_scale=7.5, scheduler="DPMSolverMultistepScheduler"
    )
    once = resolve(spec, BUILTIN_INFO["tiny-sdxl"])
    assert once.guidance_scale == 7.5 and once.scheduler == "dpmpp_2m"  # its canonical name
    assert resolve(once, BUILTIN_INFO["tiny-sdxl"]) == once
    assert (
        resolve(
            Txt2Img(model="tiny-flux", prompt="x", scheduler="EULER"), BUILTIN_INFO["tiny-flux"]
        ).scheduler
        == "euler"
    )


def test_left_out_survives_the_record():
    spec = parse_spec({"kind": "img2img", "model": "org/x", "prompt": "p", "image": "a.png"})
    assert left_out(spec) == {"num_inference_steps", "guidance_scale", "strength"}
    assert spec.guidance_scale == 7.5  # reads as SD 1.5's until resolved
    record = dump_spec(spec)
    assert "guidance_scale" not in record and "strength" not in record
    again = parse_spec(record)
    assert left_out(again) == left_out(spec) and left_out(parse_spec(again)) == left_out(spec)
    given = parse_spec({**record, "guidance_scale": 7.5})
    assert left_out(given) == {"num_inference_steps", "strength"}


@pytest.mark.parametrize(
    ("model", "fields", "line"),
    [
        ("tiny-flux", {"scheduler": "euler_a"}, "scheduler: 'euler_a' does not fit 'tiny-flux'"),
        (
            "tiny-sd3",
            {"prompt_3": None, "original_size": (64, 64)},
            "original_size: 'tiny-sd3' is sd3",
        ),
        ("tiny-sdxl", {"true_cfg_scale": 2.0}, "true_cfg_scale: 'tiny-sdxl' is sdxl"),
        ("tiny-flux-fill", {}, "model: 'tiny-flux-fill' is an inpainting model (FLUX.1 Fill)"),
        ("tiny-sdxl-inpaint", {}, "model: 'tiny-sdxl-inpaint' is an inpainting model (9-channel"),
    ],
)
def test_what_does_not_fit_is_one_line_naming_the_field(model, fields, line):
    spec = Txt2Img(model=model, prompt="x", **fields)
    with pytest.raises(InvalidJob) as err:
        resolve(spec, BUILTIN_INFO[model])
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    assert err.value.field == line.split(":")[0]


def test_every_family_is_in_the_table():
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "flux"}
    assert [f.name for f in FAMILIES.values() if f.trainable] == ["sd", "sdxl", "sd3", "flux"]
    assert [f.name for f in FAMILIES.values() if f.ip_adapter] == ["sd", "sdxl"]
