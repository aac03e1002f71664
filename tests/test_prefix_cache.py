"""Slot bookkeeping of the prefix cache: longest-prefix choice, eviction, pinning."""

from __future__ import annotations

import pytest

from starcoder_lsp.cache import Lease, PrefixCache, common_prefix


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_takes_the_slot_with_the_longest_common_prefix():
    cache = PrefixCache(3)
    prompts = ([1, 2, 3, 4], [1, 2, 9, 9, 9], [5, 6])
    leases = [cache.acquire(tokens) for tokens in prompts]  # held at once: three slots
    for lease, tokens in zip(leases, prompts, strict=True):
        cache.release(lease, tokens)
    lease = cache.acquire([1, 2, 3, 4, 5, 6])
    assert lease == Lease(cache_slot_of(cache, [1, 2, 3, 4]), 4)


def cache_slot_of(cache: PrefixCache, tokens: list[int]) -> int:
    return next(i for i in range(3) if cache.contents(i) == tokens)


def test_reuse_is_capped_so_that_one_token_still_runs():
    cache = PrefixCache(1)
    cache.release(cache.acquire([1, 2, 3]), [1, 2, 3])
    assert cache.acquire([1, 2, 3]).reuse == 2


def test_evicts_the_least_recently_used_free_slot():
    cache = PrefixCache(2)
    first = cache.acquire([1, 1])
    second = cache.acquire([2, 2])
    cache.release(first, [1, 1])
    cache.release(second, [2, 2])  # slot of [1, 1] is now the least recently used
    lease = cache.acquire([3, 3])
    assert lease.reuse == 0 and lease.slot == first.slot
    cache.release(lease, [3, 3])
    assert sorted(cache.contents(i)[0] for i in range(2)) == [2, 3]


def test_busy_slots_are_never_handed_out_twice():
    cache = PrefixCache(2)
    a = cache.acquire([1, 2, 3])
    b = cache.acquire([1, 2, 3])
    assert a.slot != b.slot
    assert cache.acquire([1, 2, 3]) is None  # all busy
    cache.release(a, [1, 2, 3])
    assert cache.acquire([1, 2, 3, 4]) == Lease(a.slot, 3)


def test_discard_forgets_contents():
    cache = PrefixCache(1)
    lease = cache.acquire([1, 2, 3])
    cache.discard(lease)
    assert cache.acquire([1, 2, 3]).reuse == 0


def test_disabled_cache_never_reuses_but_still_leases():
    cache = PrefixCache(2, enabled=False)
    cache.release(cache.acquire([1, 2, 3]), [1, 2, 3])
    lease = cache.acquire([1, 2, 3, 4])
    assert lease is not None and lease.reuse == 0


def test_stats_count_hits_and_tokens():
    cache = PrefixCache(2)
    cache.release(cache.acquire([1, 2, 3]), [1, 2, 3, 7])
    cache.acquire([1, 2, 3, 7, 8])
    assert cache.stats.requests == 2 and cache.stats.hits == 1
    assert cache.stats.reused_tokens == 4 and cache.stats.prefilled_tokens == 3 + 1
    assert cache.stats.hit_rate == pytest.approx(0.5)


def test_needs_a_slot():
    with pytest.raises(ValueError):
        PrefixCache(0)


def test_a_discarded_slot_is_taken_before_a_useful_one():
    cache = PrefixCache(2)
    useful = cache.acquire([1, 2, 3])
    broken = cache.acquire([7, 8, 9])
    cache.release(useful, [1, 2, 3])
    cache.discard(broken)
    assert cache.acquire([5, 5]).slot == broken.slot


def test_releasing_twice_is_an_error():
    cache = PrefixCache(1)
    lease = cache.acquire([1])
    cache.release(lease, [1])
    with pytest.raises(ValueError, match="released twice"):
        cache.release(lease, [1])


def test_a_prompt_that_shares_only_a_few_tokens_evicts_the_oldest_slot_not_the_newest():
    """Every FIM prompt starts with the same special tokens: sharing those is no reason to
    throw away a slot that holds a long prompt someone is typing into."""
    cache = PrefixCache(slots=3)
    typed = [1, 2] + list(range(100, 200))
    for tokens in ([1, 2] + [7] * 10, [1, 2] + [8] * 10, typed):  # the last: most recent
        cache.release(cache.acquire(tokens), tokens)
    oldest = cache_slot_of(cache, [1, 2] + [7] * 10)
    other = cache.acquire([1, 2] + list(range(500, 600)))
    assert other.slot == oldest and other.reuse == 2
    cache.release(other, [1, 2] + list(range(500, 600)))
    keystroke = cache.acquire(typed + [201])
    assert keystroke.slot == cache_slot_of(cache, typed) and keystroke.reuse == len(typed)
