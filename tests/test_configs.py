"""Configs: every file builds, passes the trainer's checks, and matches the official recipe."""

import importlib

import pytest

from bam_jax import config_checks


@pytest.mark.parametrize("name", ["default", "vit_s", "vit_b"])
def test_config_files_pass_the_pretraining_checks(name):
    config_checks.check_pretrain_config(importlib.import_module(f"configs.{name}").get_config())


def test_vit_configs_follow_the_official_slurm_scripts():
    for name, variant in (("vit_s", "small"), ("vit_b", "base")):
        config = importlib.import_module(f"configs.{name}").get_config()
        assert config.model.vit_variant == variant
        assert (config.batch_size, config.num_epochs) == (4096, 400)
        assert config.optimizer.base_lr * config.batch_size / 256 == pytest.approx(4.8e-3)
        assert (config.optimizer.min_lr, config.optimizer.warmup_epochs) == (1e-3, 40)
        assert (config.optimizer.weight_decay, config.optimizer.weight_decay_final) == (0.04, 0.4)
        assert config.optimizer.clip_grad == 0.3
        assert config.data.global_crops_scale == (0.25, 1.0)
        assert config.data.local_crops_scale == (0.05, 0.25)
        assert (config.data.global_crops_number, config.data.local_crops_number) == (2, 6)
        projector = config.model.projector
        assert (projector.n_layers, projector.hidden_dim, projector.out_dim) == (3, 4096, 4096)
        assert (projector.act, projector.use_bn, projector.bias) == ("gelu", False, True)
        assert config.teacher.enabled and config.teacher.momentum == 0.995
        loss = config.loss
        assert (loss.sinkhorn_reg, loss.temperature, loss.sinkhorn_iters) == (0.05, 0.1, 3)
        assert (loss.top_k, loss.num_target_crops) == (128, 2)
        assert config.model.drop_path_rate == 0.0
        assert config.data.tfds_name == "imagenet2012"
        # --use_ccrop (default true), --loc_interval 40, --box_thresh / --ccrop_alpha defaults,
        # --ccrop_img_size None (224), --knn_train_fraction default 0.1, --knn_freq 16.
        ccrop = config.ccrop
        assert (ccrop.enabled, ccrop.loc_interval, ccrop.box_thresh, ccrop.alpha) == (
            True, 40, 0.1, 0.6)
        assert (ccrop.image_size or config.data.global_crop_size) == 224
        assert (config.knn.train_fraction, config.knn.every_epochs) == (0.1, 16)
        assert config.seed == 1

