"""The special tokens prompts and stopping rely on, looked up by name in a tokenizer.

No JAX here: the prompt builder, the completer and the post-processing use these ids too.
"""

from __future__ import annotations

from dataclasses import dataclass

from starcoder_lsp.errors import TokenizerError


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens prompts and stopping rely on, looked up by name in the tokenizer."""

    eos: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    fim_pad: int | None
    filename: int | None
    file_sep: int | None
    repo_name: int | None = None
    # Every other special token of the tokenizer (<gh_stars>, <jupyter_code>, <pr_diff>, ...):
    # text never contains one, so a completion that reaches one has ended.
    others: tuple[int, ...] = ()

    @property
    def repository_level(self) -> bool:
        """StarCoder2's tokenizer: files are written `<file_sep>path\ncode`, not under a
        `<filename>` header."""
        return self.file_sep is not None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a completion: end of text, any FIM marker or file separator, and
        every other special token."""
        ids = (self.eos, self.fim_prefix, self.fim_middle, self.fim_suffix)
        optional = (self.fim_pad, self.filename, self.file_sep, self.repo_name)
        return tuple(sorted({*ids, *(i for i in optional if i is not None), *self.others}))


# StarCoder spells them with underscores, SantaCoder with hyphens.
_SPELLINGS = {
    "eos": ("<|endoftext|>",),
    "fim_prefix": ("<fim_prefix>", "<fim-prefix>"),
    "fim_middle": ("<fim_middle>", "<fim-middle>"),
    "fim_suffix": ("<fim_suffix>", "<fim-suffix>"),
    "fim_pad": ("<fim_pad>", "<fim-pad>"),
    "filename": ("<filename>",),
    "file_sep": ("<file_sep>",),
    "repo_name": ("<repo_name>", "<reponame>"),
}
_REQUIRED = ("eos", "fim_prefix", "fim_middle", "fim_suffix")


def special_tokens(tokenizer: object) -> SpecialTokens:
    """The ids, or a TokenizerError naming the FIM tokens the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    found = {
        field: next((vocab[s] for s in spellings if s in vocab), None)
        for field, spellings in _SPELLINGS.items()
    }
    if found["eos"] is None and getattr(tokenizer, "eos_token_id", None) is not None:
        found["eos"] = tokenizer.eos_token_id
    missing = [_SPELLINGS[f][0] for f in _REQUIRED if found[f] is None]
    if missing:
        raise TokenizerError(
            f"the tokenizer lacks {', '.join(missing)}: fill-in-the-middle needs a StarCoder-"
            "family tokenizer with <fim_prefix>, <fim_suffix>, <fim_middle> and <|endoftext|>"
        )
    named = {i for i in found.values() if i is not None}
    others = sorted(set(getattr(tokenizer, "all_special_ids", ())) - named)
    return SpecialTokens(**found, others=tuple(others))
