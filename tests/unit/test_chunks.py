"""Chunking and reassembly, without a broker: a frame cut by `split` comes back whole in any
order, and every way a chunked message can be refused (bad or conflicting headers, too large,
refused by the admission hook, too many partials, abandoned) is refused with its reason."""

from __future__ import annotations

import random

import pytest

from splitfed.transport.base import ChunkRefused
from splitfed.transport.chunks import (
    CHUNK_COUNT, CHUNK_ID, CHUNK_INDEX, MAX_PENDING_PER_SENDER, MAX_PENDING_REASSEMBLIES, Reassembler, Refused, Whole, chunk_count, split,
)

CHUNK = 16


def headers(chunk_id: str, index: int, count: int) -> dict:
    return {CHUNK_ID: chunk_id, CHUNK_INDEX: index, CHUNK_COUNT: count}


def test_split_cuts_a_frame_into_numbered_chunks_of_one_fresh_message():
    body = bytes(range(50))
    chunks = list(split(body, CHUNK))
    assert [len(piece) for piece, _ in chunks] == [16, 16, 16, 2] and chunk_count(len(body), CHUNK) == 4
    assert b"".join(piece for piece, _ in chunks) == body
    assert [(h[CHUNK_INDEX], h[CHUNK_COUNT]) for _, h in chunks] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert len({h[CHUNK_ID] for _, h in chunks}) == 1
    assert next(split(body, CHUNK))[1][CHUNK_ID] != chunks[0][1][CHUNK_ID]


def test_chunks_in_any_order_make_the_whole_frame_with_every_tag():
    body = random.Random(1).randbytes(100)
    chunks = list(enumerate(split(body, CHUNK)))
    random.Random(2).shuffle(chunks)
    reassembler = Reassembler(CHUNK, 1024)
    outcomes = [reassembler.take("q", tag, h, piece, now=0.0) for tag, (piece, h) in chunks]
    assert outcomes[:-1] == [None] * (len(chunks) - 1)
    assert outcomes[-1] == Whole("q", body, [tag for tag, _ in chunks])


def test_a_frame_without_chunk_headers_passes_whole():
    assert Reassembler(CHUNK, 1024).take("q", 7, {}, b"small", now=0.0) == Whole("q", b"small", [7])


@pytest.mark.parametrize("bad", [
    {CHUNK_ID: "m", CHUNK_INDEX: "0", CHUNK_COUNT: 2},
    {CHUNK_ID: 5, CHUNK_INDEX: 0, CHUNK_COUNT: 2},
    {CHUNK_ID: "m", CHUNK_INDEX: 2, CHUNK_COUNT: 2},
    {CHUNK_ID: "m", CHUNK_INDEX: -1, CHUNK_COUNT: 2},
    {CHUNK_ID: "m", CHUNK_INDEX: 0},
])
def test_bad_chunk_headers_are_refused(bad):
    assert Reassembler(CHUNK, 1024).take("q", 1, bad, b"x", now=0.0) == Refused("q", [1], "malformed", "bad chunk headers on q")


def test_a_chunk_that_conflicts_with_earlier_ones_is_refused_alone():
    reassembler = Reassembler(CHUNK, 1024)
    assert reassembler.take("q", 1, headers("m", 0, 3), b"a" * CHUNK, now=0.0) is None
    refused = reassembler.take("q", 2, headers("m", 0, 3), b"b" * CHUNK, now=0.0)  # the same index again
    assert isinstance(refused, Refused) and (refused.tags, refused.reason) == ([2], "malformed")
    refused = reassembler.take("q", 3, headers("m", 1, 4), b"c" * CHUNK, now=0.0)  # another count
    assert isinstance(refused, Refused) and (refused.tags, refused.reason) == ([3], "malformed")
    assert reassembler.take("q", 4, headers("m", 1, 3), b"d" * CHUNK, now=0.0) is None
    assert reassembler.take("q", 5, headers("m", 2, 3), b"e", now=0.0) == Whole("q", b"a" * CHUNK + b"d" * CHUNK + b"e", [1, 4, 5])


def test_a_watched_queue_refuses_more_chunks_than_its_limit_allows_at_the_first_one():
    reassembler = Reassembler(CHUNK, 1024)
    reassembler.watch("q", max_bytes=64, admit=None)
    refused = reassembler.take("q", 1, headers("m", 0, 5), b"x" * CHUNK, now=0.0)
    assert isinstance(refused, Refused) and (refused.tags, refused.reason) == ([1], "oversized")
    assert reassembler.take("other", 2, headers("m", 0, 5), b"x" * CHUNK, now=0.0) is None  # the transport's own limit


