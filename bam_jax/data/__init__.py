"""Input data on the host (TensorFlow): sources, multi-crop augmentation, train and eval streams.

The only part of bam_jax that imports TensorFlow; it is quiet by default (TF_CPP_MIN_LOG_LEVEL).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_quietly() -> None:
    """TensorFlow's C++ logs at import go through absl before `absl::InitializeLog()`, when absl
    ignores TF_CPP_MIN_LOG_LEVEL; so stderr (fd 2) points at /dev/null while it loads, unless
    TF_CPP_MIN_LOG_LEVEL=0 asks for everything. Python errors still surface as exceptions."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401, PLC0415
        import tensorflow_datasets  # noqa: F401, PLC0415
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()
