"""airbench95 on all of CIFAR-10: 95% test accuracy (with test-time augmentation) in 15 epochs,
the recipe of KellerJordan/cifar10-airbench `legacy/airbench95.py` (95.01% mean over 200 runs,
10.4 s and 1.4 PFLOP on an A100): airbench94's recipe (`configs/cifar10_airbench94.py`) with
wider conv groups (128, 384, 384 channels instead of 64, 256, 256), 15 epochs instead of 9.9
and the decoupled learning rate 10.0 instead of 11.5; everything else unchanged.

The dtype is "auto" (`conv.choose_dtype`): the convolutions in bfloat16 where that is faster (GPU,
TPU, CPUs with AVX512_BF16 or AMX), in float32 elsewhere (where bfloat16 runs float32 kernels no
faster); BatchNorm, the loss and the parameters stay float32 either way. The start-up line says
which; `--config.model.dtype=float32` or `bfloat16` fixes it."""

from configs import cifar10_airbench94


def get_config():
  config = cifar10_airbench94.get_config()
  config.num_epochs = 15.0
  config.model.airbench.widths = (128, 384, 384)
  config.optim.learning_rate = 10.0
  config.model.dtype = "auto"
  return config
