"""The heavy side of the farm: the only package that imports torch and diffusers.

tiny.py       built-in tiny models (`tiny`, `tiny-inpaint`), built offline and deterministically
pipelines.py  model refs → `ModelSource` → warm pipelines (`PipelineCache`)
render.py     one render job → images, as a diffusers call reads
device.py     one process per device: which device, how many threads
"""