def test_a_message_larger_than_it_announced_is_refused_with_every_chunk_so_far():
    reassembler = Reassembler(CHUNK, 1024)
    reassembler.watch("q", max_bytes=40, admit=None)
    assert reassembler.take("q", 1, headers("m", 0, 3), b"x" * CHUNK, now=0.0) is None
    assert reassembler.take("q", 2, headers("m", 1, 3), b"x" * CHUNK, now=0.0) is None
    refused = reassembler.take("q", 3, headers("m", 2, 3), b"x" * CHUNK, now=0.0)  # 48 bytes in chunks that fit 40
    assert isinstance(refused, Refused) and (refused.tags, refused.reason) == ([1, 2, 3], "oversized")
    assert reassembler.expire(now=1e9) == []  # nothing of it kept


def test_the_admission_hook_judges_the_first_chunk_before_anything_is_kept():
    def admit(body: bytes) -> str:
        if body.startswith(b"forged"):
            raise ChunkRefused("signature", "not signed by a listed key")
        return body[:1].decode()

    reassembler = Reassembler(CHUNK, 1024)
    reassembler.watch("q", max_bytes=1024, admit=admit)
    late = reassembler.take("q", 1, headers("late", 1, 2), b"x", now=0.0)
    assert isinstance(late, Refused) and (late.tags, late.reason) == ([1], "malformed") and "did not open with its first chunk" in late.detail
    forged = reassembler.take("q", 2, headers("forged", 0, 2), b"forged" + b"x" * 10, now=0.0)
    assert forged == Refused("q", [2], "signature", "first chunk of q/forged: not signed by a listed key")
    assert reassembler.take("q", 3, headers("good", 0, 2), b"a" * CHUNK, now=0.0) is None
    assert reassembler.take("q", 4, headers("good", 1, 2), b"b", now=0.0) == Whole("q", b"a" * CHUNK + b"b", [3, 4])


def test_a_sender_holds_at_most_a_few_partial_messages():
    reassembler = Reassembler(CHUNK, 1024)
    reassembler.watch("q", max_bytes=1024, admit=lambda body: body[:1].decode())
    for n in range(MAX_PENDING_PER_SENDER):
        assert reassembler.take("q", n, headers(f"a{n}", 0, 2), b"a" * CHUNK, now=0.0) is None
    refused = reassembler.take("q", 99, headers("a-more", 0, 2), b"a" * CHUNK, now=0.0)
    assert isinstance(refused, Refused) and refused.reason == "partials" and "from a" in refused.detail
    assert reassembler.take("q", 100, headers("b0", 0, 2), b"b" * CHUNK, now=0.0) is None  # another sender is still welcome


def test_partials_reserve_the_chunks_they_announce_and_a_newcomer_that_does_not_fit_is_refused():
    reassembler = Reassembler(CHUNK, 4 * CHUNK)
    assert reassembler.reserve == 8
    assert reassembler.take("q", 1, headers("m1", 0, 4), b"x" * CHUNK, now=0.0) is None
    assert reassembler.take("q", 2, headers("m2", 0, 4), b"x" * CHUNK, now=0.0) is None
    refused = reassembler.take("q", 3, headers("m3", 0, 2), b"x" * CHUNK, now=0.0)
    assert isinstance(refused, Refused) and (refused.tags, refused.reason) == ([3], "partials")
    assert reassembler.take("other", 4, headers("m3", 0, 2), b"x" * CHUNK, now=0.0) is None  # each queue has its own window


def test_a_queue_holds_at_most_so_many_partial_messages():
    reassembler = Reassembler(CHUNK, 1024**2)
    for n in range(MAX_PENDING_REASSEMBLIES):
        assert reassembler.take("q", n, headers(f"m{n}", 0, 2), b"x" * CHUNK, now=0.0) is None
    refused = reassembler.take("q", -1, headers("one-more", 0, 2), b"x" * CHUNK, now=0.0)
    assert isinstance(refused, Refused) and refused.reason == "partials"


def test_abandoned_partials_expire_with_every_chunk_they_hold():
    reassembler = Reassembler(CHUNK, 1024, partial_ttl=10.0)
    assert reassembler.take("q", 1, headers("old", 0, 3), b"x" * CHUNK, now=0.0) is None
    assert reassembler.take("q", 2, headers("old", 1, 3), b"x" * CHUNK, now=5.0) is None
    assert reassembler.take("q", 3, headers("new", 0, 2), b"x" * CHUNK, now=5.0) is None
    assert reassembler.expire(now=10.0) == []
    assert reassembler.expire(now=10.5) == [Refused("q", [1, 2], "expired", "chunked message q/old incomplete after 10s")]
    assert reassembler.take("q", 4, headers("new", 1, 2), b"y", now=11.0) == Whole("q", b"x" * CHUNK + b"y", [3, 4])


def test_clear_forgets_every_partial():
    reassembler = Reassembler(CHUNK, 1024, partial_ttl=1.0)
    assert reassembler.take("q", 1, headers("m", 0, 2), b"x" * CHUNK, now=0.0) is None
    reassembler.clear()
    assert reassembler.expire(now=100.0) == []
    assert reassembler.take("q", 2, headers("m", 1, 2), b"y", now=100.0) is None  # a new partial: its first chunk is gone
