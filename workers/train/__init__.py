"""Fine-tunes: LoRA training on the warm pipeline, checkpoints, loss curves.

finetune.py     a claimed fine-tune job → training data → training → adapter stored
train_lora.py   `LoraTrainer`: the training loop, as diffusers' training scripts train
interrupt.py    steps a cancel or a shutdown can stop part-way (layer hooks)
checkpoints.py  checkpoints in storage, resumed by a retried attempt
loss_plot.py    the loss curve as a PNG
"""
