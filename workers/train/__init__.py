"""Fine-tunes: LoRA training on the warm pipeline, checkpoints, loss curves.

finetune.py     a claimed fine-tune job → training data → training → adapter stored
train_lora.py   `LoraTrainer`: the training loop, as diffusers' training scripts train
checkpoints.py  checkpoints in storage, resumed by a retried attempt
loss_plot.py    the loss curve as a PNG
"""
