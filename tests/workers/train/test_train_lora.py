"""LoRA training in process: the loss falls, the adapter is diffusers' own, the warm pipeline
comes back untouched, and a run resumed from a checkpoint ends where an unbroken one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors.torch import load as load_tensors

from farm.jobs.specs import Finetune
from farm.keys import ADAPTER_FILE, checkpoint_key
from farm.storage.local import LocalStore
from workers.train import checkpoints
from workers.train.train_lora import LoraTrainer


def training_images(n: int = 4, size: int = 48) -> list[Image.Image]:
    """Little pictures with one motif, a disc on a coloured ground."""
    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (40 * i, 200 - 30 * i, 100))
        ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=(250, 20 * i, 40))
        out.append(image)
    return out


def spec(**kw) -> Finetune:
    fields = {
        "model": "tiny",
        "images": ["unused.png"],
        "instance_prompt": "sks disc",
        "rank": 8,
        "learning_rate": 3e-2,
        "max_train_steps": 40,
        "resolution": 32,
        "train_batch_size": 2,
        "seed": 1,
    }
    return Finetune(**{**fields, **kw})


def render(pipe, prompt: str = "sks disc", size: int = 64) -> np.ndarray:
    out = pipe(
        prompt=prompt,
        num_inference_steps=3,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    )
    return out.images[0]


def never(*_: object) -> bool:
    return False


@pytest.fixture(scope="module")
def trained():
    """One fine-tune of the built-in `tiny` (UNet and text encoder, alpha ≠ rank), with a render made while its LoRA
    layers were still attached: what diffusers must reproduce from the stored file."""
    from workers.models.pipelines import PipelineCache

    pipe = PipelineCache("cpu").get("tiny", "txt2img")
    job = spec(lora_alpha=16, train_text_encoder=True)
    with LoraTrainer(pipe, job, training_images(), ["sks disc"] * 4) as trainer:
        trainer.run(never, lambda ckpt: None)
        pipe.unet.eval()
        with_lora = render(pipe)
        adapter = trainer.adapter_bytes()
    return {"losses": trainer.losses, "adapter": adapter, "with_lora": with_lora}


def test_loss_goes_down(trained):
    losses = trained["losses"]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < first * 0.97, (first, last)


def test_adapter_loads_in_diffusers_and_changes_its_output(trained, tiny_folders, oracle, tmp_path):
    (tmp_path / ADAPTER_FILE).write_bytes(trained["adapter"])
    pipe = oracle(StableDiffusionPipeline, tiny_folders["tiny"])
    without = render(pipe)
    pipe.load_lora_weights(tmp_path, weight_name=ADAPTER_FILE)
    with_adapter = render(pipe)
    assert np.abs(with_adapter - without).max() > 0.02
    # The file holds what was trained, alpha included: diffusers renders what the trainer did.
    assert np.abs(with_adapter - trained["with_lora"]).max() < 1e-4


def test_render_after_a_finetune_equals_render_before(cache):
    pipe = cache.get("tiny", "txt2img")
    before = render(pipe)
    keys = {name: list(getattr(pipe, name).state_dict()) for name in ("unet", "text_encoder")}
    job = spec(max_train_steps=3, train_text_encoder=True)
    with LoraTrainer(pipe, job, training_images(), ["a"] * 4) as trainer:
        trainer.run(never, lambda ckpt: None)
    for name, names in keys.items():
        module = getattr(pipe, name)
        assert list(module.state_dict()) == names and not module.training
        assert getattr(module, "peft_config", None) is None
    assert np.array_equal(render(pipe), before)
    assert cache.loads == 1


def test_resumed_run_ends_with_the_same_adapter_as_an_unbroken_one(cache, tmp_path):
    """Stopped at step 6 with checkpoints every 4: the retry resumes at 4 and ends bit-equal."""
    pipe = cache.get("tiny", "txt2img")
    store = LocalStore(tmp_path / "store")
    job = spec(max_train_steps=12, checkpointing_steps=4, train_text_encoder=True)
    images, captions = training_images(), ["sks disc", "a disc", "sks", "disc"]

    with LoraTrainer(pipe, job, images, captions) as trainer:
        trainer.run(never, lambda ckpt: None)
        unbroken, unbroken_losses = trainer.adapter_bytes(), trainer.losses

    with LoraTrainer(pipe, job, images, captions) as trainer:
        finished = trainer.run(
            lambda step, total, loss: step == 6,
            lambda ckpt: checkpoints.save(store, "job1", ckpt),
        )
    assert not finished and trainer.step == 6
    # A checkpoint whose writer died before its marker is never resumed.
    store.put(checkpoint_key("job1", 8, "lora.safetensors"), b"half-written")
    assert checkpoints.latest_step(store, "job1") == 4

    with LoraTrainer(pipe, job, images, captions) as trainer:
        trainer.resume(checkpoints.load(store, "job1", 4))
        assert trainer.run(never, lambda ckpt: None)
        resumed, resumed_losses = trainer.adapter_bytes(), trainer.losses
    assert trainer.resumed_from == 4 and len(resumed_losses) == 12
    assert resumed_losses == unbroken_losses
    a, b = load_tensors(unbroken), load_tensors(resumed)
    assert any(k.startswith("text_encoder.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`", "ignore:Adapter farm_finetune")
def test_an_adapter_loaded_before_a_finetune_is_still_there_after(trained, cache, tmp_path):
    """Only the fine-tune's own LoRA layers go: a render's adapter left loaded keeps working."""
    (tmp_path / ADAPTER_FILE).write_bytes(trained["adapter"])
    pipe = cache.get("tiny", "txt2img")
    pipe.load_lora_weights(tmp_path, weight_name=ADAPTER_FILE, adapter_name="render_lora")
    before = render(pipe)
    with LoraTrainer(pipe, spec(max_train_steps=2), training_images(), ["a"] * 4) as trainer:
        trainer.run(never, lambda ckpt: None)
    assert set(pipe.unet.peft_config) == {"render_lora"}
    assert np.array_equal(render(pipe), before)
    pipe.unload_lora_weights()


def test_only_attempts_without_a_new_checkpoint_count_toward_dead_lettering(tmp_path):
    from workers.train.finetune import attempts_without_progress

    store = LocalStore(tmp_path / "store")
    assert attempts_without_progress(store, "job2", 3) == 3  # no checkpoint: every attempt
    ckpt = checkpoints.Checkpoint(
        step=10,
        losses=[1.0] * 10,
        lora={"unet.w": torch.zeros(2)},
        optimizer={"state": {}, "param_groups": []},
        rng={"torch_cpu": torch.get_rng_state()},
        extra={"attempt": 4},
    )
    checkpoints.save(store, "job2", ckpt)
    assert attempts_without_progress(store, "job2", 5) == 1
    assert attempts_without_progress(store, "job2", 7) == 3
    assert checkpoints.load(store, "job2", 10).losses == [1.0] * 10


def test_checkpoints_total_limit_keeps_the_newest_whole_checkpoints(tmp_path):
    store = LocalStore(tmp_path / "store")
    for step in (5, 10, 15, 20):
        ckpt = checkpoints.Checkpoint(
            step=step,
            losses=[1.0] * step,
            lora={"unet.w": torch.full((2,), float(step))},
            optimizer={"state": {}, "param_groups": []},
            rng={"torch_cpu": torch.get_rng_state()},
        )
        checkpoints.save(store, "job3", ckpt)
    assert checkpoints.prune(store, "job3", 2) == [5, 10]
    left = store.list("adapters/job3/checkpoints/")
    assert {int(key.split("/")[-2]) for key in left} == {15, 20} and len(left) == 10
    assert checkpoints.latest_step(store, "job3") == 20
    assert checkpoints.load(store, "job3", 15).lora["unet.w"].tolist() == [15.0, 15.0]
    assert checkpoints.prune(store, "job3", 2) == []  # nothing more to do


def _noop(ckpt: object) -> None:
    pass


@pytest.mark.parametrize("at", [0.01, 0.25, 0.5, 0.95])
def test_a_step_stopped_part_way_is_dropped_and_the_run_resumes_bit_for_bit(cache, at):
    """A cancel or a shutdown need not wait for a step to end (minutes at 512 px on a CPU):
    `should_stop` is asked between micro-steps and at every layer of the forward and backward
    passes. Stopped there (`at`: how far into step 7's questions), the step is abandoned, and
    a checkpoint taken then resumes to the very adapter an unbroken run ends with."""
    pipe = cache.get("tiny", "txt2img")
    job = spec(max_train_steps=9, gradient_accumulation_steps=2, train_text_encoder=True)
    images, captions = training_images(), ["sks disc", "a disc", "sks", "disc"]
    asked = [0]

    def count() -> bool:
        asked[0] += 1
        return False

    with LoraTrainer(pipe, job, images, captions) as trainer:
        assert trainer.run(never, _noop, count)
        unbroken, unbroken_losses = trainer.adapter_bytes(), trainer.losses
    per_step = asked[0] // job.max_train_steps
    assert per_step > 100  # every layer asks, twice (forward, and its gradient)

    stop_after = int(at * per_step)
    with LoraTrainer(pipe, job, images, captions) as trainer:

        def should_stop() -> bool:
            if trainer.step < 6:
                return False
            asked[0] += 1
            return asked[0] > stop_after

        asked[0] = 0
        assert not trainer.run(never, _noop, should_stop)
        assert trainer.step == 6 and len(trainer.losses) == 6
        assert all(p.grad is None for p in trainer.params)  # the half step left nothing
        ckpt = trainer.snapshot()
    with LoraTrainer(pipe, job, images, captions) as trainer:
        trainer.resume(ckpt)
        assert trainer.run(never, _noop)
        resumed, resumed_losses = trainer.adapter_bytes(), trainer.losses
    assert resumed_losses == unbroken_losses
    a, b = load_tensors(unbroken), load_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
