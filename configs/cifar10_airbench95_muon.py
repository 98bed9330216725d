"""airbench95's network trained with airbench94_muon's optimiser: not a published recipe, this
project's try at 95% in fewer FLOPs than airbench95 (issue 38, "a faster 95%"). The network is
airbench95's (conv groups of 128, 384, 384 channels; `configs/cifar10_airbench95.py`); the rest
is airbench94_muon's (`configs/cifar10_airbench94_muon.py`): Muon on the groups' kernels, Nesterov
SGD on the head, offsets and whitening bias, batch 2,000, linear decay to 0, no lookahead. Two
things follow the wider head: the logits are divided by its width (384, as airbench94_muon
divides by its 256), and the epochs are airbench95's 15 cut in the ratio Muon cut airbench94's
(8 / 9.9, so 12). The dtype is "auto", as airbench95's. Measured in docs/resnets.md."""

from configs import cifar10_airbench94_muon
from configs import cifar10_airbench95

# airbench94 trains 9.9 epochs, airbench94_muon 8 for the same 94%: the same cut of airbench95's.
EPOCHS = 12.0


def get_config():
  config = cifar10_airbench94_muon.get_config()
  widths = tuple(cifar10_airbench95.get_config().model.airbench.widths)
  config.model.airbench.widths = widths
  config.model.airbench.output_scale = 1 / widths[-1]
  config.model.dtype = "auto"
  config.num_epochs = EPOCHS
  return config
