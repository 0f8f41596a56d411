"""What a job reads, checked at the edge and stored once: images, masks, adapters, models.

resolver.py       the one input resolver: path | bytes | PIL | URI → checked image, content
                  key and upload (renders, manifests, fine-tunes and LoRA refs all use it)
images.py         decode, check and encode images (Pillow, with its bomb limits kept)
budgets.py        what one job may ask of a worker: pixels, input size, prompt length, text
loras.py          LoRA refs at submit: safetensors headers checked without torch
training_data.py  a fine-tune's training set: folders, store prefixes, lists → URIs + captions
models.py         what the submitting machine can see of a model ref
hub.py            `farm models pull` / `list`: the local Hugging Face cache
uploader.py       a helper process that stores a big batch's inputs beside the submit

May import: the wings below it (`farm.jobs`, `farm.storage`, `farm.state`), Pillow,
huggingface_hub (hub.py only).
"""
