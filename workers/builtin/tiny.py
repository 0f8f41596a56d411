"""Built-in tiny models: `tiny` and `tiny-inpaint`, for demos and tests.

They are Stable Diffusion pipelines at the size of diffusers' own test components
(`get_dummy_components` in tests/pipelines/stable_diffusion): a UNet with
`block_out_channels=(32, 64)`, a two-block VAE and a five-layer CLIP text encoder, all with
seeded random weights. They are built offline (the tokenizer is written locally, nothing comes
from the Hub) and deterministically: every process on the same torch version builds the same
bytes, so a worker and a test, or two workers, agree on every pixel.

    >>> pipe = build_tiny("tiny")                    # StableDiffusionPipeline, 64×64 by default
    >>> export_tiny("tiny", "out/tiny")              # an ordinary diffusers folder
    >>> export_single_file("tiny", "out/tiny.safetensors")   # one original-layout checkpoint

`tiny` has a 4-channel UNet (txt2img, img2img, and inpainting by latent blending);
`tiny-inpaint` has the 9-channel UNet of a dedicated inpainting model.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_MODELS: dict[str, tuple[type[DiffusionPipeline], int]] = {
    "tiny": (StableDiffusionPipeline, 4),
    "tiny-inpaint": (StableDiffusionInpaintPipeline, 9),
}
"""Built-in name → (diffusers pipeline class, UNet input channels)."""

SEED = 0
"""Every component is initialised from `torch.manual_seed(SEED)`, as diffusers' tests do."""

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_components: dict[str, dict[str, Any]] = {}  # per process: name → built components


# --------------------------------------------------------------------------- building


def build_tiny(name: str) -> DiffusionPipeline:
    """A fresh float32 CPU pipeline for a built-in model (weights are copied, never shared)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    if name not in _components:
        _components[name] = _build_components(name)
    pipeline_class, _ = TINY_MODELS[name]
    components = {k: copy.deepcopy(v) for k, v in _components[name].items()}
    return pipeline_class(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def export_tiny(name: str, out_dir: str | Path) -> Path:
    """Write a built-in model as a diffusers folder that `from_pretrained` loads offline."""
    out = Path(out_dir)
    build_tiny(name).save_pretrained(out, safe_serialization=True)
    return out


def export_single_file(name: str, path: str | Path) -> Path:
    """Write a built-in model as one original-layout Stable Diffusion `.safetensors` checkpoint.

    diffusers' `from_single_file(path, config=<a diffusers folder of the same model>)` loads it
    back to the same weights. Before writing, the checkpoint is run through diffusers' own
    conversion and compared tensor by tensor, so a file that would not come back is never written.
    """
    from safetensors.torch import save_file

    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {str(out)!r}")
    pipe = build_tiny(name)
    checkpoint = original_checkpoint(pipe)
    check_round_trip(pipe, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(out), metadata={"format": "pt", "farm_builtin": name})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # safetensors writes 0600: a model file others read too
    return out


def _build_components(name: str) -> dict[str, Any]:
    _, in_channels = TINY_MODELS[name]
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,  # latents 32×32 → images 64×64 through the 2× VAE
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        torch.manual_seed(SEED)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            sample_size=128,
        )
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=5,
                vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # what StableDiffusionPipeline would otherwise rewrite with a warning
    )
    # Every value explicit, as in a scheduler loaded from disk: `from_config` then carries all of
    # them (timestep_spacing…) into another scheduler class instead of that class's defaults.
    scheduler = DDIMScheduler(
        **{k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer over printable ASCII, with no merges, written and read locally."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + list(_SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory(prefix="farm-tiny-tokenizer-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=True), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


# --------------------------------------------------------------------------- original layout
#
# The reverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
# `convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), for SD 1.x-shaped
# models of any width and depth.

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def original_checkpoint(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder as one original-layout state dict."""
    checkpoint: dict[str, torch.Tensor] = {}
    unet_config = pipe.unet.config
    for key, value in pipe.unet.state_dict().items():
        checkpoint[_UNET_PREFIX + _unet_key(key, unet_config)] = value
    vae_config = pipe.vae.config
    for key, value in pipe.vae.state_dict().items():
        ldm_key, value = _vae_key(key, value, vae_config)
        checkpoint[_VAE_PREFIX + ldm_key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        text_key = key if key.startswith("text_model.") else "text_model." + key
        checkpoint[_CLIP_PREFIX + text_key] = value
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in checkpoint.items()}


