"""Random StarCoder checkpoints: tokenizer, weight layout against transformers, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import INIT_STD
from safetensors import safe_open
from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

from starcoder_lsp import random_tokenizer
from starcoder_lsp.cli import main
from starcoder_lsp.config import PRESETS, ModelConfig
from starcoder_lsp.errors import CheckpointError, TokenizerError
from starcoder_lsp.layout import hf_tensors
from starcoder_lsp.random_model import write_random_model
from starcoder_lsp.random_tokenizer import SPECIAL_TOKENS, train_tokenizer

TINY = PRESETS["test-tiny"]
REPO = Path(__file__).resolve().parents[1]


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in the directory, sharded or not."""
    weights: dict[str, np.ndarray] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="np") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert name not in weights, f"{name} stored twice"
                weights[name] = f.get_tensor(name)
    return weights


def stored_names(path: Path) -> list[str]:
    with safe_open(path, framework="np") as f:
        return list(f.keys())


def load_hf(directory: Path, **kwargs: object) -> GPTBigCodeForCausalLM:
    model, info = GPTBigCodeForCausalLM.from_pretrained(
        directory, output_loading_info=True, **kwargs
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model


def assert_state_equals(model: GPTBigCodeForCausalLM, weights: dict[str, np.ndarray]) -> None:
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(
            state[name].float().numpy(), value.astype(np.float32), err_msg=name
        )
    # Tied head: the logits use the embedding matrix.
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


# --- tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TINY.vocab_size)


def test_special_tokens_open_the_vocabulary_in_starcoder_order(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(19))) == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS[:4] == ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>")
    assert SPECIAL_TOKENS[-1] == "<reponame>"
    assert len(tokenizer) == TINY.vocab_size
    assert max(tokenizer.get_vocab().values()) == TINY.vocab_size - 1
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.pad_token is None
    # Special tokens are never split, and nothing is added around the text.
    ids = tokenizer.encode("<fim_prefix>def f(<fim_suffix>)\n<fim_middle>")
    assert ids[0] == 1 and 3 in ids and ids[-1] == 2


def test_digits_are_split_one_by_one_as_in_starcoder(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12345")) == list("12345")


@pytest.mark.parametrize(
    "text",
    [
        "é — ü 🙂",
        "def f(x):\n\treturn x  + 1234 . y ' s  \r\n\n",
        "\x00\x7f\u2028 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 中文 العربية",
        "<fim_prefix>a<fim_suffix>b<fim_middle>",
        "",
    ],
)
def test_encode_decode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < TINY.vocab_size for i in ids)


def test_auto_tokenizer_loads_the_checkpoint_tokenizer(tiny_mqa_dir, tokenizer):
    loaded = AutoTokenizer.from_pretrained(tiny_mqa_dir)
    text = "import os\nprint('é 🙂', os.getcwd())<|endoftext|>"
    assert len(loaded) == TINY.vocab_size
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token_id == 0 and loaded.pad_token is None
    assert loaded.decode(loaded.encode(text)) == text


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = train_tokenizer(300, cache_dir=tmp_path / "a")
    second = train_tokenizer(300, cache_dir=tmp_path / "b")
    assert len(first) == 300
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()

    def no_training(vocab_size: int) -> None:
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(random_tokenizer, "_train", no_training)
    cached = train_tokenizer(300, cache_dir=tmp_path / "a")
    assert cached.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCODER_LSP_CACHE", str(tmp_path))
    assert random_tokenizer.default_cache_dir() == tmp_path


def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(200)


# --- weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("multi_query", [True, False])
def test_names_and_shapes_are_those_of_transformers(multi_query):
    config = TINY.replace(multi_query=multi_query)
    reference = GPTBigCodeForCausalLM(GPTBigCodeConfig(**config.to_hf_dict())).state_dict()
    expected = [(k, tuple(v.shape)) for k, v in reference.items() if k != "lm_head.weight"]
    assert [(s.name, s.shape) for s in hf_tensors(config)] == expected
    qkv = 64 + 2 * 16 if multi_query else 3 * 64
    assert dict(expected)["transformer.h.0.attn.c_attn.weight"] == (qkv, 64)
    tied = sum(v.numel() for k, v in reference.items() if k != "lm_head.weight")
    assert config.num_parameters() == tied


@pytest.mark.parametrize("fixture", ["tiny_mqa_dir", "tiny_mha_dir"])
def test_transformers_loads_the_checkpoint_with_every_weight(request, fixture):
    directory: Path = request.getfixturevalue(fixture)
    assert (directory / "model.safetensors").is_file()
    assert not (directory / "model.safetensors.index.json").exists()
    config = ModelConfig.from_json_file(directory / "config.json")
    assert config.multi_query == (fixture == "tiny_mqa_dir")
    model = load_hf(directory)
    assert model.config.multi_query == config.multi_query
    assert_state_equals(model, read_weights(directory))


