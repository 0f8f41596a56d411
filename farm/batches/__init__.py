"""Batches: manifests in, a batch index in Redis, datasets out.

manifest.py  JSONL/CSV manifests → validated rows, every problem named by its line
submit.py    submit a manifest as a batch, resumably, through the one submit pipeline
batch.py     `Batch`: a batch by name; status, wait, retry, cancel
dataset.py   a batch's results as an imagefolder dataset, and a contact sheet
remote.py    `Batch` and `submit_batch` over the HTTP API (a `RemoteFarm`)

May import: `farm.client`, `farm.submit` and the wings below them.
"""