def _unet_key(key: str, config: Any) -> str:
    parts = key.split(".")
    per_level = config.layers_per_block + 1
    for diffusers_name, ldm_name in _UNET_FIXED.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if parts[0] == "down_blocks":
        level, rest = int(parts[1]), parts[2:]
        if rest[0] == "downsamplers":  # down_blocks.L.downsamplers.0.conv.weight
            return f"input_blocks.{1 + level * per_level + config.layers_per_block}.0.op.{rest[-1]}"
        block = 1 + level * per_level + int(rest[1])
        return _unet_layer(f"input_blocks.{block}", rest[0], rest[2:])
    if parts[0] == "mid_block":
        index, rest = int(parts[2]), parts[3:]
        if parts[1] == "resnets":  # middle_block.N holds its layer directly, no inner index
            return f"middle_block.{2 * index}.{_unet_resnet(rest)}"
        return f"middle_block.{2 * index + 1}.{'.'.join(rest)}"
    if parts[0] == "up_blocks":
        level, rest = int(parts[1]), parts[2:]
        if rest[0] == "upsamplers":  # after the attention, when the level has one
            has_attention = "CrossAttn" in config.up_block_types[level]
            block = level * per_level + config.layers_per_block
            return f"output_blocks.{block}.{2 if has_attention else 1}.conv.{rest[-1]}"
        return _unet_layer(f"output_blocks.{level * per_level + int(rest[1])}", rest[0], rest[2:])
    raise ValueError(f"no original-layout name for UNet weight {key!r}")


def _unet_layer(block: str, kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        return f"{block}.0.{_unet_resnet(rest)}"
    if kind == "attentions":
        return f"{block}.1.{'.'.join(rest)}"
    raise ValueError(f"no original-layout name for UNet layer {kind!r} in {block}")


def _unet_resnet(rest: list[str]) -> str:
    name = ".".join(rest[:-1])
    return f"{_UNET_RESNET.get(name, name)}.{rest[-1]}"


def _vae_key(key: str, value: torch.Tensor, config: Any) -> tuple[str, torch.Tensor]:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return key, value
    parts = rest.split(".")
    for diffusers_name, ldm_name in _VAE_FIXED.items():
        if rest.startswith(diffusers_name + "."):
            return f"{side}.{ldm_name}{rest[len(diffusers_name) :]}", value
    if parts[0] == "down_blocks":
        level = int(parts[1])
        if parts[2] == "downsamplers":
            return f"encoder.down.{level}.downsample.conv.{parts[-1]}", value
        return f"encoder.down.{level}.block.{parts[3]}.{_vae_resnet(parts[4:])}", value
    if parts[0] == "up_blocks":
        level = len(config.up_block_types) - 1 - int(parts[1])  # the decoder counts upwards
        if parts[2] == "upsamplers":
            return f"decoder.up.{level}.upsample.conv.{parts[-1]}", value
        return f"decoder.up.{level}.block.{parts[3]}.{_vae_resnet(parts[4:])}", value
    if parts[0] == "mid_block" and parts[1] == "resnets":
        return f"{side}.mid.block_{int(parts[2]) + 1}.{_vae_resnet(parts[3:])}", value
    if parts[0] == "mid_block" and parts[1] == "attentions":
        name = ".".join(parts[3:-1])
        if name not in _VAE_ATTENTION:
            raise ValueError(f"no original-layout name for VAE weight {key!r}")
        if parts[-1] == "weight" and name != "group_norm":
            value = value[:, :, None, None]  # linear → the original 1×1 convolution
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{parts[-1]}", value
    if parts[0] in ("conv_in", "conv_out"):
        return key, value
    raise ValueError(f"no original-layout name for VAE weight {key!r}")


def _vae_resnet(rest: list[str]) -> str:
    name = ".".join(rest[:-1])
    return f"{'nin_shortcut' if name == 'conv_shortcut' else name}.{rest[-1]}"


def check_round_trip(pipe: DiffusionPipeline, checkpoint: dict[str, torch.Tensor]) -> None:
    """Raise unless diffusers' own conversion turns `checkpoint` back into `pipe`'s weights."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    text = convert_ldm_clip_checkpoint(checkpoint)
    text_keys = pipe.text_encoder.state_dict().keys()
    if not any(k.startswith("text_model.") for k in text_keys):  # transformers ≥ 5.6 layout
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    converted = {
        "unet": (convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config)), pipe.unet),
        "vae": (convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config)), pipe.vae),
        "text_encoder": (text, pipe.text_encoder),
    }
    for component, (state, module) in converted.items():
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise RuntimeError(
                f"{component}: diffusers' conversion does not give back the same weights "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape or not torch.equal(state[key].cpu(), tensor.cpu()):
                raise RuntimeError(f"{component}: weight {key!r} changes in diffusers' conversion")
