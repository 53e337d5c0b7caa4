"""The official ViT recipe's structure at laptop scale: BAM on the bundled MNIST digits.

    python -m bam_jax.main --config=configs/vit_digits.py --workdir=workdirs/vit_digits

What ImageNet users run (configs/vit_s.py), shrunk to 28-pixel digits on a 2-core CPU: a ViT
(patch 4, so 7 x 7 tokens), 2 global crops and local crops (16 px: 4 x 4 tokens, the position
table resampled as the official ViT does), the EMA teacher, AdamW with the official warmup +
cosine schedules, weight decay 0.04 -> 0.4 and clipping 0.3. docs/recipes.md says what differs
from the official recipe and why; README.md has the measured result.
"""

from configs import common, default


def get_config():
    digits = default.get_config()
    config = common.base_config()
    config.seed = 0
    config.batch_size = 128
    config.num_epochs = 30
    config.data = digits.data  # the default's digits and crops: 4 local crops of 16 px
    config.model = common.model_config(
        backbone="vit", vit_variant="custom", width=128, depth=4, num_heads=4, patch_size=4,
        dtype="float32",
        projector=dict(n_layers=3, hidden_dim=512, out_dim=256, act="gelu", use_bn=True,
                       last_bn=True, bias=True))
    config.loss.update(sinkhorn_reg=0.02, sinkhorn_reg_final=0.02, sinkhorn_reg_ramp_epochs=0,
                       top_k=16)
    config.teacher.update(enabled=True, momentum=0.99, momentum_final=1.0)
    config.optimizer.update(base_lr=1e-3, min_lr=1e-5, warmup_epochs=3)
    config.knn = digits.knn  # the whole 4,000-digit bank
    config.ccrop.enabled = False  # a digit fills its image: nothing to localise
    config.log_every_steps = 10
    config.checkpoint_every_steps = 200
    return config
