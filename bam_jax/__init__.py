"""bam_jax: BAM (Balanced self-Attention Matching) pretraining in JAX/Flax.

Importing the package loads only the loss (jax alone), so that a user's own Flax codebase can
call `bam_jax.bam_loss` without TensorFlow or the trainer.
"""

from bam_jax.loss import (
    attention_matrices,
    bam_loss,
    bam_loss_and_metrics,
    sharded_bam_loss_and_metrics,
    sinkhorn_target,
)

__all__ = ["attention_matrices", "bam_loss", "bam_loss_and_metrics", "sharded_bam_loss_and_metrics", "sinkhorn_target"]
