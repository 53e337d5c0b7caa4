"""Input data on the host (TensorFlow): sources, multi-crop augmentation, train and eval streams.

The only part of bam_jax that imports TensorFlow; it is quiet by default (TF_CPP_MIN_LOG_LEVEL).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
