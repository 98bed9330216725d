"""airbench94_muon on all of CIFAR-10: 94% test accuracy (with test-time augmentation) in 8
epochs, the recipe of KellerJordan/cifar10-airbench `airbench94_muon.py`: airbench94's network
with the logits divided by the head's width (256) and the head's initial weights scaled to
standard deviation 1; batch 2,000 (25 steps an epoch); Muon (learning rate 0.24, Nesterov
momentum 0.6, each kernel re-normalised every step) on the convolution kernels of the three
groups, and Nesterov SGD with momentum 0.85 on the rest as PyTorch parameter groups: the head
at learning rate 0.67, the BatchNorm offsets and the whitening bias at 0.053, each with weight
decay 0.004 / its learning rate; every learning rate linearly to 0 over the 200 steps, but the
whitening bias's to 0 over its 3 epochs, after which it is frozen; a summed, label-smoothed
(0.2) loss; no lookahead; alternating flips and 2-pixel reflect-padded translations, and
six-view test-time augmentation. Convolutions in bfloat16 (float32 parameters, BatchNorm
statistics and loss), as airbench trains in half precision: oneDNN's bfloat16 kernels where
the CPU has bfloat16 arithmetic, its float32 kernels elsewhere (the start-up line says which).
Evaluation in batches of 2,000 with batch statistics (see docs/resnets.md)."""

from configs import cifar10_airbench94

HEAD_LR = 0.67
BIAS_LR = 0.053
# airbench94_muon's wd = 2e-6 x batch size, divided by each group's learning rate.
DECAY_PER_STEP = 2e-6 * 2000


def get_config():
  # airbench94's network, data, augmentation, loss and test-time augmentation; the rest differs.
  config = cifar10_airbench94.get_config()
  config.model.airbench.output_scale = 1 / 256
  config.model.airbench.head_unit_std = True
  config.model.dtype = "bfloat16"
  config.batch_size = 2000
  config.num_epochs = 8
  config.schedule.name = "linear"
  # PyTorch's own units (not airbench94's decoupled ones): the head's group sets the base.
  config.optim.decoupled_hyperparameters = False
  config.optim.learning_rate = HEAD_LR
  config.optim.weight_decay = DECAY_PER_STEP / HEAD_LR
  config.optim.momentum = 0.85
  config.optim.offset_lr_multiplier = BIAS_LR / HEAD_LR
  config.optim.lr_multipliers = (("whiten/bias", BIAS_LR / HEAD_LR),)
  config.freeze.late_schedule = "linear_to_zero"
  config.lookahead.every_steps = 0
  config.muon.parameters = ("group1", "group2", "group3")
  config.muon.learning_rate = 0.24
  config.muon.momentum = 0.6
  config.muon.nesterov = True
  return config
