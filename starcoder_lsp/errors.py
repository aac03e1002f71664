"""Errors a user can act on; the CLI and the server print their message, not a traceback."""


class StarcoderError(Exception):
    """Base class for errors whose message is meant for the user."""


class CheckpointError(StarcoderError):
    """A checkpoint directory, hub id or file is missing, malformed or not a GPTBigCode model."""


class TokenizerError(StarcoderError):
    """The tokenizer cannot be loaded or lacks the special tokens fill-in-the-middle needs."""
