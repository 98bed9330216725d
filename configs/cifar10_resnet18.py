"""ResNet-18 on all of CIFAR-10, as the PyTorch tutorial trains it: augmentation, SGD with
momentum 0.9 and weight decay 5e-4, lr 0.1 divided by 10 at epochs 100 and 150, 200 epochs."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.model.name = "resnet18"
  config.data.classes = tuple(range(10))
  config.augment.enabled = True
  config.num_epochs = 200
  config.schedule.name = "step"
  config.schedule.boundaries_epochs = (100, 150)
  config.schedule.decay_factor = 0.1
  config.optim.weight_decay = 5e-4
  return config
