"""What the fuzzer found (``scripts/fuzz``, ``fuzz/targets.py``): each input that made a
decoder raise something other than its typed error, as the test that would have
caught it. Each failed before its fix."""

from __future__ import annotations

import pytest

from fuzz.corpus import sample_entries
from p2psync.core import canonical, entry
from p2psync.errors import DecodeError

pytestmark = pytest.mark.pure


def _signed(body: dict[int, object]) -> bytes:
    return canonical.encode([canonical.encode(body), bytes(64)])


@pytest.mark.parametrize(
    "signed",
    [
        # the op list holds an integer, an empty text, a one-element list, a map
        _signed({0: 1, 5: [1]}),
        _signed({0: 1, 5: [""]}),
        _signed({0: 1, 5: [[]]}),
        _signed({0: 1, 5: [{}]}),
        # a collection that is not text
        _signed({0: 1, 5: [[7, bytes(32)]]}),
        # not a [body, signature] pair, though its second byte starts a byte string
        b"\x41" + canonical.encode(canonical.encode({5: [1]})),
        # the fuzzer's own (fuzz/crashes/entry/crash-ea674f1a...: mode byte dropped)
        bytes.fromhex(
            "825862a6000101582003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664"
            "125531b8020103f6041b01a3185c500000000581000000000000000272735820f95f4f3f39"
            "dec51ef12dc2169ed8ac047f54a94dc749034f9603b510031758e00b"
        ),
    ],
    ids=["int", "text", "empty-list", "map", "int-collection", "not-a-pair", "found"],
)
def test_stored_collections_refuses_a_malformed_op_list_with_decode_error(signed: bytes) -> None:
    """``stored_collections`` (the store reads what an entry changes from its signed
    part alone) raised TypeError or IndexError for an op reference that is not a
    ``[collection, digest]`` pair (fuzz target ``entry``, mode 2)."""
    with pytest.raises(DecodeError):
        entry.stored_collections(signed)


def test_stored_collections_of_a_real_entry() -> None:
    first, second = sample_entries()
    assert entry.stored_collections(first.signed) == ("vouchers",)
    assert entry.stored_collections(second.signed) == second.collections
