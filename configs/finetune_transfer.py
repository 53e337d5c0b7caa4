"""Transfer learning: fine-tuning a BAM ViT on a small classification dataset, with the recipe
DINO and iBOT used for their transfer table: DeiT's fine-tuning (Touvron et al. 2021, Sec. 7.2)
without layer-wise decay, a small learning rate and a long schedule, at 224 px.

python -m bam_jax.evals.finetune --config=configs/finetune_transfer.py:cifar10 \
    --config.pretrained_workdir=gs://BUCKET/bam_vit_s --workdir=gs://BUCKET/bam_vit_s_cifar10 \
    --config.data.data_dir=gs://BUCKET/tfds

The argument after the colon names the dataset (default cifar10): cifar10, cifar100,
oxford_flowers102, oxford_iiit_pet, cars196, food101, i_naturalist2018. Any other tfds
classification dataset: --config.data.tfds_name=NAME with its splits; the class count is read
from the dataset.
"""

from configs import finetune

# tfds name -> (train split, held-out split, epochs, lr). The lrs are iBOT's transfer scripts'
# (DeiT's convention lr x batch / 512, at batch 768), halved here for our lr x batch / 256.
# Flowers: iBOT trains on train + validation (2,040 images); tfds' "train" alone (1,020) here.
DATASETS = {
    "cifar10": ("train", "test", 1000, 5e-6 / 2),
    "cifar100": ("train", "test", 1000, 7.5e-6 / 2),
    "oxford_flowers102": ("train", "test", 1000, 7.5e-5 / 2),
    "oxford_iiit_pet": ("train", "test", 1000, 7.5e-5 / 2),  # as Flowers / Cars
    "cars196": ("train", "test", 1000, 7.5e-5 / 2),
    "food101": ("train", "validation", 1000, 7.5e-6 / 2),  # as CIFAR-100 (101 classes, 75k)
    "i_naturalist2018": ("train", "validation", 360, 3e-5 / 2),
}


def get_config(dataset: str = "cifar10"):
    if dataset not in DATASETS:
        raise ValueError(f"unknown transfer dataset {dataset!r}; use one of "
                         f"{', '.join(DATASETS)}, or --config.data.tfds_name for another")
    train_split, eval_split, epochs, lr = DATASETS[dataset]
    config = finetune.get_config()
    config.batch_size = 768  # iBOT / DeiT transfer: 8 GPUs x 96
    config.eval_batch_size = 768
    config.num_epochs = epochs
    config.layer_decay = 1.0  # "w/o layerwise decay"
    config.optimizer.update(base_lr=lr, warmup_epochs=5)  # DeiT: 5 warmup epochs
    config.data.update(tfds_name=dataset, eval_train_split=train_split, eval_split=eval_split)
    config.eval_every_epochs = 10.0
    return config
