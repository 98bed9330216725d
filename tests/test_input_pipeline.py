"""The CIFAR-10 readers on tiny generated files, and the tfds path under tfds' own mocking."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import write_records
from configs import default as default_config
import built
from convnet_jax.data import input_pipeline
from convnet_jax.errors import UserError


def _config(data_dir="", overrides=None):
  config = default_config.get_config()
  config.data.dir = str(data_dir)
  return built.with_values(config, overrides or {})


def test_reads_records_as_nhwc_images_and_labels(tmp_path):
  images = write_records(tmp_path / "batch.bin", [3, 9, 0])
  got_images, got_labels = input_pipeline.read_binary_file(tmp_path / "batch.bin")
  np.testing.assert_array_equal(got_labels, [3, 9, 0])
  np.testing.assert_array_equal(got_images, images)
  assert got_images.dtype == np.uint8 and got_images.shape == (3, 32, 32, 3)


def test_pixel_layout_is_planes_of_rows(tmp_path):
  record = np.zeros(3073, np.uint8)
  record[0] = 1
  record[1 + 0 * 1024 + 2 * 32 + 5] = 200  # red plane, row 2, column 5
  record[1 + 2 * 1024 + 31] = 77  # blue plane, row 0, column 31
  record.tofile(tmp_path / "one.bin")
  images, _ = input_pipeline.read_binary_file(tmp_path / "one.bin")
  assert images[0, 2, 5, 0] == 200 and images[0, 0, 31, 2] == 77
  assert images.sum() == 277


def test_class_filter_keeps_order_and_relabels_in_given_order():
  images = np.arange(6)[:, None] * np.ones((6, 4), np.uint8)
  labels = np.array([5, 2, 7, 2, 5, 0])
  kept_images, new_labels = input_pipeline.select_classes(images, labels, (5, 2))
  np.testing.assert_array_equal(kept_images[:, 0], [0, 1, 3, 4])
  np.testing.assert_array_equal(new_labels, [0, 1, 1, 0])


def test_load_dataset_filters_and_normalises_with_training_statistics(tiny_cifar_dir):
  data = input_pipeline.load_dataset(_config(tiny_cifar_dir, {"data.classes": (1, 0)}).data)
  # Independently: gather the generated records of classes 0 and 1 in file order.
  train_images, train_labels = [], []
  for index in range(1, 6):
    images, labels = input_pipeline.read_binary_file(tiny_cifar_dir / f"data_batch_{index}.bin")
    keep = labels <= 1
    train_images.append(images[keep])
    train_labels.append(1 - labels[keep])  # class 1 -> 0, class 0 -> 1
  train_images = np.concatenate(train_images)
  np.testing.assert_array_equal(data.train_labels, np.concatenate(train_labels))
  assert len(data.train_labels) == 17 and len(data.test_labels) == 4
  np.testing.assert_array_equal(data.test_labels, [0, 1, 0, 1])
  pixels = train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(data.mean, pixels.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(data.std, pixels.std(axis=0), rtol=1e-6)  # population std
  normalised = np.asarray(input_pipeline.normalize(data.train_images, data.mean, data.std))
  np.testing.assert_allclose(normalised.reshape(-1, 3).mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(normalised.reshape(-1, 3).std(axis=0), 1, atol=1e-5)
  assert data.class_names == ("automobile", "airplane")


def test_max_examples_take_the_first_ones(tiny_cifar_dir):
  data = input_pipeline.load_dataset(_config(tiny_cifar_dir, {
      "data.max_train_examples": 5, "data.max_test_examples": 2}).data)
  full = input_pipeline.load_dataset(_config(tiny_cifar_dir).data)
  np.testing.assert_array_equal(data.train_images, full.train_images[:5])
  np.testing.assert_array_equal(data.test_labels, full.test_labels[:2])


def test_truncated_file_is_rejected_with_its_name(tiny_cifar_dir):
  path = tiny_cifar_dir / "data_batch_3.bin"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(input_pipeline.DataError, match="data_batch_3.bin.*whole number"):
    input_pipeline.check_binary_files(tiny_cifar_dir)


def test_bad_label_is_rejected_with_its_record(tiny_cifar_dir):
  write_records(tiny_cifar_dir / "test_batch.bin", [1, 0, 12])
  with pytest.raises(input_pipeline.DataError, match="test_batch.bin: record 2 has label 12"):
    input_pipeline.load_dataset(_config(tiny_cifar_dir).data)


def test_missing_file_and_folder_are_named(tiny_cifar_dir):
  (tiny_cifar_dir / "data_batch_5.bin").unlink()
  with pytest.raises(input_pipeline.DataError, match="data_batch_5.bin: file not found"):
    input_pipeline.check_binary_files(tiny_cifar_dir)
  with pytest.raises(UserError, match="config.data.dir.*not a folder"):
    input_pipeline.check_binary_files(tiny_cifar_dir / "nowhere")


def test_tfds_path_under_tfds_mocking():
  with tfds.testing.mock_data(num_examples=12):
    data = input_pipeline.load_dataset(_config(
        "", {"data.classes": tuple(range(10)), "data.source": "tfds"}).data)
  assert data.train_images.shape == (12, 32, 32, 3) and data.train_images.dtype == np.uint8
  assert data.test_images.shape == (12, 32, 32, 3)
  assert data.train_labels.dtype == np.int32
  assert set(data.train_labels.tolist()) <= set(range(10))
  pixels = data.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(data.std, pixels.std(axis=0), rtol=1e-6)
