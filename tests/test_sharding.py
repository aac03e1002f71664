"""The mesh and the partition rules, without a model."""

from __future__ import annotations

import jax
import pytest

from starcoder_lsp import sharding


def test_mesh_strings():
    assert sharding.parse_mesh_shape("2x4", 8) == (2, 4)
    assert sharding.parse_mesh_shape("auto", 8) == (1, 8)
    with pytest.raises(sharding.MeshError, match="DPxMP"):
        sharding.parse_mesh_shape("four", 8)
    with pytest.raises(sharding.MeshError, match="needs 16 devices"):
        sharding.make_mesh("4x4")


def test_a_dimension_that_does_not_divide_is_replicated():
    mesh = sharding.make_mesh("1x8")
    assert sharding.param_spec("h_3/mlp/c_fc/kernel", (64, 16), mesh) == sharding.P("mp", None)
    assert sharding.param_spec("h_0/attn/q_proj/kernel", (100, 16), mesh) == sharding.P()
    assert sharding.param_spec("ln_f/scale", (64,), mesh) == sharding.P()
    assert len(jax.devices()) >= 8
