"""The mesh, the batch and state shardings, and host batches turned into global device arrays."""

import logging

import jax
import ml_collections
import numpy as np
import pytest

from bam_jax import sharding


def _mesh(num_devices=0, fsdp=1):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(
        mesh=dict(num_devices=num_devices, fsdp=fsdp))))


def _host_batches(batch_size, n=3):
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(batch_size, 4, 4, 1)).astype(np.float32),
             "label": np.arange(batch_size, dtype=np.int32) + i * batch_size} for i in range(n)]


@pytest.mark.parametrize("fsdp", [1, 2])
def test_device_iterator_splits_the_batch_over_every_device(fsdp):
    mesh = _mesh(fsdp=fsdp)
    host = _host_batches(16)
    batches = list(sharding.device_iterator(host, mesh))
    assert len(batches) == 3
    for expected, batch in zip(host, batches):
        assert batch["image"].sharding == sharding.batch_sharding(mesh)
        assert len(batch["image"].addressable_shards) == 8
        assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 4, 4, 1)}
        np.testing.assert_array_equal(jax.device_get(batch["label"]), expected["label"])
        np.testing.assert_array_equal(jax.device_get(batch["image"]), expected["image"])


def test_device_iterator_rejects_a_batch_the_devices_do_not_divide():
    with pytest.raises(ValueError, match="batch size 12 does not divide by the 8 devices .* "
                                         "multiple of 8"):
        next(sharding.device_iterator(_host_batches(12), _mesh()))


def test_make_mesh_refuses_an_fsdp_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="config.mesh.fsdp=3 must divide the 8 devices"):
        _mesh(fsdp=3)
    assert _mesh(num_devices=4, fsdp=2).shape == {"data": 2, "fsdp": 2}


def test_state_shardings_split_large_leaves_and_name_those_they_cannot(caplog):
    mesh = _mesh(fsdp=4)
    state = {"kernel": jax.ShapeDtypeStruct((6, 64), np.float32),
             "odd": jax.ShapeDtypeStruct((7, 9), np.float32),
             "bias": jax.ShapeDtypeStruct((32,), np.float32)}
    with caplog.at_level(logging.WARNING, logger="bam_jax.sharding"):
        shardings = sharding.state_shardings(state, mesh, fsdp_min_size=60)
    assert shardings["kernel"].spec == jax.P(None, "fsdp")  # the largest dimension 4 divides
    assert shardings["odd"].spec == jax.P(None, None)
    assert shardings["bias"].spec == jax.P(None)  # below the size threshold: replicated
    assert [r.getMessage() for r in caplog.records] == [
        "['odd'] (7, 9) stays replicated: no dimension divides by fsdp=4"]
