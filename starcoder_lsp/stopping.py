"""When a generation ends, for the Engine and the Generator alike. No JAX here."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

# Why a generation ended. The engine adds "cancelled", "superseded" and "error".
STOP = "stop"  # an end-of-text or FIM token, or the stop rule on the text so far
LENGTH = "length"  # max_new_tokens reached


def finish_reason(
    generated: Sequence[int],
    max_new_tokens: int,
    stop_ids: Collection[int],
    stopped_by_text: Callable[[], bool] | None = None,
) -> str | None:
    """STOP when the last token is a stop token or the text says so, LENGTH when no more may
    be generated, None while the row goes on. The text rule is asked only when the tokens
    have not decided, because decoding the text costs more than the rest."""
    if generated and generated[-1] in stop_ids:
        return STOP
    if stopped_by_text is not None and stopped_by_text():
        return STOP
    if len(generated) >= max_new_tokens:
        return LENGTH
    return None


def stop_strings_rule(stop: Sequence[str]) -> Callable[[str], bool] | None:
    """A text rule that stops once any of `stop` occurs; None for no strings."""
    if not stop:
        return None
    return lambda text: any(s in text for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the stop strings it holds."""
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
