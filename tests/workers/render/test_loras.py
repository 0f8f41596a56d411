"""LoRA adapters on warm pipelines (`workers.render.loras`), against diffusers' own LoRA loading.

Adapters are made as a fine-tune makes them (`workers.builtin.tiny_lora`: peft on the tiny UNet,
saved by diffusers' `save_lora_weights`) and read back from a real local store.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from farm.errors import InvalidJob
from farm.jobs.specs import Img2Img, LoraRef, Txt2Img
from farm.keys import adapter_input_key, adapter_key
from farm.storage.local import LocalStore
from workers.builtin.tiny_lora import TEXT_ENCODER_TARGETS, save_tiny_lora
from workers.render.loras import AdapterCache, adapter_names, peft_layers
from workers.render.render import render

STEPS = 2


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": save_tiny_lora(root / "style.safetensors", seed=1),
        "subject": save_tiny_lora(root / "subject.safetensors", seed=2, text_encoder=True),
    }


@pytest.fixture
def store(tmp_path, lora_files) -> LocalStore:
    """A real local store holding the adapters: `style` as a fine-tune's, `subject` uploaded."""
    store = LocalStore(tmp_path / "store")
    store.put(adapter_key("ft1"), lora_files["style"].read_bytes())
    store.put(adapter_input_key("abc"), lora_files["subject"].read_bytes())
    return store


def spec(**kw) -> Txt2Img:
    return Txt2Img(model="tiny", prompt="a red fox", seed=5, num_inference_steps=STEPS, **kw)


def oracle_images(oracle, folder, lora_files, adapters: dict[str, float], s: Txt2Img):
    """diffusers itself: `load_lora_weights` + `set_adapters`, then the same call, same seed."""
    pipe = oracle(StableDiffusionPipeline, folder)
    for name in adapters:
        path = lora_files[name]
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=name)
    if adapters:
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return pipe(
        prompt=s.prompt,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(s.seed)],
    ).images[0]


def test_adapter_file_loads_in_diffusers_and_changes_the_output(
    oracle, tiny_folders, lora_files, max_diff
):
    base = oracle_images(oracle, tiny_folders["tiny"], lora_files, {}, spec())
    styled = oracle_images(oracle, tiny_folders["tiny"], lora_files, {"style": 1.0}, spec())
    assert max_diff(base, styled) > 20


def test_farm_lora_render_equals_diffusers_and_leaves_the_base_behind(
    cache, store, oracle, tiny_folders, lora_files, max_diff, photo
):
    adapters = AdapterCache(store)
    pipe = cache.get("tiny", "txt2img")
    base_params = sum(p.numel() for p in pipe.unet.parameters())
    with adapters.applied(pipe, [LoraRef(ref="job:ft1", scale=0.8)]):
        assert adapter_names(pipe) == ["farm_lora_0"]
        got = render(pipe, spec()).images[0]
    want = oracle_images(oracle, tiny_folders["tiny"], lora_files, {"style": 0.8}, spec())
    assert max_diff(got, want) <= 1
    base = oracle_images(oracle, tiny_folders["tiny"], lora_files, {}, spec())
    assert max_diff(got, base) > 20
    # No leak: the next job without adapters is the base model, on this pipeline and on the
    # img2img pipeline that shares its UNet and text encoder.
    assert adapter_names(pipe) == [] and peft_layers(pipe) == 0
    assert sum(p.numel() for p in pipe.unet.parameters()) == base_params
    assert max_diff(render(pipe, spec()).images[0], base) == 0
    i2i = cache.get("tiny", "img2img")
    assert i2i.unet is pipe.unet and peft_layers(i2i) == 0
    i2i_spec = Img2Img(model="tiny", prompt="x", image="unused", seed=3, num_inference_steps=STEPS)
    with adapters.applied(i2i, [LoraRef(ref="job:ft1")]):
        styled_i2i = render(i2i, i2i_spec, photo).images[0]
    assert max_diff(render(i2i, i2i_spec, photo).images[0], styled_i2i) > 0
    assert max_diff(render(pipe, spec()).images[0], base) == 0
    assert cache.loads == 1  # the base model was never reloaded for an adapter


def test_scale_zero_is_the_base_output_exactly(cache, store, max_diff):
    pipe = cache.get("tiny", "txt2img")
    base = render(pipe, spec()).images[0]
    with AdapterCache(store).applied(pipe, [LoraRef(ref="job:ft1", scale=0.0)]):
        zero = render(pipe, spec()).images[0]
    assert max_diff(zero, base) == 0


