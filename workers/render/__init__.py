"""Rendering: pure compute, one diffusers call per batch.

render.py      `render_batch`: jobs of one batch signature → images, as a diffusers call reads
arguments.py   a micro-batch's arguments as its family's pipeline takes them: per image or shared
loras.py       LoRA adapters loaded on the warm pipeline for one call, then unloaded
ip_adapter.py  IP-Adapters for style jobs, loaded once per model, attached for one call
"""
