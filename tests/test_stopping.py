"""When a generation ends: one rule for the engine and the generator."""

from __future__ import annotations

from starcoder_lsp.stopping import LENGTH, STOP, cut_at_stop, finish_reason, stop_strings_rule


def test_a_stop_token_ends_before_the_length_does():
    assert finish_reason([5, 0], 2, {0}) == STOP
    assert finish_reason([5, 6], 2, {0}) == LENGTH
    assert finish_reason([5], 2, {0}) is None


def test_the_text_rule_is_asked_only_when_the_tokens_do_not_decide():
    asked = []
    rule = lambda: asked.append(True) or True
    assert finish_reason([5, 0], 9, {0}, rule) == STOP and not asked
    assert finish_reason([5, 6], 9, {0}, rule) == STOP and asked


def test_stop_strings():
    rule = stop_strings_rule(["\n\n", "def "])
    assert rule("x = 1\n\ny") and rule("  def f") and not rule("x = 1\n")
    assert stop_strings_rule([]) is None
    assert cut_at_stop("a = 1\ndef f():\n\n", ["\n\n", "def "]) == "a = 1\n"
    assert cut_at_stop("a = 1", ["\n"]) == "a = 1"
