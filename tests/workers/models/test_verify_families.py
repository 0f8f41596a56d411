"""`farm models verify` and `farm models export` on every family: the family and the kinds a
model runs, UNet and transformer pipelines alike (T5's tied embedding is not "missing"), and
every built-in exported as a folder its own diffusers class loads."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from farm.jobs.refs import BUILTIN_MODELS
from workers.builtin.families import FAMILY_MODELS, build_builtin

EXPECTED = {
    "tiny": ("txt2img (4-channel UNet)", "sd", "txt2img, img2img, inpaint (blending latents)"),
    "tiny-inpaint": ("inpaint (9-channel UNet)", "sd", "inpaint"),
    "tiny-sdxl": ("txt2img (4-channel UNet)", "sdxl", "txt2img, img2img, inpaint (blending"),
    "tiny-sdxl-inpaint": ("inpaint (9-channel UNet)", "sdxl", "inpaint"),
    "tiny-sd3": ("txt2img (transformer)", "sd3", "txt2img, img2img, inpaint (blending latents)"),
    "tiny-flux": ("txt2img (transformer)", "flux", "txt2img, img2img, inpaint (blending latents)"),
    "tiny-flux-fill": ("inpaint (FLUX.1 Fill transformer)", "flux", "inpaint"),
}
CAPABLE = {
    "tiny": ("yes", "yes"),
    "tiny-sdxl": ("yes", "yes"),
    "tiny-sd3": ("no", "yes"),
    "tiny-flux": ("no", "yes"),
}
"""IP-Adapter (style) and trainable, where not (no, no): the inpainting models train nothing,
and SD3 and FLUX.1 take no IP-Adapter."""


def farm_cli(capsys, *args) -> tuple[int, str, str]:
    from workers.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", list(EXPECTED))
def test_verify_reports_family_and_kinds_of_builtins_and_their_folders(
    name, capsys, tiny_folders, family_folders
):
    folder = {**tiny_folders, **family_folders}[name]
    kind, family, runs = EXPECTED[name]
    style, trainable = CAPABLE.get(name, ("no", "no"))
    for ref in (name, folder):
        code, out, err = farm_cli(capsys, "models", "verify", ref)

        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"{ref}: {kind}"
        assert any(line.strip().startswith(f"family: {family} (") for line in lines), out
        (runs_line,) = [line for line in lines if line.strip().startswith("runs: ")]
        assert runs_line.strip().startswith(f"runs: {runs}")
        assert f"IP-Adapter (style): {style}" in runs_line
        assert f"trainable (LoRA fine-tune): {trainable}" in runs_line
    if name in FAMILY_MODELS:  # every component's weights were checked, T5's tied ones too
        assert out.count("every weight present") >= 4


def test_a_t5_missing_a_real_tensor_is_still_refused(family_folders, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(family_folders["tiny-flux"], tmp_path / "flux")
    weights = broken / "text_encoder_2" / "model.safetensors"
    state = load_file(weights)
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state  # tied
    state.pop("shared.weight")
    save_file(state, weights)

    code, _, err = farm_cli(capsys, "models", "verify", broken)
    assert code == 2 and "text_encoder_2/ weights lack" in err and "shared.weight" in err, err


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_export_writes_a_folder_its_own_class_loads_with_the_same_weights(name, tmp_path, capsys):
    code, out, err = farm_cli(capsys, "models", "export", name, tmp_path / name)
    assert code == 0, err

    loaded = DiffusionPipeline.from_pretrained(tmp_path / name, local_files_only=True)
    built = build_builtin(name)
    assert type(loaded) is type(built)
    for part, module in built.components.items():
        if isinstance(module, torch.nn.Module):
            theirs = loaded.components[part].state_dict()
            assert all(torch.equal(t, theirs[k]) for k, t in module.state_dict().items()), part
