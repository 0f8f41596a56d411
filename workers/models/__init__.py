"""Model refs → warm pipelines on one device.

pipelines.py  resolve refs (built-in, Hub cache, folder, single file) and keep pipelines warm
verify.py     `farm models verify`: will a worker load it, and what can it run
device.py     one process per device, threads set on purpose
optimize.py   channels_last and torch.compile, applied on load
"""
