"""Loading checkpoints: sharded files, placement on a mesh, and every error a user can meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from starcoder_lsp import checkpoint
from starcoder_lsp.config import PRESETS, ModelConfig
from starcoder_lsp.errors import CheckpointError, TokenizerError
from starcoder_lsp.random_model import write_random_model


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _leaves(params: dict) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_sharded_checkpoint_loads_the_same_params(tmp_path, tiny_mqa_dir):
    config = PRESETS["test-tiny"]
    sharded = write_random_model(tmp_path / "sharded", config, seed=0, max_shard_bytes=60_000)
    index = json.loads((sharded / checkpoint.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / checkpoint.SINGLE_FILE).exists()
    single = write_random_model(tmp_path / "single", config, seed=0)
    a = checkpoint.load(sharded)
    b = checkpoint.load(single)
    assert a.config == b.config
    for x, y in zip(_leaves(a.params), _leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_params_are_placed_on_their_shardings(tiny_mqa_dir):
    from starcoder_lsp import sharding

    mesh = sharding.make_mesh("1x1")
    ckpt = checkpoint.load(tiny_mqa_dir, mesh)
    embedding = ckpt.params["wte"]["embedding"]
    assert embedding.sharding.spec == sharding.param_spec("wte/embedding", mesh, ckpt.config)
    assert f"h_{ckpt.config.n_layer - 1}" in ckpt.params and "h_0" in ckpt.params
    assert ckpt.load_seconds > 0


def test_special_tokens_are_looked_up_by_name(tiny_mqa_dir):
    tokenizer, tokens = checkpoint.load_tokenizer(tiny_mqa_dir)
    vocab = tokenizer.get_vocab()
    assert tokens.fim_prefix == vocab["<fim_prefix>"]
    assert tokens.fim_suffix == vocab["<fim_suffix>"]
    assert tokens.fim_middle == vocab["<fim_middle>"]
    assert tokens.eos == vocab["<|endoftext|>"]
    assert tokens.filename == vocab["<filename>"]
    assert tokens.file_sep is None  # a StarCoder (1) tokenizer has none
    assert set(tokens.stop_ids) >= {tokens.eos, tokens.fim_prefix, tokens.fim_middle}


def test_santacoder_spelling_is_found():
    class Fake:
        def get_vocab(self) -> dict[str, int]:
            return {
                "<|endoftext|>": 49152,
                "<fim-prefix>": 49153,
                "<fim-middle>": 49154,
                "<fim-suffix>": 49155,
                "<fim-pad>": 49156,
            }

    tokens = checkpoint.special_tokens(Fake())
    assert (tokens.fim_prefix, tokens.fim_middle, tokens.fim_suffix) == (49153, 49154, 49155)


# --- errors ------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        checkpoint.load(tmp_path / "nope" / "here")


def test_a_file_instead_of_a_directory(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        checkpoint.load(tmp_path / "f.bin")


def test_missing_config(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(directory)


def test_other_model_type(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    data = json.loads((directory / "config.json").read_text())
    data["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'llama'.*gpt_bigcode"):
        checkpoint.load(directory)


def test_shape_that_does_not_match_the_config(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    data = json.loads((directory / "config.json").read_text())
    data["n_inner"] = data["n_inner"] * 2
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=r"mlp.c_fc.weight has shape \[256, 64\].*\[512, 64\]"
    ):
        checkpoint.load(directory)


def test_missing_weights_file(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    (directory / checkpoint.SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        checkpoint.load(directory)


def test_pytorch_bin_only_says_how_to_convert(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    (directory / checkpoint.SINGLE_FILE).rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="(?s)PyTorch .bin.*save_pretrained"):
        checkpoint.load(directory)


def test_index_naming_a_missing_shard(tmp_path):
    directory = write_random_model(tmp_path / "s", PRESETS["test-tiny"], max_shard_bytes=60_000)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names {shard.name}, which is missing"):
        checkpoint.load(directory)


def test_tokenizer_without_fim_tokens(tmp_path, tiny_mqa_dir):
    directory = _copy(tiny_mqa_dir, tmp_path)
    for f in directory.glob("*token*"):
        f.unlink()
    plain = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2}, merges=[]))
    PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<|endoftext|>").save_pretrained(
        directory
    )
    with pytest.raises(TokenizerError, match="lacks <fim_prefix>, <fim_middle>, <fim_suffix>"):
        checkpoint.load(directory)


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not be fetched"):
        checkpoint.resolve("bigcode/no-such-model-here")


def test_config_aliases_and_defaults():
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "gpt_bigcode",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 100,
            "n_inner": None,
        }
    )
    assert (config.n_embd, config.n_layer, config.n_head) == (64, 2, 4)
    assert config.inner_dim == 256  # n_inner null means 4·n_embd
    with pytest.raises(CheckpointError, match="not supported"):
        ModelConfig(activation_function="tanh-ish")
