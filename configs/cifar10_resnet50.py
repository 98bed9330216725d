"""ResNet-50 (bottleneck blocks) on all of CIFAR-10, with the ResNet-18 run's recipe:
augmentation, SGD with momentum 0.9 and weight decay 5e-4, lr 0.1 divided by 10 at epochs 100 and
150, 200 epochs."""

from configs import cifar10_resnet18 as resnet18_lib


def get_config():
  config = resnet18_lib.get_config()
  config.model.name = "resnet50"
  return config
