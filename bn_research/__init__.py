"""bn_research: a JAX/Flax framework for doing science on batch normalization."""

import os as _os

# TensorFlow is used only on the host to build and read tensorflow-datasets; keep its C++
# start-up logging (and the oneDNN banner) out of the user's terminal.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
