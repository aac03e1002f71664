"""StarCoder2 against transformers' Starcoder2ForCausalLM, on checkpoints transformers wrote.

Odd sizes, grouped-query attention with 2 and 4 key/value heads, a sliding window shorter
than the prompts, and (for one of them) an LM head of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Starcoder2Config, Starcoder2ForCausalLM

from starcoder_lsp import checkpoint, sharding
from starcoder_lsp.attention import PastKV
from starcoder_lsp.config import PRESETS, STARCODER2, ModelConfig
from starcoder_lsp.errors import CheckpointError
from starcoder_lsp.factory import ModelOptions, build_completer
from starcoder_lsp.generator import Generator
from starcoder_lsp.model import GPTBigCode, empty_past
from starcoder_lsp.random_tokenizer import STARCODER2_SPECIAL_TOKENS, train_tokenizer
from starcoder_lsp.runner import Runner
from starcoder_lsp.settings import Settings

TOL = 1e-4
WINDOW = 24
# Wide enough that greedy text from random weights varies (narrower, rotary models of this
# size repeat one token): a comparison of token streams means something only if they vary.
INIT_STD = 0.4
# name → (config, seed): 2 key/value heads for 4 query heads of 20 dims; 4 for 8 of 12, with
# an untied LM head and another rotary base.
CONFIGS = {
    "gqa2": ModelConfig(
        model_type=STARCODER2,
        vocab_size=1024,
        n_positions=256,
        n_embd=80,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_inner=200,
        multi_query=False,
        rope_theta=10000.0,
        sliding_window=WINDOW,
    ),
    "gqa4": ModelConfig(
        model_type=STARCODER2,
        vocab_size=1024,
        n_positions=256,
        n_embd=96,
        n_layer=3,
        n_head=8,
        n_kv_head=4,
        n_inner=160,
        multi_query=False,
        rope_theta=100000.0,
        sliding_window=WINDOW + 16,
        tie_word_embeddings=False,
    ),
}


def write_with_transformers(directory: Path, config: ModelConfig, seed: int) -> Path:
    """A checkpoint transformers itself writes (random weights, wide enough to vary), with a
    tokenizer carrying StarCoder2's special tokens."""
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(Starcoder2Config(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            base = 1.0 if "layernorm" in name or name.endswith("norm.weight") else 0.0
            parameter.copy_(base + INIT_STD * torch.randn_like(parameter))
    model.save_pretrained(directory)
    train_tokenizer(config.vocab_size, family=STARCODER2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    config = CONFIGS[request.param]
    directory = write_with_transformers(
        tmp_path_factory.mktemp(request.param), config, seed=len(request.param)
    )
    loaded = checkpoint.load_config(directory)
    assert loaded == config
    params = checkpoint.load_params(directory, loaded)
    reference = Starcoder2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return GPTBigCode(loaded), {"params": params}, reference, directory


def _hf_logits(reference, tokens) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor(np.asarray(tokens))).logits.numpy()


def _ours(model, variables, tokens, positions, past=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    past = past if past is not None else empty_past(model.config, tokens.shape[0], model.dtype)
    valid = jnp.ones(tokens.shape, bool)
    return model.apply(variables, tokens, jnp.asarray(positions), valid, past)


def _tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 1024, shape)


def test_logits_match_transformers_past_the_window(pair):
    model, variables, reference, _ = pair
    tokens = _tokens(0, (2, 70))  # longer than the window: its far past is out of sight
    positions = np.broadcast_to(np.arange(70), tokens.shape)
    logits, _ = _ours(model, variables, tokens, positions)
    expected = _hf_logits(reference, tokens)
    assert np.abs(np.asarray(logits) - expected).max() <= TOL
    assert np.abs(expected).max() > 0.1


def test_the_window_changes_the_logits(pair):
    """The test above can fail: without the window the same prompt gives other logits."""
    model, variables, _, _ = pair
    unwindowed = GPTBigCode(model.config.replace(sliding_window=None))
    tokens = _tokens(1, (1, 70))
    positions = np.arange(70)[None]
    windowed, _ = _ours(model, variables, tokens, positions)
    full, _ = _ours(unwindowed, variables, tokens, positions)
    assert np.abs(np.asarray(windowed[:, :WINDOW]) - np.asarray(full[:, :WINDOW])).max() < 1e-5
    assert np.abs(np.asarray(windowed[:, -1]) - np.asarray(full[:, -1])).max() > 1e-3


def test_keys_cached_after_rotation_serve_a_later_call(pair):
    """A prompt split across two calls through the cache, the second far past the window,
    reading the cache in blocks of 16 from row 1 of 2."""
    model, variables, reference, _ = pair
    blocked = GPTBigCode(model.config, past_block=16)
    tokens = _tokens(2, (1, 90))
    _, kv = _ours(blocked, variables, tokens[:, :61], np.arange(61)[None])
    rows = jnp.full((*kv.shape[:2], 2, 64, *kv.shape[4:]), 7.0, kv.dtype)
    rows = rows.at[:, :, 1, :61].set(kv[:, :, 0])
    past = PastKV(rows, jnp.array([61], jnp.int32), jnp.array([1], jnp.int32))
    logits, _ = _ours(blocked, variables, tokens[:, 61:], np.arange(61, 90)[None], past)
    expected = _hf_logits(reference, tokens)[:, 61:]
    assert np.abs(np.asarray(logits) - expected).max() <= TOL


def test_chunked_prefill_equals_one_pass(pair):
    _, _, reference, directory = pair
    ckpt = checkpoint.load(directory)
    prompt = _tokens(3, (77,)).tolist()
    expected = _hf_logits(reference, [prompt])[0, -1]
    for chunks in ((4,), (4, 16), (128,)):
        runner = Runner.from_checkpoint(ckpt, chunks=chunks)
        logits, _, _ = runner.prefill(runner.new_cache(), 0, prompt, 0)
        assert np.abs(np.asarray(logits[0]) - expected).max() <= TOL, chunks


def _greedy_reference(reference, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_transformers_generate(pair):
    _, _, reference, directory = pair
    generator = Generator.from_pretrained(directory, dtype=jnp.float32, chunks=(8, 32))
    generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
    prompt = _tokens(4, (30,)).tolist()
    expected = _greedy_reference(reference, prompt, 40)  # runs 46 positions past the window
    (completion,) = generator.generate([prompt], max_new_tokens=40)
    assert completion.tokens == expected
    assert len(set(expected)) > 5


def test_same_greedy_output_on_every_mesh(pair):
    _, _, _, directory = pair
    prompts = [_tokens(10 + i, (9 + 7 * i,)).tolist() for i in range(8)]  # 8 rows: dp=8 splits
    outputs = {}
    for shape in ("1x1", "1x8", "2x4", "8x1"):
        mesh = sharding.make_mesh(shape)
        generator = Generator.from_pretrained(
            directory, mesh=mesh, dtype=jnp.float32, chunks=(8,), batches=(8,)
        )
        generator.tokens = checkpoint.SpecialTokens(-1, -2, -3, -4, None, None, None)
        # The longer prompts (up to 58 tokens) already reach past either window.
        outputs[shape] = [c.tokens for c in generator.generate(prompts, 12)]
    for shape in ("1x8", "2x4", "8x1"):
        assert outputs[shape] == outputs["1x1"], shape


def test_key_value_heads_split_over_mp_where_they_divide(pair):
    model, _, _, directory = pair
    ckpt = checkpoint.load(directory, sharding.make_mesh("2x4"), jnp.float32)
    runner = Runner.from_checkpoint(ckpt, slots=8)
    kv_proj = ckpt.params["h_0"]["attn"]["kv_proj"]["kernel"]
    cache = runner.new_cache()
    if model.config.kv_heads % 4 == 0:  # 4 key/value heads, 4-way mp: each device holds one
        assert kv_proj.sharding.spec == sharding.P("mp", None)
        assert cache.sharding.spec == sharding.P(None, None, "dp", None, "mp")
    else:  # 2 key/value heads do not split 4 ways: whole on every device
        assert kv_proj.sharding.spec == sharding.P()
        assert cache.sharding.spec == sharding.P(None, None, "dp", None, None)


# --- everything above the model --------------------------------------------------------------


def test_prefix_reuse_over_a_keystroke_replay_gives_identical_suggestions(pair):
    """Type a line one character at a time, asking at each keystroke, with and without the
    prefix cache: the suggestions are the same, and the cache saves prefill."""
    _, _, _, directory = pair
    before = "import os\n\n\ndef walk(root):\n    for path in os.listdir(root):\n"
    typed = "        if path.endswith('.py'):"
    after = "\n            yield path\n\n\nprint(list(walk('.')))\n"
    settings = Settings(max_new_tokens=6, multiline="never", suffix_tokens=20)
    suggestions = {}
    for cached in (True, False):
        options = ModelOptions(directory, slots=2, prefix_cache=cached)
        completer = build_completer(options, warmup=False, chunks=(4, 16, 64), batches=(1, 2))
        assert completer.fim_mode == "psm"  # StarCoder2's trained order
        with completer.engine:
            results = []
            for n in range(1, len(typed) + 1):
                text = before + typed[:n] + after
                results.append(completer.complete("doc", text, len(before) + n, settings))
        suggestions[cached] = results
    assert [s.text for s in suggestions[True]] == [s.text for s in suggestions[False]]
    ran = [s.result for s in suggestions[True] if not s.typed_through]
    cold = [s.result for s in suggestions[False] if not s.typed_through]
    assert sum(r.prefilled_tokens for r in ran) < sum(r.prefilled_tokens for r in cold) / 2


def test_the_file_header_is_starcoder2s(pair):
    _, _, _, directory = pair
    completer = build_completer(ModelOptions(directory, slots=1), warmup=False, chunks=(64,))
    with completer.engine:
        settings = Settings(max_new_tokens=2, filename=True)
        suggestion = completer.complete("d", "x = 1\ny = ", 10, settings, "pkg/mod.py")
    prompt = completer.tokenizer.decode(suggestion.prompt.ids)
    assert prompt.startswith("<file_sep><fim_prefix>pkg/mod.py\nx = 1\ny = <fim_suffix>")
    assert prompt.endswith("<fim_middle>")


# --- checkpoints and errors --------------------------------------------------------------------


def test_make_random_model_writes_a_starcoder2_checkpoint_transformers_loads(tmp_path):
    directory = tmp_path / "tiny2"
    written = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "make-random-model", str(directory)]
        + ["--preset", "test-tiny-2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert written.returncode == 0, written.stderr
    assert "grouped-query (2 key/value heads)" in written.stdout
    assert json.loads((directory / "config.json").read_text())["model_type"] == "starcoder2"
    config = PRESETS["test-tiny-2"]
    reference = Starcoder2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert sum(p.numel() for p in reference.parameters()) == config.num_parameters()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = list(range(len(STARCODER2_SPECIAL_TOKENS)))
    assert tokenizer.convert_ids_to_tokens(ids) == list(STARCODER2_SPECIAL_TOKENS)
    special = checkpoint.load(directory).tokens
    assert special.repository_level and special.file_sep == 6 and special.repo_name == 5
    assert special.stop_ids == tuple(ids)  # any special token ends a completion
    # Ours and theirs agree on the random checkpoint too.
    tokens = _tokens(5, (1, 60)) % config.vocab_size
    ours, _ = _ours(
        GPTBigCode(config),
        {"params": checkpoint.load(directory).params},
        tokens,
        np.arange(60)[None],
    )
    assert np.abs(np.asarray(ours) - _hf_logits(reference, tokens)).max() <= TOL


def test_an_unknown_model_type_names_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load_config(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "'llama'" in message
    assert "gpt_bigcode" in message and "starcoder2" in message


def test_an_unknown_model_type_is_one_line_from_the_command_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    ran = subprocess.run(
        [sys.executable, "-m", "starcoder_lsp", "complete", str(source), "--line", "0"]
        + ["--character", "0", "--model", str(tmp_path), "--compilation-cache", "off"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 2
    [line] = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert "'mistral'" in line and "StarCoder2" in line and "Traceback" not in ran.stderr


def test_bfloat16_runs_close_to_float32(pair):
    _, _, _, directory = pair
    config = checkpoint.load_config(directory)
    tokens = _tokens(6, (1, 40))
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = checkpoint.load_params(directory, config, dtype=dtype)
        out[dtype], _ = _ours(
            GPTBigCode(config, dtype), {"params": params}, tokens, np.arange(40)[None]
        )
    full = np.asarray(out[jnp.float32])
    assert np.abs(np.asarray(out[jnp.bfloat16]) - full).max() < 0.15 * np.abs(full).max()
    assert out[jnp.bfloat16].dtype == jnp.float32  # logits and softmax stay in float32
