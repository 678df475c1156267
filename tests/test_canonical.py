"""Canonical CBOR: one encoding per value; everything else refused."""

from __future__ import annotations

import math
import time

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.core import canonical
from p2psync.errors import DecodeError, InvalidRecord, NestingError, NonCanonicalError

pytestmark = pytest.mark.pure

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
def test_round_trip(value: canonical.Value) -> None:
    encoded = canonical.encode(value)
    assert canonical.decode(encoded, what="v", max_depth=40) == value
    assert canonical.encode(cbor2.loads(encoded)) == encoded


@given(values, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_refused(value: canonical.Value, junk: bytes) -> None:
    with pytest.raises(NonCanonicalError):
        canonical.decode(canonical.encode(value) + junk, what="v", max_depth=40)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x18\x01", NonCanonicalError),  # 1 with a one-byte head
        (b"\x19\x00\x01", NonCanonicalError),  # 1 with a two-byte head
        (b"\xa2\x61b\x01\x61a\x02", NonCanonicalError),  # keys out of order
        (b"\xa2\x01\x01\x01\x02", DecodeError),  # duplicate key
        (b"\x9f\x01\xff", DecodeError),  # indefinite array
        (b"\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00", NonCanonicalError),  # 1.5 as a double
        (b"\x62\xff\xfe", DecodeError),  # invalid UTF-8
        (b"\x5a\xff\xff\xff\xff", DecodeError),  # 4 GiB byte string, truncated
        (b"", DecodeError),
    ],
)
def test_non_canonical_and_malformed_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical.decode(data, what="v", max_depth=40)


def test_deep_nesting_refused_before_building() -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(NestingError):
        canonical.decode(deep, what="v", max_depth=33)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        math.inf,
        2**64,
        -(2**64) - 1,
        {1: "int key"},
        {"set": {1, 2}},
        cbor2.CBORTag(99, 1),
        cbor2.undefined,
    ],
)
def test_values_outside_the_data_model_refused(value: object) -> None:
    with pytest.raises(InvalidRecord):
        canonical.check_value(value)


def test_nesting_limit_for_values() -> None:
    value: canonical.Value = 1
    for _ in range(canonical.MAX_VALUE_DEPTH):
        value = [value]
    canonical.check_value(value)
    with pytest.raises(InvalidRecord, match="deeper"):
        canonical.check_value([value])


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1\x1a\x00\x00\x00\x01",  # tag 1 (epoch date) decodes to a datetime
        b"\xc2\x41\x01",  # bignum tag
        b"\xd9\xd9\xf7\x01",  # self-describe tag
        b"\xf7",  # undefined
        b"\xf0",  # simple value 16
    ],
)
def test_tags_and_simple_values_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        value = canonical.decode(data, what="v", max_depth=5)
        canonical.check_value(value, received=True)


def test_no_tag_number_is_accepted() -> None:
    """Every tag is refused before cbor2 acts on it (shared references, bignums,
    fractions and friends can cost time out of all proportion to their size)."""
    for tag in range(70_000):
        data = cbor2.dumps(cbor2.CBORTag(tag, 0))
        with pytest.raises(DecodeError):
            canonical.loads_strict(data, what="v", max_depth=5)


@pytest.mark.parametrize(
    "data",
    [
        b"\xd8\x1c\x82\x01\xd8\x1d\x00",  # shareable / shared reference
        b"\xa2\xc2\x41\x01\x01\xc2\x41\x02\x02",  # bignum map keys (hash-collision vector)
        b"\xd8\x1e\x82\xc2\x59\x10\x00" + b"\x01" * 4096 + b"\x03",  # huge fraction
        b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",  # bigfloat with a huge exponent
        b"\xd9\x01\x02\x82\x01\x02",  # set
    ],
)
def test_expensive_tags_are_refused_quickly(data: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(DecodeError):
        canonical.loads_strict(data, what="v", max_depth=40)
    assert time.perf_counter() - started < 0.05
