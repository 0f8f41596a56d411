"""Fine-tunes: LoRA training on the warm pipeline, checkpoints, loss curves.

finetune.py     a claimed fine-tune job → training data → training → adapter stored
train_lora.py   `LoraTrainer`: the training loop every family shares, and `recipe_for`
recipe.py       `Recipe`: what one family's training takes (modules, conditioning, loss, saving)
unet.py         SD 1.x/2.x and SDXL recipes: DDPM noise prediction (SDXL's time ids, two CLIPs)
flow.py         SD3 and FLUX.1 recipes: flow matching, as their DreamBooth LoRA scripts train
interrupt.py    steps a cancel or a shutdown can stop part-way (layer hooks)
checkpoints.py  checkpoints in storage, resumed by a retried attempt
loss_plot.py    the loss curve as a PNG
"""
