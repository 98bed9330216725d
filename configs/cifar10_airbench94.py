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
  config.batch_size = 1024
  config.num_epochs = 9.9
  config.model.name = "airbench94"
  config.data.classes = tuple(range(10))
  config.data.drop_last_batch = True
  config.augment.enabled = True
  config.augment.translate = 2
  config.augment.padding = "reflect"
  config.augment.flip = "alternate"
  config.optim.label_smoothing = 0.2
  config.optim.loss_reduction = "sum"
  config.optim.decoupled_hyperparameters = True
  config.optim.learning_rate = 11.5
  config.optim.weight_decay = 0.0153
  config.optim.momentum = 0.85
  config.optim.nesterov = True
  config.optim.offset_lr_multiplier = 64.0
  config.schedule.name = "warmup_linear"
  config.schedule.warmup_fraction = 0.23
  config.schedule.warmup_start_factor = 0.2
  config.schedule.final_lr_factor = 0.07
  config.freeze.parameters = ("whiten/kernel",)
  config.freeze.late_parameters = ("whiten/bias",)
  config.freeze.late_epochs = 3
  config.lookahead.every_steps = 5
  config.lookahead.decay = 0.95**5
  config.lookahead.power = 3.0
  config.eval.batch_size = 2000
  config.eval.test_time_augmentation = "mirror_translate"
  return config
