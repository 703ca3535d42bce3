"""Lazy, quiet import of TensorFlow and tensorflow-datasets.

TensorFlow is only used on the host to build and read datasets: it must not log noise
and must never reserve GPU memory that JAX needs.
"""

import functools
import importlib
import importlib.resources
import importlib.resources.abc  # noqa: F401  (makes `.abc` an attribute for the alias below)
import os
import sys


@functools.cache
def tfds():
    """Returns the `tensorflow_datasets` module, importing TensorFlow quietly once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _shim_importlib_resources()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.get_logger().setLevel("ERROR")
    import logging

    # tfds logs through absl (e.g. "Variant folder ... has no dataset_info.json" after a
    # failed download): keep its warnings off the user's one-line error.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import tensorflow_datasets

    tensorflow_datasets.disable_progress_bar()  # the embedded datasets build in about a second
    return tensorflow_datasets


def _shim_importlib_resources() -> None:
    """tensorflow-datasets 4.9.10 imports the `importlib_resources` backport (only to use
    `importlib_resources.abc.Traversable`), which etils>=1.15 no longer installs; every
    builder defined in a package then fails in `download_and_prepare`. The standard
    library's `importlib.resources` has the same `abc.Traversable`, so alias it if absent."""
    try:
        importlib.import_module("importlib_resources")
    except ModuleNotFoundError:
        sys.modules["importlib_resources"] = importlib.resources
