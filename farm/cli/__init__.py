"""The `farm` command: one module per command group, one flag table.

main.py      the parser, the commands of one job, and `main`
parsing.py   `FarmParser`: "did you mean", one error line and one usage line
jobs.py      `farm jobs`: jobs newest first, with the reasons of the failed ones
text.py      `1 job` / `2 jobs`, ages, columns, an error's first line
handoff.py   `farm worker`, `farm models verify|export`: exec `python -m workers`
flags.py     the one flag table: render flags ↔ spec fields, for `farm submit` and batches
batch.py     `farm batch ...`
finetune.py  `farm submit finetune` flags
models.py    `farm models ...`
tokens.py    `farm tokens ...`: the HTTP API's tokens and tenants (`farm serve` is in main.py)
workers.py   `farm workers`, `farm worker --gpus/--workers`
demo.py      `farm demo`: an inpainting augmentation on an embedded farm, end to end
progress.py  progress bars and live lines on a terminal

The top of the light side: it may import every other wing of `farm`, never `workers`
(`farm worker` and the torch-side `farm models` actions run `python -m workers`).
"""
