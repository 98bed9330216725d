"""airbench94 on all of CIFAR-10: 94% test accuracy (with test-time augmentation) in 9.9 epochs,
the recipe of KellerJordan/cifar10-airbench `legacy/airbench94.py`: batch 1024 (the short last
batch dropped), Nesterov SGD with momentum 0.85 and airbench's decoupled learning rate 11.5 and
weight decay 0.0153 on a summed, label-smoothed (0.2) loss, the BatchNorm offsets at 64x the
learning rate, warm-up over 23% of the steps from 0.2x then linear decay to 0.07x, lookahead
every 5 steps, alternating flips and 2-pixel reflect-padded translations, the whitening bias
trained for 3 epochs, and six-view test-time augmentation. Evaluation in batches of 2,000 with
batch statistics (see docs/resnets.md)."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.model = "airbench94"
  config.classes = tuple(range(10))
  config.batch_size = 1024
  config.drop_last_batch = True
  config.eval_batch_size = 2000
  config.num_epochs = 9.9
  config.augment = True
  config.augment_translate = 2
  config.augment_padding = "reflect"
  config.augment_flip = "alternate"
  config.test_time_augmentation = "mirror_translate"
  config.label_smoothing = 0.2
  config.loss_reduction = "sum"
  config.schedule = "warmup_linear"
  config.warmup_fraction = 0.23
  config.warmup_start_factor = 0.2
  config.final_lr_factor = 0.07
  config.decoupled_hyperparameters = True
  config.learning_rate = 11.5
  config.weight_decay = 0.0153
  config.momentum = 0.85
  config.nesterov = True
  config.offset_lr_multiplier = 64.0
  config.frozen_parameters = ("whiten/kernel",)
  config.late_frozen_parameters = ("whiten/bias",)
  config.late_freeze_epochs = 3
  config.lookahead_every_steps = 5
  config.lookahead_decay = 0.95**5
  config.lookahead_power = 3.0
  return config
