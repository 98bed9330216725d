"""Test-time augmentation (`config.eval.test_time_augmentation`): the evaluation's logits as the
weighted sum of the logits of several views of each test batch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (view, weight) pairs, airbench's weighting. "mirror": the image and its mirror image, 1/2
# each. "mirror_translate": half of that weight, and the other half to the mirror pairs of the
# image translated by one pixel (reflect padding) up-left and down-right: 1/4 + 1/4 + 4 x 1/8.
LEVELS = ("none", "mirror", "mirror_translate")


def views(images: jax.Array, level: str) -> list[tuple[jax.Array, float]]:
  """The weighted views of a batch of NHWC images for test-time augmentation `level`; the first
  is always the images as they are (`plain_and_augmented_logits` relies on it)."""
  if level == "none":
    return [(images, 1.0)]

  def mirrored(x, weight):
    return [(x, weight / 2), (x[:, :, ::-1, :], weight / 2)]

  if level == "mirror":
    return mirrored(images, 1.0)
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  shifted = [padded[:, :height, :width], padded[:, 2:height + 2, 2:width + 2]]
  return mirrored(images, 0.5) + [view for x in shifted for view in mirrored(x, 0.25)]


def logits(params, apply_fn: Callable, images: jax.Array, level: str) -> jax.Array:
  """The weighted sum of the logits of the views of `views`; each view is its own batch
  (so BatchNorm normalises it with its own statistics)."""
  return plain_and_augmented_logits(params, apply_fn, images, level)[1]


def plain_and_augmented_logits(params, apply_fn: Callable, images: jax.Array,
                               level: str) -> tuple[jax.Array, jax.Array]:
  """The logits of the images as they are, and `logits`: one pass over the views gives both,
  as the first view is the images themselves (an evaluation with test-time augmentation then
  costs its views alone, not one more pass for the plain accuracy)."""
  view_logits = [(apply_fn({"params": params}, view), weight)
                 for view, weight in views(images, level)]
  return view_logits[0][0], sum(weight * logits for logits, weight in view_logits)
