"""The heavy side of the farm: the only package that imports torch and diffusers.

worker.py     one process per device, one Celery task: claim → run → store → finish
pipeline.py   the next batch claimed and read, the last one stored, while one renders
results.py    a render's results stored first-writer-wins, its jobs finished from them
runtime.py    what a worker process loads once (`Runtime`) and the jobs it holds (`Held`)
outcomes.py   how a held job ends: one classifier, one `Outcome`
heartbeat.py  leases and progress of held jobs, from one thread; the cancel channel
presence.py   the worker's registry entry and its model queues
metrics.py    Prometheus metrics of one worker
faults.py     fault injection for the fault tests (off unless asked)
models/       model refs → warm pipelines, verify, device, speed options
render/       render_batch (pure compute), LoRA per call, IP-Adapter
train/        LoRA fine-tunes, checkpoints, loss curves
builtin/      tiny random-weight models, built offline

May import every wing of `farm` but `farm.cli`; nothing in `farm` imports this package.
"""

import logging

# Without torchvision, transformers says on first use of an image processor that it falls back to
# its PIL one. The farm never uses torchvision, so that line is noise in a worker's start (and in
# the one-line error a bad start prints): keep that one logger to errors.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
