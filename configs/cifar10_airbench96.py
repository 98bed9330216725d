"""airbench96 on all of CIFAR-10: 96% test accuracy (with test-time augmentation) in 37 epochs,
the recipe of KellerJordan/cifar10-airbench `legacy/airbench96.py` (96.03% mean over 400 runs,
34.7 s and 4.9 PFLOP on an A100), on airbench94's (`configs/cifar10_airbench94.py`):

* the network: conv groups of 128, 384 and 512 channels, each of three convolutions with a
  residual over the last two (10 conv layers in all);
* the augmentation: translations of up to 4 pixels (reflect-padded) and alternating flips, then a
  12-pixel cutout in every image;
* the optimiser: the decoupled learning rate 9.0 and weight decay 0.012, 10% of the steps of
  warm-up from 0.2x, then linearly to 0 after the last step; 37 epochs;
* the dtype "auto", as airbench95's config (`configs/cifar10_airbench95.py`);
* the same label smoothing, BatchNorm offsets at 64x the learning rate, Nesterov momentum 0.85,
  lookahead, whitening (its bias trained for 3 epochs) and six-view test-time augmentation.

airbench96 evaluates with BatchNorm's running averages (momentum 0.1 in PyTorch's convention):
the statistics of recent training batches, cut out and translated as training augments them.
This project's BatchNorm keeps no running averages (it normalises with the statistics of the
batch at hand); the recipe evaluates with precise BatchNorm statistics of ~10,000 training
images augmented as in training (`eval.batch_norm_statistics="augmented"`). The cutout moves
the statistics: each test batch's own statistics cost 0.4-0.5 points (docs/resnets.md)."""

from configs import cifar10_airbench94


def get_config():
  config = cifar10_airbench94.get_config()
  config.num_epochs = 37.0
  config.model.airbench.widths = (128, 384, 512)
  config.model.airbench.convs_per_group = 3
  config.augment.translate = 4
  config.augment.cutout = 12
  config.optim.learning_rate = 9.0
  config.optim.weight_decay = 0.012
  config.schedule.warmup_fraction = 0.1
  config.schedule.warmup_start_factor = 0.2
  config.schedule.final_lr_factor = 0.0
  config.model.dtype = "auto"
  config.eval.batch_norm_statistics = "augmented"
  return config
