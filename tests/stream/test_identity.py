"""Tests of :mod:`stream.identity`: keyed hashes of participant identities (contract section 2)."""

from __future__ import annotations

import hashlib
import hmac
import random
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.events import Event, EventType, Participant, decode_record, validate
from stream.identity import participant_hash
from tests.stream.factories import KEY, dumps, event


def participation(first: str = "", last: str = "", email: str = "", visitor: str = "v1") -> Event:
    participant = Participant(first, last, email) if (first, last, email) != ("", "", "") else None
    return Event("e1", EventType.PARTICIPATION, 0, "c1", visitor, participant=participant)


def h(first: str = "", last: str = "", email: str = "", visitor: str = "v1") -> str:
    return participant_hash(KEY, participation(first, last, email, visitor))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Case-folded.
        (("Alice", "Martin", "alice@example.com"), ("ALICE", "martin", "Alice@Example.COM")),
        # Trimmed, any whitespace at both ends.
        (("Alice", "Martin", "a@x.io"), (" Alice\t", "\nMartin ", "  a@x.io\r\n")),
        # Case folding, not lower-casing: ß folds to ss.
        (("Jo", "Straße", "j@x.io"), ("Jo", "STRASSE", "j@x.io")),
        # Greek final sigma folds like sigma.
        (("Οδυσσευς", "", "o@x.io"), ("ΟΔΥΣΣΕΥΣ", "", "o@x.io")),
    ],
    ids=["case", "whitespace", "sharp-s", "greek"],
)
def test_trim_and_casefold_are_the_same_identity(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    assert h(*a) == h(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Another e-mail is another person.
        (("Alice", "Martin", "alice@example.com"), ("Alice", "Martin", "alice2@example.com")),
        # First and last name are not interchangeable.
        (("Ann", "Lee", ""), ("Lee", "Ann", "")),
        # Field boundaries matter.
        (("ab", "c", ""), ("a", "bc", "")),
        # Even with the old separator character inside a field.
        (("a\x1fb", "c", ""), ("a", "b\x1fc", "")),
        # Inner whitespace is kept.
        (("Anne Marie", "", ""), ("AnneMarie", "", "")),
    ],
    ids=["email", "swapped-names", "boundary", "separator-inside", "inner-space"],
)
def test_different_identities_hash_differently(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    assert h(*a) != h(*b)


def test_different_key_gives_a_different_hash() -> None:
    e = participation("Alice", "Martin", "alice@example.com")
    assert participant_hash(b"key-1", e) != participant_hash(b"key-2", e)
    assert participant_hash(b"key-1", e) == participant_hash(b"key-1", e)  # stable


def test_output_is_short_hex_without_pii() -> None:
    pii = ("Alice", "Martin", "alice@example.com")
    out = h(*pii)
    assert re.fullmatch(r"[0-9a-f]{32}", out)
    for value in pii:
        assert value.casefold() not in out.casefold()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # Without a participant the visitor is the participant: same visitor, same identity.
        (participation(visitor="v1"), participation(visitor="v1"), True),
        (participation(visitor="v1"), participation(visitor="v2"), False),
        # A person's identity does not depend on the visitor (two devices, one person).
        (
            participation("Alice", "", "a@x.io", visitor="v1"),
            participation("alice", "", "a@x.io", visitor="v2"),
            True,
        ),
        # A visitor id never collides with a person whose field equals it.
        (participation(visitor="alice"), participation("alice", visitor="zz"), False),
        (participation(visitor="a@x.io"), participation(email="a@x.io", visitor="zz"), False),
    ],
    ids=[
        "same-visitor",
        "other-visitor",
        "person-across-devices",
        "visitor-vs-name",
        "visitor-vs-email",
    ],
)
def test_visitor_fallback(a: Event, b: Event, same: bool) -> None:
    assert (participant_hash(KEY, a) == participant_hash(KEY, b)) is same


@pytest.mark.parametrize(
    "participant",
    [
        pytest.param(None, id="no-participant-object"),
        pytest.param({}, id="empty-object"),
        pytest.param({"email": " ", "first_name": ""}, id="blank-fields"),
    ],
)
def test_decoded_participation_without_identity_is_the_visitor(participant: object) -> None:
    obj = event(type="participation", visitor_id="v7")
    if participant is not None:
        obj["participant"] = participant
    decoded = decode_record(dumps(obj))
    (item,) = decoded
    assert isinstance(item, Event)
    assert participant_hash(KEY, item) == h(visitor="v7")


# --- Properties --------------------------------------------------------------------------------

# Any text, and a tiny alphabet that makes near-collisions (case, padding, separators) likely.
names = st.text(max_size=12) | st.text(alphabet='aAb \x1f,[]"', max_size=4)


def normalized(fields: tuple[str, str, str]) -> tuple[str, str, str]:
    a, b, c = (f.strip().casefold() for f in fields)
    return a, b, c


@given(st.tuples(names, names, names), st.tuples(names, names, names))
@settings(max_examples=300, deadline=None)
def test_same_hash_exactly_when_same_normalized_identity(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    if not any(f.strip() for f in a) or not any(f.strip() for f in b):
        return  # blank identities are the visitor's (covered above)
    ea = Event("e", EventType.PARTICIPATION, 0, "c", "v", participant=Participant(*a))
    eb = Event("e", EventType.PARTICIPATION, 0, "c", "v", participant=Participant(*b))
    same_hash = participant_hash(KEY, ea) == participant_hash(KEY, eb)
    assert same_hash == (normalized(a) == normalized(b))


@given(
    st.tuples(names, names, names).filter(lambda t: any(f.strip() for f in t)),
    st.lists(st.sampled_from([" ", "\t", "\n", "\u00a0", "\u3000"]), max_size=3),
    st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_padding_and_ascii_case_never_change_the_hash(
    fields: tuple[str, str, str], pad: list[str], rnd: random.Random
) -> None:
    padding = "".join(pad)
    varied = tuple(
        padding
        + "".join(c.swapcase() if c.isascii() and rnd.random() < 0.5 else c for c in f)
        + padding[::-1]
        for f in fields
    )
    assert h(*fields) == h(*varied)


@pytest.mark.parametrize("key", [b"", b"k", b"x" * 64, b"y" * 65, bytes(range(200))])
def test_the_hash_is_hmac_sha256_for_any_key_length(key: bytes) -> None:
    event = validate(
        {
            "event_id": "e",
            "type": "participation",
            "ts": 1,
            "campaign_id": "c",
            "visitor_id": "v",
            "participant": {"email": "A@x.io"},
        }
    )
    material = ("person" + "\x1f").encode() + orjson.dumps(["", "", "a@x.io"])
    expected = hmac.new(key, material, hashlib.sha256).hexdigest()[:32]
    assert participant_hash(key, event) == expected
