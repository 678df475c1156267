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
    ],
    ids=["int", "text", "empty-list", "map", "int-collection", "not-a-pair"],
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
