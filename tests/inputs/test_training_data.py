"""A fine-tune's training set at submit: folders, store prefixes and lists become store URIs
with one caption each, or an InvalidJob naming the field, before anything is stored."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from farm.errors import InvalidJob
from farm.inputs import images
from farm.inputs.resolver import InputResolver
from farm.inputs.training_data import training_set
from farm.jobs.specs import Finetune
from farm.keys import input_key


def picture(color: str) -> Image.Image:
    return Image.new("RGB", (40, 40), color)


@pytest.fixture
def folder(tmp_path):
    """b.png (sidecar caption), a.jpg (no caption), c.webp (manifest caption), notes.txt."""
    root = tmp_path / "photos"
    root.mkdir()
    picture("blue").save(root / "b.png")
    (root / "b.txt").write_text("  a blue square \n")
    picture("red").save(root / "a.jpg", quality=95)
    picture("green").save(root / "c.webp")
    (root / "notes.txt").write_text("not an image")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "c.webp", "text": "green"}))
    return root


def finetune(images, **kw) -> Finetune:
    return Finetune(model="tiny", images=images, **kw)


def test_folder_images_sorted_uploaded_with_sidecar_manifest_and_prompt(store, folder):
    inputs = InputResolver(store)
    out = training_set(finetune(str(folder), instance_prompt="sks"), inputs)
    uploads = inputs.take_uploads()
    assert out["captions"] == ["sks", "a blue square", "green"]  # a.jpg, b.png, c.webp
    assert len(out["images"]) == 3 and len(uploads) == 3
    for uri, (key, data) in zip(out["images"], uploads.items(), strict=True):
        assert uri == store.uri(key) and key == input_key(images.sha256_hex(data))
    assert store.list("inputs/") == []  # the client stores them, after every check


def test_missing_caption_without_prompt_names_the_image(store, folder):
    with pytest.raises(InvalidJob, match="'a.jpg' has no caption") as e:
        training_set(finetune(str(folder)), InputResolver(store))
    assert e.value.field == "captions"


def test_captions_list_must_match_the_images(store, folder):
    with pytest.raises(InvalidJob, match="2 captions for 3 images"):
        training_set(finetune(str(folder), captions=["x", "y"]), InputResolver(store))
    out = training_set(finetune(str(folder), captions=["x", "y", "z"]), InputResolver(store))
    assert out["captions"] == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("empty", "no training images"),
        ("nowhere", "no such folder or file"),
        ("http://example.com/photos/", "a local folder, an s3:// prefix or a list"),
    ],
)
def test_bad_sources_are_refused(store, tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    path = source if "://" in source else str(tmp_path / source)
    with pytest.raises(InvalidJob, match=message) as e:
        training_set(finetune(path, instance_prompt="sks"), InputResolver(store))
    assert e.value.field == "images"


def test_store_prefix_is_listed_with_sidecars(store):
    store.put("train/dog1.png", images.encode_png(picture("white")))
    store.put("train/dog1.txt", b"a white dog")
    store.put("train/dog2.png", images.encode_png(picture("black")))
    store.put("train/deeper/skip.png", images.encode_png(picture("gray")))
    store.put("training-other/x.png", images.encode_png(picture("gray")))
    inputs = InputResolver(store)
    out = training_set(finetune(store.uri("train"), instance_prompt="sks dog"), inputs)
    uploads = inputs.take_uploads()
    assert out["images"] == [store.uri("train/dog1.png"), store.uri("train/dog2.png")]
    assert out["captions"] == ["a white dog", "sks dog"]
    assert uploads == {}  # already in the store: used where they are


def test_store_prefix_without_images_or_outside_the_store(store):
    with pytest.raises(InvalidJob, match="no training images"):
        training_set(
            finetune(store.uri("nothing") + "/", instance_prompt="x"), InputResolver(store)
        )
    outside = "s3://some-other-bucket/photos/" if store.uri("").startswith("s3") else "file:///etc/"
    with pytest.raises(InvalidJob, match="outside this farm's storage"):
        training_set(finetune(outside, instance_prompt="x"), InputResolver(store))


def test_a_list_of_images_and_a_broken_one(store, folder, tmp_path):
    out = training_set(
        finetune([str(folder / "b.png"), picture("red")], instance_prompt="sks"),
        InputResolver(store),
    )
    assert out["captions"] == ["a blue square", "sks"]
    (tmp_path / "broken.png").write_bytes((folder / "b.png").read_bytes()[:60])
    with pytest.raises(InvalidJob) as e:
        training_set(
            finetune([str(tmp_path / "broken.png")], instance_prompt="x"), InputResolver(store)
        )
    assert "broken.png" in str(e.value)
