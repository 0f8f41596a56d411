"""Model refs → warm pipelines on one device.

pipelines.py  resolve refs (built-in, Hub cache, folder, single file) and keep pipelines warm
verify.py     `farm models verify`: will a worker load it, and what can it run
device.py     one process per device, threads set on purpose
optimize.py   channels_last and torch.compile, applied on load (denoiser and VAE, any family)
families.py   the family table on the heavy side: a pipeline's ModelInfo, kinds, schedulers
precision.py  FARM_DTYPE, FARM_OFFLOAD, FARM_VAE_TILING: dtype per family, offload, tiling
"""
