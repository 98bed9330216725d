"""A CPU-sized taste of the ResNet-18 run: the same network and recipe (all ten classes,
augmentation, SGD momentum 0.9, weight decay 5e-4, step decay) on the first 2,560 training
images for 4 epochs of 40 steps of 64 (160 steps), the lr divided by 10 before the last epoch,
evaluated on the first 512 test images. About 9 minutes on a 2-core CPU (a batch-64 step of the
full-width ResNet-18 takes ~3 s there)."""

from configs import cifar10_resnet18 as resnet18_lib


def get_config():
  config = resnet18_lib.get_config()
  config.data.max_train_examples = 2_560  # 40 full batches of 64: no short last batch to compile
  config.data.max_test_examples = 512  # 4 evaluation batches of 128
  config.batch_size = 64
  config.num_epochs = 4
  config.schedule.boundaries_epochs = (3,)
  # The tutorial's 0.1 is for 391-step epochs of 128: at batch 64 it (and 0.05) makes the first
  # tens of steps blow up (losses of 3 to 12, measured), which a 160-step run cannot outlive;
  # 0.02 descends from the first step.
  config.optim.learning_rate = 0.02
  return config
