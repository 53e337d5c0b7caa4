"""ViT-S/16 BAM pretraining on ImageNet: the official scripts/pretrain/vit_small.slurm.

python -m bam_jax.main --config=configs/vit_s.py --workdir=gs://BUCKET/bam_vit_s \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
    config = common.base_config()
    config.model.vit_variant = "small"
    return config
