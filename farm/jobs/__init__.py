"""Jobs as data: what a user asks for and what the farm knows of it. No I/O here.

state.py      `JobState` and `TRANSITIONS`, the one table of allowed state changes
specs.py      the job specs (pydantic, diffusers' argument names) and `parse_spec`
families.py   model families (SD, SDXL, SD3, FLUX.1): pipelines, defaults, arguments, schedulers
defaults.py   `resolve`: a render spec checked against its model, its left-out fields filled in
refs.py       model, IP-Adapter and LoRA refs: their form, and the one repo-id rule
signature.py  batch signatures and working sizes: which jobs may share a pipeline call
record.py     `JobRecord`, a job's record as the tracker reads it
masks.py      mask generators (`box`, `strokes`, `full`), drawn by the worker

May import: `farm.errors`, `farm.settings`, `farm.keys`, pydantic, Pillow.
"""
