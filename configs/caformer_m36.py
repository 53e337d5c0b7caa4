"""CAFormer-M36 BAM pretraining on ImageNet: the official scripts/pretrain/caformer_m36.slurm.

That script is vit_small.slurm with `--arch caformer_m36` and `--grad_checkpointing 4`; its
`--qkv_bias true` and `--drop_path_rate 0.` do not reach a CAFormer (`utils.get_arch` passes
neither), so the builder's defaults hold: no qkv bias, no drop path.

python -m bam_jax.main --config=configs/caformer_m36.py --workdir=gs://BUCKET/bam_caformer_m36 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
    config = common.base_config()
    config.model.backbone = "caformer"
    config.model.caformer.variant = "m36"
    config.model.caformer.remat_every = 4  # --grad_checkpointing 4
    return config
