"""A StarCoder-style tokenizer trained here, for checkpoints written without network.

A byte-level BPE trained on the Python standard library, with StarCoder's special tokens at
StarCoder's ids (shared/STARCODER.md), cached per vocabulary size so each size is trained once
per machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from starcoder_lsp.config import GPT_BIGCODE, STARCODER2
from starcoder_lsp.errors import TokenizerError

# StarCoder's special tokens, in the order that gives them ids 0..18 (shared/STARCODER.md).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)
ENDOFTEXT = SPECIAL_TOKENS[0]

# StarCoder2's, in the order of bigcode/starcoder2-*'s tokenizer (ids 0..37). The names are
# those bigcode's training code defines (its Megatron-LM tokenizer, read here through the
# search tool); their order in the published tokenizer.json is recalled, not checked.
STARCODER2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
    "<code_to_intermediate>",
    "<intermediate_to_code>",
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
    "<NAME>",
    "<EMAIL>",
    "<KEY>",
    "<PASSWORD>",
)
FAMILY_SPECIAL_TOKENS = {GPT_BIGCODE: SPECIAL_TOKENS, STARCODER2: STARCODER2_SPECIAL_TOKENS}

# Bump when the training recipe changes so that stale cached tokenizers are not reused.
TOKENIZER_RECIPE_VERSION = 2
# Enough text for the merges of a vocabulary this size: a 1024-token vocabulary trains on
# ~1 MB in half a second; 49152 tokens want the whole standard library (~30 MB, ~10 s).
TRAINING_BYTES_PER_TOKEN = 1000
MIN_TRAINING_BYTES = 250_000
# Every byte must be a token, or byte-level BPE cannot encode arbitrary text.
BYTES = 256


def progress_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """`$STARCODER_LSP_CACHE`, else `~/.cache/starcoder-lsp`."""
    env = os.environ.get("STARCODER_LSP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "starcoder-lsp"


def stdlib_sources() -> list[Path]:
    """The standard library's own .py files, sorted so that training is deterministic."""
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for folder, subfolders, files in os.walk(root):
        # Third-party packages may live under the stdlib directory, and differ between
        # machines; pruning them here also spares walking hundreds of megabytes.
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        sources += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(sources)


def _take_bytes(paths: list[Path], budget: int) -> list[Path]:
    taken, total = [], 0
    for path in paths:
        if total >= budget:
            break
        taken.append(path)
        total += path.stat().st_size
    return taken


def _read_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        # A few stdlib test files are deliberately not UTF-8; any text will do for training.
        yield path.read_text(encoding="utf-8", errors="replace")


def _new_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # StarCoder's tokenizer.json: every digit on its own, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _train_bpe(vocab_size: int, paths: list[Path], specials: tuple[str, ...]) -> Tokenizer:
    tokenizer = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0, 1, ... in this order.
        special_tokens=list(specials),
        # All 256 bytes, so that any text (emoji, accents) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_read_texts(paths), trainer, length=len(paths))
    return tokenizer


def _wrap(tokenizer: Tokenizer, specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=list(specials[1:]),
        # transformers' default clean-up rewrites " ." as "." on decode, which breaks code.
        clean_up_tokenization_spaces=False,
    )


def _train(vocab_size: int, specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """Train on a prefix of the sorted stdlib, widening to all of it if merges run out."""
    sources = stdlib_sources()
    subset = _take_bytes(sources, max(MIN_TRAINING_BYTES, vocab_size * TRAINING_BYTES_PER_TOKEN))
    attempts = [subset] if len(subset) == len(sources) else [subset, sources]
    for paths in attempts:
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        progress_line(
            f"training a {vocab_size}-token byte-level BPE tokenizer on {len(paths)} "
            f"standard-library files ({megabytes:.1f} MB)..."
        )
        start = time.perf_counter()
        tokenizer = _train_bpe(vocab_size, paths, specials)
        progress_line(f"trained the tokenizer in {time.perf_counter() - start:.1f} s")
        if tokenizer.get_vocab_size() == vocab_size:
            return _wrap(tokenizer, specials)
    raise TokenizerError(
        f"the standard library at {sysconfig.get_paths()['stdlib']} has too little text for "
        f"a {vocab_size}-token vocabulary (training made {tokenizer.get_vocab_size()} tokens)"
    )


def _cache_entry(cache_dir: Path, vocab_size: int, family: str) -> Path:
    # The stdlib, hence the merges, differ between Python versions.
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    kind = "" if family == GPT_BIGCODE else f"-{family}"
    return cache_dir / f"tokenizer-v{TOKENIZER_RECIPE_VERSION}{kind}-{python}-{vocab_size}"


def _load_cached(entry: Path, vocab_size: int) -> PreTrainedTokenizerFast | None:
    if not (entry / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(entry)
    except Exception:  # whatever is wrong with a damaged entry, retraining fixes it
        return None
    # from_pretrained records how it loaded (transformers 5.24: is_local, local_files_only)
    # in init_kwargs, which save_pretrained writes out: a model's tokenizer_config.json would
    # then differ by whether its tokenizer was just trained or came from this cache.
    for loading_option in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(loading_option, None)
    return tokenizer if len(tokenizer) == vocab_size else None


def _store(tokenizer: PreTrainedTokenizerFast, entry: Path) -> None:
    """Save next to the entry, then rename: a reader never sees a half-written tokenizer."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        tokenizer.save_pretrained(staging)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    except OSError as e:
        # Another process stored it first, or the cache is read-only: the tokenizer in hand
        # is still good, this machine just trains it again next time.
        progress_line(f"could not cache the tokenizer at {entry}: {e}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def train_tokenizer(
    vocab_size: int, cache_dir: Path | None = None, family: str = GPT_BIGCODE
) -> PreTrainedTokenizerFast:
    """A StarCoder-style byte-level BPE tokenizer of exactly `vocab_size` tokens.

    The first ids are the family's special tokens in the family's order (StarCoder's 19,
    StarCoder2's 38); bos = eos = unk = `<|endoftext|>`; no pad token. Trained on the
    standard library's sources and cached under `cache_dir` (default: `default_cache_dir()`),
    so each size is trained once per machine.
    """
    specials = FAMILY_SPECIAL_TOKENS[family]
    if vocab_size < len(specials) + BYTES:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(specials) + BYTES} tokens ({len(specials)} special tokens and {BYTES} bytes)"
        )
    entry = _cache_entry(Path(cache_dir) if cache_dir else default_cache_dir(), vocab_size, family)
    cached = _load_cached(entry, vocab_size)
    if cached is not None:
        return cached
    tokenizer = _train(vocab_size, specials)
    _store(tokenizer, entry)
    return tokenizer
