"""End-to-end fine-tuning of a BAM ViT-B/16 on ImageNet: the BEiT / MAE fine-tuning recipe
(MAE, He et al. 2022, Table 9 and its main_finetune.py), which DINO, iBOT and the ViT SSL
literature fine-tune with.

python -m bam_jax.evals.finetune --config=configs/finetune.py --workdir=gs://BUCKET/bam_vit_b_ft \
    --config.pretrained_workdir=gs://BUCKET/bam_vit_b --config.data.data_dir=gs://BUCKET/tfds
Semi-supervised: add --config.label_fraction=0.01 (or 0.1): tfds imagenet2012_subset/1pct (10pct),
SimCLR's subsets. Transfer: --config.data.tfds_name=cifar10 --config.data.eval_split=test (any
tfds classification dataset; the class count is read from it), configs/finetune_transfer.py sets the recipe per dataset.
"""

import ml_collections

from configs import common, vit_b


def get_config():
    config = ml_collections.ConfigDict()
    config.pretrained_workdir = ""  # a `python -m bam_jax.main --workdir`; "" needs random_init
    config.use_teacher = True  # as the official eval_linear.py: the teacher's weights
    config.random_init = False  # True: the same backbone from scratch (the baseline row)
    # The pretraining config of the random-init backbone; replaced by DIR/config.json when
    # pretrained_workdir is set.
    config.pretrain = vit_b.get_config()
    config.backbone_dtype = "float32"  # how the pretrained checkpoint is read
    config.dtype = "bfloat16"  # the fine-tuned model's compute dtype (MAE: torch autocast)
    config.seed = 0
    # "finetune": every weight trained with a new head (below). "logistic_regression": DINO's
    # frozen protocol for 1 % / 10 % labels, a logistic regression on the frozen, L2-normalised
    # features of centre crops; `l2` the penalty on its weights (ours: no validation split to
    # tune it on), `steps` of L-BFGS.
    config.protocol = "finetune"
    config.logreg = ml_collections.ConfigDict(dict(l2=1e-4, steps=300))
    config.batch_size = 1024  # MAE: 1024
    config.eval_batch_size = 1024
    config.num_epochs = 100  # MAE ViT-B: 100
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.num_classes = 0  # 0: from the dataset
    config.label_fraction = 1.0  # < 1: a class-balanced subset (ImageNet: SimCLR's 1 % / 10 %)
    config.drop_path_rate = 0.1  # MAE ViT-B: 0.1
    config.layer_decay = 0.65  # MAE ViT-B: 0.65 (BEiT: 0.65); 1 disables
    config.label_smoothing = 0.1  # MAE / DeiT: 0.1
    config.mixup_alpha = 0.8  # MAE / DeiT: 0.8
    config.cutmix_alpha = 1.0  # MAE / DeiT: 1.0
    config.mix_switch_prob = 0.5  # DeiT: 0.5, CutMix instead of mixup
    config.ema = ml_collections.ConfigDict(dict(
        enabled=False, decay=0.9999))  # DeiT's --model-ema (off in MAE)
    # MAE: AdamW (0.9, 0.999), blr 5e-4 x batch / 256, weight decay 0.05, warmup 5 epochs,
    # cosine to 1e-6, no clipping.
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", base_lr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
        weight_decay_final=0.05, clip_grad=0.0, b1=0.9, b2=0.999, momentum=0.9))
    # DINO-style augmentation of one view instead of MAE's RandAugment (bam_jax has DINO's ops):
    # RandomResizedCrop(224, (0.08, 1)), flip, colour jitter, grayscale, light blur.
    config.data = common.data_config(
        eval_train_split="train", eval_split="validation", global_crop_size=224,
        global_crops_scale=(0.08, 1.0), flip_prob=0.5, color_jitter_prob=0.8, saturation=0.2,
        grayscale_prob=0.2, blur_probs=(0.1, 0.1, 0.1), solarize_prob=0.0,
        eval_resize=256, eval_crop_size=224)
    config.mesh = common.mesh_config()
    config.eval_every_epochs = 1.0  # may be a fraction
    common.set_loop_fields(config, log_every_steps=100, checkpoint_every_steps=1000,
                           keep_checkpoints=2)
    return config