def test_generation_config_and_config_json(tiny_mqa_dir):
    generation = json.loads((tiny_mqa_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == 0
    config = json.loads((tiny_mqa_dir / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert ModelConfig.from_hf_dict(config) == TINY


def test_weights_are_random_around_their_usual_values(tmp_path):
    weights = read_weights(write_random_model(tmp_path, TINY, seed=0))  # init_std 0.02
    for name, value in weights.items():
        if name.endswith("bias"):
            # Small but not zero, so that a forward pass which drops a bias is caught.
            assert 0.01 < value.std() < 0.03 and abs(value.mean()) < 0.01, name
        elif ".ln_" in name:
            assert abs(value.mean() - 1) < 0.01 and 0.01 < value.std() < 0.03, name
        else:
            assert abs(value.std() - 0.02) < 0.002 and abs(value.mean()) < 0.002, name
    # Every tensor has its own values, not a copy of another's.
    assert not np.array_equal(
        weights["transformer.h.0.ln_1.bias"], weights["transformer.h.0.ln_2.bias"]
    )


def test_small_shards_make_an_index_transformers_loads(tmp_path, tiny_mqa_dir):
    directory = write_random_model(tmp_path, TINY, seed=0, max_shard_bytes=100_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert "model.safetensors" not in shards and len(shards) > 2
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert sorted(set(index["weight_map"].values())) == shards
    weights = read_weights(directory)
    assert index["weight_map"].keys() == weights.keys()
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())
    assert index["weight_map"] == {
        name: shard for shard in shards for name in stored_names(directory / shard)
    }
    assert_state_equals(load_hf(directory), weights)
    # The values do not depend on the sharding.
    unsharded = read_weights(write_random_model(tmp_path / "single", TINY, seed=0))
    for name, value in weights.items():
        np.testing.assert_array_equal(value, unsharded[name], err_msg=name)


def test_a_rewrite_removes_the_weights_of_the_earlier_sharding(tmp_path):
    write_random_model(tmp_path, TINY, max_shard_bytes=100_000)
    write_random_model(tmp_path, TINY)
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]


def test_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_mqa_dir):
    again = write_random_model(tmp_path / "again", TINY, seed=0, init_std=INIT_STD)
    files = sorted(p.name for p in tiny_mqa_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (again / name).read_bytes() == (tiny_mqa_dir / name).read_bytes(), name

    other = read_weights(write_random_model(tmp_path / "other", TINY, seed=1, init_std=INIT_STD))
    same = read_weights(tiny_mqa_dir)
    for name, value in other.items():
        assert not np.array_equal(value, same[name]), name


def test_bfloat16_checkpoint(tmp_path, tiny_mqa_dir):
    directory = write_random_model(tmp_path, TINY, seed=0, dtype="bfloat16", init_std=INIT_STD)
    config = json.loads((directory / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    weights = read_weights(directory)
    full = read_weights(tiny_mqa_dir)
    for name, value in weights.items():
        assert value.dtype == ml_dtypes.bfloat16, name
        # The float32 weights of the same seed, rounded.
        np.testing.assert_array_equal(value, full[name].astype(ml_dtypes.bfloat16), err_msg=name)
    model = load_hf(directory, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert_state_equals(model, weights)


def test_write_rejects_an_unknown_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="float16"):
        write_random_model(tmp_path, TINY, dtype="float16")


# --- command line ------------------------------------------------------------------------


def test_cli_writes_a_model_end_to_end(tmp_path):
    directory = tmp_path / "cli"
    args = ["--preset", "test-tiny", "--seed", "3", "--dtype", "bfloat16", "--multi-head"]
    result = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "make-random-model", str(directory), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote test-tiny" in result.stdout and str(directory) in result.stdout
    config = ModelConfig.from_json_file(directory / "config.json")
    assert config == TINY.replace(multi_query=False)
    # The arguments reached write_random_model: the same call in-process gives the same bytes.
    expected = write_random_model(tmp_path / "api", config, seed=3, dtype="bfloat16")
    assert (directory / "model.safetensors").read_bytes() == (
        expected / "model.safetensors"
    ).read_bytes()


def test_cli_rejects_an_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-random-model", str(tmp_path), "--preset", "starcoder-99b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'starcoder-99b'" in err and "test-tiny" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_prints_starcoder_errors_without_traceback(tmp_path, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert main(["make-random-model", str(not_a_directory), "--preset", "test-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: {not_a_directory} exists and is not a directory"
    assert "Traceback" not in err


def test_cli_help_lists_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "make-random-model" in capsys.readouterr().out
