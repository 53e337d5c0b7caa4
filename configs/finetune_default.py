"""Semi-supervised fine-tuning of the embedded default's backbone (configs/default.py) on 1 % of
the labelled training digits (40; 10 %: --config.label_fraction=0.1), evaluated on the 1,000
held-out digits.

python -m bam_jax.evals.finetune --config=configs/finetune_default.py \
    --config.pretrained_workdir=workdirs/default --workdir=workdirs/default_finetune_1pct
python -m bam_jax.evals.finetune --config=configs/finetune_default.py --config.random_init=True \
    --workdir=workdirs/random_finetune_1pct
"""

from configs import default, finetune


def get_config():
    config = finetune.get_config()
    config.pretrain = default.get_config()
    config.dtype = "float32"
    config.label_fraction = 0.01
    config.batch_size = 40  # every labelled digit of 1 % in each step
    config.eval_batch_size = 200
    config.num_train_steps = 150
    config.optimizer.update(base_lr=1e-1, warmup_epochs=10, min_lr=1e-6)
    config.layer_decay = 0.75
    config.drop_path_rate = 0.0
    # Digits: no flips, no colour; whole-digit crops with small shifts; no mixing of digits.
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.data = default.get_config().data
    config.data.update(global_crops_scale=(0.6, 1.0), flip_prob=0.0, blur_probs=(0.0, 0.0, 0.0))
    config.eval_every_epochs = 50.0
    config.log_every_steps = 25
    config.checkpoint_every_steps = 150
    return config
