"""The mesh and the partition rules, without a model."""

from __future__ import annotations

import jax
import pytest

from starcoder_lsp import sharding
from starcoder_lsp.config import PRESETS


def test_mesh_strings():
    assert sharding.parse_mesh_shape("2x4", 8) == (2, 4)
    assert sharding.parse_mesh_shape("auto", 8) == (1, 8)
    with pytest.raises(sharding.MeshError, match="DPxMP"):
        sharding.parse_mesh_shape("four", 8)
    with pytest.raises(sharding.MeshError, match="needs 16 devices"):
        sharding.make_mesh("4x4")


def test_heads_split_whole_or_not_at_all():
    """A split follows the count of heads (or rows), never cutting a head in two: the 3B
    StarCoder's 22 query heads do not divide 8 ways (their 2,816 rows would)."""
    mesh = sharding.make_mesh("1x8")
    spec = lambda path, config: sharding.param_spec(path, mesh, config)
    tiny = PRESETS["test-tiny"]  # 4 heads, 1 key/value head, MLP 256, vocabulary 1024
    assert spec("h_3/mlp/c_fc/kernel", tiny) == sharding.P("mp", None)
    assert spec("h_3/mlp/c_fc/scale", tiny) == sharding.P("mp")
    assert spec("wte/embedding", tiny) == sharding.P("mp", None)
    assert spec("h_0/attn/q_proj/kernel", tiny) == sharding.P()  # 4 heads, 8 devices
    assert spec("h_0/attn/kv_proj/kernel", tiny) == sharding.P()  # MQA: replicated
    assert spec("ln_f/scale", tiny) == sharding.P()
    big = PRESETS["starcoderbase-3b"]
    assert spec("h_0/attn/q_proj/kernel", big) == sharding.P()
    assert spec("h_0/attn/c_proj/kernel", big) == sharding.P()
    sc2 = PRESETS["starcoder2-7b"]  # 36 query heads, 4 key/value heads
    four = sharding.make_mesh("2x4")
    assert sharding.param_spec("h_0/attn/q_proj/kernel", four, sc2) == sharding.P("mp", None)
    assert sharding.param_spec("h_0/attn/kv_proj/kernel", four, sc2) == sharding.P("mp", None)
    assert sharding.param_spec("h_0/attn/kv_proj/kernel", mesh, sc2) == sharding.P()
    assert len(jax.devices()) >= 8
