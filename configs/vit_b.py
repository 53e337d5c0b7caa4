"""ViT-B/16 BAM pretraining on ImageNet: the official scripts/pretrain/vit_base.slurm.

python -m bam_jax.main --config=configs/vit_b.py --workdir=gs://BUCKET/bam_vit_b \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
    config = common.base_config()
    config.model.vit_variant = "base"
    config.model.remat = True  # the official script checkpoints blocks (--grad_checkpointing 4)
    return config