def test_two_adapters_with_scales_equal_diffusers(
    cache, store, oracle, tiny_folders, lora_files, max_diff
):
    """Two adapters, one of them on the text encoder too, each at its own scale."""
    adapters = AdapterCache(store)
    pipe = cache.get("tiny", "txt2img")
    subject_uri = store.uri(adapter_input_key("abc"))
    loras = [LoraRef(ref="job:ft1", scale=0.6), LoraRef(ref=subject_uri, scale=-0.4)]
    with adapters.applied(pipe, loras):
        layers = pipe.text_encoder.config.num_hidden_layers
        assert peft_layers(pipe, "text_encoder") == layers * len(TEXT_ENCODER_TARGETS)
        assert adapter_names(pipe) == ["farm_lora_0", "farm_lora_1"]
        got = render(pipe, spec()).images[0]
    want = oracle_images(
        oracle, tiny_folders["tiny"], lora_files, {"style": 0.6, "subject": -0.4}, spec()
    )
    only_style = oracle_images(oracle, tiny_folders["tiny"], lora_files, {"style": 0.6}, spec())
    assert max_diff(got, want) <= 1
    assert max_diff(got, only_style) > 0
    assert peft_layers(pipe) == 0
    # A hot adapter is read from storage once.
    with adapters.applied(pipe, loras):
        pass
    assert adapters.downloads == 2


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fifty_load_unload_cycles_leave_parameters_and_memory_flat(cache, tmp_path):
    """diffusers#8532: LoRA cycles can creep. A big adapter (rank 128 on every attention
    projection, ~3 MB) makes a leak of 50 of them easy to see against allocator noise."""
    path = save_tiny_lora(tmp_path / "big.safetensors", seed=3, rank=128)
    store = LocalStore(tmp_path / "store")
    uri = store.put(adapter_input_key("big"), path.read_bytes())
    adapters = AdapterCache(store)
    pipe = cache.get("tiny", "txt2img")
    loras = [LoraRef(ref=uri, scale=0.5)]
    params = sum(p.numel() for p in pipe.unet.parameters())
    with adapters.applied(pipe, loras):
        lora_layers = peft_layers(pipe)
        adapter_bytes = sum(p.numel() * 4 for p in pipe.unet.parameters()) - params * 4
    assert lora_layers > 0 and adapter_bytes > 2_000_000
    for _ in range(3):  # warm up the allocator and diffusers' own caches
        with adapters.applied(pipe, loras):
            pass
    gc.collect()
    rss_before = _rss_bytes()
    for _ in range(50):
        with adapters.applied(pipe, loras):
            assert peft_layers(pipe) == lora_layers
        assert peft_layers(pipe) == 0
        assert sum(p.numel() for p in pipe.unet.parameters()) == params
    gc.collect()
    growth = _rss_bytes() - rss_before
    leak_of_fifty = 50 * adapter_bytes
    assert growth < leak_of_fifty / 10, (growth, leak_of_fifty)
    assert adapters.downloads == 1


def test_an_adapter_that_cannot_be_read_or_loaded_is_invalid_and_leaves_the_base(
    cache, store, max_diff
):
    pipe = cache.get("tiny", "txt2img")
    base = render(pipe, spec()).images[0]
    adapters = AdapterCache(store)
    store.put(adapter_input_key("junk"), b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    store.put(adapter_input_key("alien"), _alien_safetensors())
    cases = {
        "job:nope": "no adapter is stored there",
        store.uri(adapter_input_key("junk")): "not a readable safetensors file",
        store.uri(adapter_input_key("alien")): "does not fit this model",
    }
    for ref, why in cases.items():
        loras = [LoraRef(ref="job:ft1"), LoraRef(ref=ref)]
        with pytest.raises(InvalidJob, match=why) as err, adapters.applied(pipe, loras):
            pytest.fail("rendered with an adapter that cannot load")
        assert err.value.field == "loras" and ref in str(err.value)
        assert adapter_names(pipe) == [] and peft_layers(pipe) == 0
    assert max_diff(render(pipe, spec()).images[0], base) == 0


def _alien_safetensors() -> bytes:
    """A LoRA for some other model: its shapes fit no layer of the tiny UNet."""
    from safetensors.torch import save

    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.{}.weight"
    return save({key.format("down"): torch.ones(4, 999), key.format("up"): torch.ones(999, 4)})
