"""Tests of :mod:`stream.events`: record decoding and event validation (contract v1, section 1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stream.events as events_module
from stream.events import (
    MAX_EVENT_BYTES,
    MAX_TS_MS,
    Event,
    EventJson,
    EventType,
    Participant,
    Reason,
    Rejection,
    _decode_exact,
    _decode_objects,
    _Invalid,
    _settled,
    _validate_fully,
    decode_record,
    validate,
)
from tests.stream.factories import H_MS, dumps, event

MISSING = object()


def changed(**changes: Any) -> dict[str, Any]:
    """A valid page view with fields changed (``MISSING`` removes a field)."""
    obj = event()
    for name, value in changes.items():
        if value is MISSING:
            del obj[name]
        else:
            obj[name] = value
    return obj


def one(value: bytes | None) -> Event | Rejection:
    items = decode_record(value)
    assert len(items) == 1
    return items[0]


def padded(size: int) -> bytes:
    """A valid single event of exactly ``size`` bytes of JSON (padded by an extra field)."""
    base = dumps(event(pad=""))
    return dumps(event(pad="x" * (size - len(base))))


# --- Rejections: every reason of the contract is reachable -----------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(b'{"event_id": ', Reason.INVALID_JSON, id="truncated-json"),
        pytest.param(b"", Reason.INVALID_JSON, id="empty-value"),
        pytest.param(b"NaN", Reason.INVALID_JSON, id="nan-literal"),
        pytest.param(b'{"a": 1} {"b": 2}', Reason.INVALID_JSON, id="two-documents"),
        pytest.param(b"\xef\xbb\xbf{}", Reason.INVALID_JSON, id="utf8-bom"),
        pytest.param(b"[" * 5000 + b"]" * 5000, Reason.INVALID_JSON, id="5000-levels-deep"),
        pytest.param(b"42", Reason.NOT_AN_OBJECT, id="number"),
        pytest.param(b'"page_view"', Reason.NOT_AN_OBJECT, id="string"),
        pytest.param(b"null", Reason.NOT_AN_OBJECT, id="json-null"),
        pytest.param(b"true", Reason.NOT_AN_OBJECT, id="boolean"),
        pytest.param(None, Reason.NOT_AN_OBJECT, id="tombstone-none-value"),
        pytest.param(b'{"event_id": "\xff\xfe"}', Reason.INVALID_UTF8, id="invalid-utf8-in-string"),
        pytest.param(b"\x80\x81", Reason.INVALID_UTF8, id="invalid-utf8-bare"),
        pytest.param(padded(MAX_EVENT_BYTES + 1), Reason.TOO_LARGE, id="one-byte-over-64KiB"),
        pytest.param(
            b"\xff" * (MAX_EVENT_BYTES + 1), Reason.TOO_LARGE, id="huge-garbage-is-too-large"
        ),
    ],
)
def test_whole_record_rejections(value: bytes | None, reason: Reason) -> None:
    item = one(value)
    assert isinstance(item, Rejection)
    assert item.reason is reason
    assert item.index is None  # a whole-record rejection
    assert item.raw == (value or b"")  # the original bytes go to the dead-letter topic


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        # Required fields absent, or explicitly null.
        pytest.param(changed(event_id=MISSING), Reason.MISSING_FIELD, id="no-event_id"),
        pytest.param(changed(type=MISSING), Reason.MISSING_FIELD, id="no-type"),
        pytest.param(changed(ts=MISSING), Reason.MISSING_FIELD, id="no-ts"),
        pytest.param(changed(campaign_id=MISSING), Reason.MISSING_FIELD, id="no-campaign_id"),
        pytest.param(changed(visitor_id=MISSING), Reason.MISSING_FIELD, id="no-visitor_id"),
        pytest.param(changed(visitor_id=None), Reason.MISSING_FIELD, id="null-visitor_id"),
        pytest.param(changed(ts=None), Reason.MISSING_FIELD, id="null-ts"),
        pytest.param({}, Reason.MISSING_FIELD, id="empty-object"),
        # Ids: 1..128 chars, strings only.
        pytest.param(changed(event_id=""), Reason.INVALID_FIELD, id="event_id-0-chars"),
        pytest.param(changed(event_id="x" * 129), Reason.INVALID_FIELD, id="event_id-129-chars"),
        pytest.param(changed(campaign_id=""), Reason.INVALID_FIELD, id="campaign_id-0-chars"),
        pytest.param(
            changed(campaign_id="x" * 129), Reason.INVALID_FIELD, id="campaign_id-129-chars"
        ),
        pytest.param(changed(visitor_id=""), Reason.INVALID_FIELD, id="visitor_id-0-chars"),
        pytest.param(
            changed(visitor_id="é" * 129), Reason.INVALID_FIELD, id="visitor_id-129-chars"
        ),
        pytest.param(changed(event_id=17), Reason.INVALID_FIELD, id="event_id-number"),
        pytest.param(changed(campaign_id=["c"]), Reason.INVALID_FIELD, id="campaign_id-list"),
        pytest.param(changed(type=3), Reason.INVALID_FIELD, id="type-number"),
        # Optional fields of the wrong JSON type.
        pytest.param(changed(channel=1), Reason.INVALID_FIELD, id="channel-number"),
        pytest.param(changed(page=1), Reason.INVALID_FIELD, id="page_view-page-number"),
        pytest.param(changed(page_type=[]), Reason.INVALID_FIELD, id="page_view-page_type-list"),
        pytest.param(changed(logged_in="yes"), Reason.INVALID_FIELD, id="page_view-logged_in-str"),
        pytest.param(
            changed(type="interaction", action=5), Reason.INVALID_FIELD, id="interaction-action"
        ),
        pytest.param(changed(type="share", network={}), Reason.INVALID_FIELD, id="share-network"),
        pytest.param(
            changed(type="participation", participant="alice"),
            Reason.INVALID_FIELD,
            id="participant-not-object",
        ),
        pytest.param(
            changed(type="participation", participant={"email": 5}),
            Reason.INVALID_FIELD,
            id="participant-email-number",
        ),
        pytest.param(
            changed(type="participation", optins="newsletter"),
            Reason.INVALID_FIELD,
            id="optins-not-list",
        ),
        pytest.param(
            changed(type="participation", optins=["newsletter", 1]),
            Reason.INVALID_FIELD,
            id="optins-not-strings",
        ),
        # Timestamps.
        pytest.param(
            changed(ts="2023-11-14T22:00:00"), Reason.BAD_TIMESTAMP, id="rfc3339-no-offset"
        ),
        pytest.param(changed(ts="2023-11-14"), Reason.BAD_TIMESTAMP, id="date-only"),
        pytest.param(changed(ts="2023-11-14T22:00Z"), Reason.BAD_TIMESTAMP, id="no-seconds"),
        pytest.param(
            changed(ts="2023-02-30T00:00:00Z"), Reason.BAD_TIMESTAMP, id="impossible-date"
        ),
        pytest.param(changed(ts="2023-11-14T24:00:00Z"), Reason.BAD_TIMESTAMP, id="hour-24"),
        pytest.param(
            changed(ts="2023-11-14T22:00:00+24:00"), Reason.BAD_TIMESTAMP, id="offset-24h"
        ),
        pytest.param(
            changed(ts="2023-11-14T22:00:00Z\n"), Reason.BAD_TIMESTAMP, id="trailing-newline"
        ),
        pytest.param(changed(ts=" 2023-11-14T22:00:00Z"), Reason.BAD_TIMESTAMP, id="leading-space"),
        pytest.param(changed(ts="1969-12-31T23:59:59Z"), Reason.BAD_TIMESTAMP, id="before-epoch"),
        pytest.param(changed(ts="yesterday"), Reason.BAD_TIMESTAMP, id="prose"),
        pytest.param(changed(ts=str(H_MS)), Reason.BAD_TIMESTAMP, id="ms-as-string"),
        pytest.param(changed(ts=float(H_MS)), Reason.BAD_TIMESTAMP, id="float-ms"),
        pytest.param(changed(ts=1.5), Reason.BAD_TIMESTAMP, id="fractional-float"),
        pytest.param(changed(ts=True), Reason.BAD_TIMESTAMP, id="bool-true"),
        pytest.param(changed(ts=False), Reason.BAD_TIMESTAMP, id="bool-false"),
        pytest.param(changed(ts=-1), Reason.BAD_TIMESTAMP, id="negative-ms"),
        pytest.param(changed(ts=MAX_TS_MS + 1), Reason.BAD_TIMESTAMP, id="after-year-9999"),
        pytest.param(changed(ts=[H_MS]), Reason.BAD_TIMESTAMP, id="list"),
        pytest.param(changed(ts={"ms": H_MS}), Reason.BAD_TIMESTAMP, id="object"),
        # Types: only the four of v1, case-sensitive.
        pytest.param(changed(type="click"), Reason.UNKNOWN_TYPE, id="unknown-type"),
        pytest.param(changed(type="opt_in"), Reason.UNKNOWN_TYPE, id="later-version-type"),
        pytest.param(changed(type="PAGE_VIEW"), Reason.UNKNOWN_TYPE, id="type-upper-case"),
        pytest.param(changed(type=""), Reason.UNKNOWN_TYPE, id="type-empty"),
    ],
)
def test_event_rejections(obj: dict[str, Any], reason: Reason) -> None:
    value = dumps(obj)
    item = one(value)
    assert isinstance(item, Rejection)
    assert item.reason is reason
    assert item.raw == value and item.index is None
    # The same event inside an envelope is rejected alone, with its position.
    enveloped = decode_record(dumps([event("ok-1"), obj, event("ok-2")]))
    assert [type(i) for i in enveloped] == [Event, Rejection, Event]
    rejected = enveloped[1]
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.index) == (reason, 1)
    assert orjson.loads(rejected.raw) == obj


def test_integer_ts_beyond_64_bit_is_a_bad_timestamp() -> None:
    value = dumps(event(ts=0)).replace(b'"ts":0', b'"ts":18446744073709551616')
    item = one(value)
    assert isinstance(item, Rejection)
    assert item.reason is Reason.BAD_TIMESTAMP


def test_rejection_message_never_carries_field_values() -> None:
    pii = "alice.secret@example.com"
    obj = changed(type="participation", ts=pii, participant={"email": pii})
    items = decode_record(dumps(obj)) + decode_record(dumps([obj]))
    for item in items:
        assert isinstance(item, Rejection)
        assert pii not in item.message


# --- Accepted events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        pytest.param(0, 0, id="epoch-ms-zero"),
        pytest.param(H_MS, H_MS, id="epoch-ms"),
        pytest.param(MAX_TS_MS, MAX_TS_MS, id="last-ms-of-9999"),
        pytest.param("1970-01-01T00:00:00Z", 0, id="epoch-rfc3339"),
        pytest.param("2023-11-14T22:00:00Z", H_MS, id="utc-Z"),
        pytest.param("2023-11-14t22:00:00z", H_MS, id="lower-case-t-and-z"),
        pytest.param("2023-11-14 22:00:00Z", H_MS, id="space-separator"),
        pytest.param("2023-11-14T22:00:00+00:00", H_MS, id="plus-zero-offset"),
        pytest.param("2023-11-14T23:00:00+01:00", H_MS, id="plus-one-hour"),
        pytest.param("2023-11-14T16:30:00-05:30", H_MS, id="minus-five-thirty"),
        pytest.param("2023-11-14T22:00:00.5Z", H_MS + 500, id="tenths"),
        pytest.param("2023-11-14T22:00:00.123Z", H_MS + 123, id="milliseconds"),
        pytest.param("2023-11-14T22:00:00.123456789Z", H_MS + 123, id="nanoseconds-truncated"),
        pytest.param("2023-11-14T22:00:00.9999Z", H_MS + 999, id="floored-not-rounded"),
        pytest.param("2023-11-14T23:00:00.250+01:00", H_MS + 250, id="fraction-and-offset"),
        pytest.param("9999-12-31T23:59:59.999Z", MAX_TS_MS, id="last-rfc3339-ms"),
    ],
)
def test_timestamps_accepted(ts: object, expected_ms: int) -> None:
    item = one(dumps(event(ts=ts)))
    assert isinstance(item, Event)
    assert item.ts_ms == expected_ms


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
@settings(max_examples=200, deadline=None)
def test_rfc3339_round_trip(naive: datetime, offset_min: int) -> None:
    moment = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    item = one(dumps(event(ts=moment.isoformat())))
    assert isinstance(item, Event)
    assert item.ts_ms == (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(1, id="1-char"),
        pytest.param(128, id="128-chars"),
    ],
)
def test_id_length_bounds_accepted(length: int) -> None:
    ident = "é" * length  # counted in characters, not bytes
    item = one(dumps(event(event_id=ident, campaign_id=ident, visitor_id=ident)))
    assert isinstance(item, Event)
    assert item.event_id == item.campaign_id == item.visitor_id == ident


def test_single_event_object() -> None:
    obj = event("e9", "interaction", H_MS, "camp", "vis", channel="email", action="vote")
    assert decode_record(dumps(obj)) == [
        Event("e9", EventType.INTERACTION, H_MS, "camp", "vis", "email", action="vote")
    ]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"[]", id="empty"),
        pytest.param(b" [ \n ] ", id="empty-with-whitespace"),
    ],
)
def test_empty_envelope_gives_nothing(value: bytes) -> None:
    assert decode_record(value) == []


def test_envelope_keeps_record_order() -> None:
    objs = [event(f"e{i}", ts=H_MS + i, visitor_id=f"v{i % 3}") for i in range(5)]
    items = decode_record(dumps(objs))
    assert [i.event_id for i in items if isinstance(i, Event)] == [f"e{i}" for i in range(5)]


def test_envelope_rejects_non_objects_one_by_one() -> None:
    items = decode_record(dumps([1, event("ok"), [event("nested")], None]))
    assert [(type(i).__name__, getattr(i, "index", None)) for i in items] == [
        ("Rejection", 0),
        ("Event", None),
        ("Rejection", 2),
        ("Rejection", 3),
    ]
    assert all(i.reason is Reason.NOT_AN_OBJECT for i in items if isinstance(i, Rejection))


@pytest.mark.parametrize(
    ("obj", "channel"),
    [
        pytest.param(event(), "unknown", id="absent-defaults-to-unknown"),
        pytest.param(event(channel=None), "unknown", id="null-defaults-to-unknown"),
        pytest.param(event(channel="facebook"), "facebook", id="given"),
    ],
)
def test_channel(obj: dict[str, Any], channel: str) -> None:
    item = one(dumps(obj))
    assert isinstance(item, Event)
    assert item.channel == channel


@pytest.mark.parametrize(
    ("obj", "participant"),
    [
        pytest.param(
            event(
                type="participation",
                participant={"email": "a@b.c", "first_name": "A", "last_name": "B"},
                optins=["newsletter"],
            ),
            Participant("A", "B", "a@b.c"),
            id="full-participant",
        ),
        pytest.param(
            event(type="participation", participant={"email": "a@b.c"}),
            Participant("", "", "a@b.c"),
            id="email-only",
        ),
        pytest.param(event(type="participation"), None, id="no-participant-object"),
        pytest.param(event(type="participation", participant={}), None, id="empty-object"),
        pytest.param(
            event(type="participation", participant={"email": "  ", "first_name": ""}),
            None,
            id="blank-fields-identify-nobody",
        ),
        pytest.param(
            event(type="page_view", participant={"email": "a@b.c"}),
            None,
            id="ignored-on-other-types",
        ),
    ],
)
def test_participant(obj: dict[str, Any], participant: Participant | None) -> None:
    item = one(dumps(obj))
    assert isinstance(item, Event)
    assert item.participant == participant


def test_extra_fields_are_ignored_but_forwarded() -> None:
    obj = event(type="share", network="x", utm={"source": "newsletter"}, score=3.5)
    item = one(dumps(obj))
    assert isinstance(item, Event)
    assert item.network == "x"
    envelope = dumps([event("other"), obj])
    assert orjson.loads(EventJson(dumps(obj))[0]) == obj
    assert orjson.loads(EventJson(envelope)[1]) == obj


# --- Size limit --------------------------------------------------------------------------------


def test_size_limit_boundary() -> None:
    assert isinstance(one(padded(MAX_EVENT_BYTES)), Event)
    assert one(padded(MAX_EVENT_BYTES + 1)) == Rejection(
        Reason.TOO_LARGE,
        f"event is {MAX_EVENT_BYTES + 1} bytes, over 64 KiB",
        padded(MAX_EVENT_BYTES + 1),
    )


def test_too_large_event_inside_envelope_rejects_only_that_event() -> None:
    big = event("big", pad="x" * MAX_EVENT_BYTES)
    items = decode_record(dumps([event("before"), big, event("after")]))
    assert [type(i) for i in items] == [Event, Rejection, Event]
    rejected = items[1]
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.index) == (Reason.TOO_LARGE, 1)
    assert orjson.loads(rejected.raw) == big


def test_envelope_over_64KiB_of_small_events_is_accepted() -> None:
    objs = [event(f"e{i}", pad="y" * 100) for i in range(1000)]
    value = dumps(objs)
    assert len(value) > MAX_EVENT_BYTES
    items = decode_record(value)
    assert len(items) == 1000 and all(isinstance(i, Event) for i in items)


def test_invalid_event_inside_large_envelope_keeps_its_reason() -> None:
    objs = [event(f"e{i}", pad="y" * 100) for i in range(1000)]
    objs[500] = changed(ts="2023-11-14T22:00:00")
    items = decode_record(dumps(objs))
    rejections = [i for i in items if isinstance(i, Rejection)]
    assert [(r.reason, r.index) for r in rejections] == [(Reason.BAD_TIMESTAMP, 500)]


# --- Nesting: a rejection, never a crash, and every accepted event can be re-encoded ----------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    "depth",
    [
        pytest.param(300, id="300-levels"),
        pytest.param(1000, id="1000-levels"),
        pytest.param(5000, id="5000-levels"),
    ],
)
def test_deep_nesting_is_a_rejection(depth: int) -> None:
    # as a record, inside an envelope, and as an extra field of an otherwise valid event
    head = dumps(event("deep"))[:-1] + b', "extra": '
    for value in (nested(depth), b"[" + nested(depth) + b"]", head + nested(depth) + b"}"):
        items = decode_record(value)
        assert len(items) == 1 and isinstance(items[0], Rejection)


def test_deep_event_inside_envelope_rejects_only_that_event() -> None:
    deep = dumps(event("deep"))[:-1] + b', "extra": ' + nested(300) + b"}"
    value = b"[" + dumps(event("ok-1")) + b"," + deep + b"," + dumps(event("ok-2")) + b"]"
    items = decode_record(value)
    assert [type(i) for i in items] == [Event, Rejection, Event]
    assert isinstance(items[1], Rejection) and items[1].index == 1


@pytest.mark.parametrize(
    "depth",
    [
        pytest.param(10, id="10-levels"),
        pytest.param(200, id="200-levels"),
    ],
)
def test_moderately_nested_extra_fields_are_accepted_and_re_encodable(depth: int) -> None:
    value = dumps(event("deep"))[:-1] + b', "extra": ' + nested(depth) + b"}"
    item = one(value)
    assert isinstance(item, Event)
    assert orjson.loads(EventJson(value)[0]) == orjson.loads(value)  # forwardable


# --- Properties --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
field_values = st.one_of(
    json_values, st.sampled_from(["page_view", "share", "2023-11-14T22:00:00Z"])
)
event_like = st.dictionaries(
    st.sampled_from(
        ["event_id", "type", "ts", "campaign_id", "visitor_id", "channel", "participant", "optins"]
    ),
    field_values,
)


def check_shape(value: bytes, items: list[Event | Rejection]) -> None:
    assert isinstance(items, list)
    for index, item in enumerate(items):
        assert isinstance(item, Event | Rejection)
        if isinstance(item, Rejection):
            assert item.reason in Reason
            assert isinstance(item.raw, bytes)
        else:
            EventJson(value)[index]  # an accepted event can always be forwarded


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(value: bytes) -> None:
    check_shape(value, decode_record(value))


@given(st.one_of(json_values, event_like, st.lists(st.one_of(event_like, json_values), max_size=5)))
@settings(max_examples=150, deadline=None)
def test_random_json_never_raises_and_keeps_one_item_per_element(value: Any) -> None:
    items = decode_record(dumps(value))
    check_shape(dumps(value), items)
    assert len(items) == (len(value) if isinstance(value, list) else 1)
    for i, item in enumerate(items):
        if isinstance(item, Rejection):
            assert item.index == (i if isinstance(value, list) else None)


@given(
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"a":', b"1", b",", b"\xff"]), max_size=80)
)
@settings(max_examples=200, deadline=None)
def test_json_like_garbage_never_raises(parts: list[bytes]) -> None:
    value = b"".join(parts)
    check_shape(value, decode_record(value))


# --- The typed check (C) agrees with the reference validator (Python) ---------------------------
#
# validate() converts an object into Event, whose field types are the contract's rules, and falls
# back to the field-by-field reference only when the types refuse it. The types may be stricter
# than the contract (a fallback then finds the object valid), never looser, and an object they
# accept must give the reference's event exactly.

edge_ids = st.one_of(
    st.sampled_from(["", "a", "x" * 128, "x" * 129, "é" * 128, "é" * 129, "😀" * 128, "😀" * 129]),
    st.text(max_size=3),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=4)
)
ts_values = st.one_of(
    st.sampled_from([0, -1, MAX_TS_MS, MAX_TS_MS + 1, True, 1.0, None]),
    st.sampled_from(["2023-11-14T22:00:00Z", "2023-11-14T22:00:00"]),
    st.integers(-(2**63), 2**64 - 1),  # what JSON encoders write
)
PERSON = ("first_name", "last_name", "email", "phone")
REQUIRED = ("event_id", "type", "ts", "campaign_id", "visitor_id")
valid_ids = st.text(min_size=1, max_size=5)
valid_required = st.fixed_dictionaries(
    {
        "event_id": valid_ids,
        "type": st.sampled_from([t.value for t in EventType]),
        "ts": st.integers(0, MAX_TS_MS),
        "campaign_id": valid_ids,
        "visitor_id": valid_ids,
    }
)
# A few required fields changed to anything, or removed.
changes = st.dictionaries(
    st.sampled_from(REQUIRED),
    st.one_of(
        edge_ids,
        scalars,
        ts_values,
        st.sampled_from(["PAGE_VIEW", "other", *(t.value for t in EventType)]),
        st.just(MISSING),
    ),
    max_size=2,
)
# Optional fields, often of their type (so that the types accept the event), or anything.
optional_fields = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.one_of(st.sampled_from(["", " ", "web"]), scalars),
        "participant": st.one_of(
            *(
                st.fixed_dictionaries({}, optional=dict.fromkeys(PERSON, values))
                for values in (st.sampled_from(["", " ", "A", "a@b.c"]), scalars)
            ),
            scalars,
        ),
        "optins": st.one_of(st.lists(st.text(max_size=3), max_size=2), st.lists(scalars), scalars),
        "logged_in": st.one_of(st.booleans(), scalars),
        **{
            name: st.one_of(st.text(max_size=3), scalars)
            for name in ("page", "page_type", "action", "network", "utm_source")
        },
    },
)


@st.composite
def near_events(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events, some with required fields changed or removed, with any optional fields."""
    obj = {**draw(valid_required), **draw(changes), **draw(optional_fields)}
    return {name: value for name, value in obj.items() if value is not MISSING}


def reference(obj: Any) -> Event | Reason:
    try:
        return _validate_fully(obj)
    except _Invalid as invalid:
        return invalid.reason


@given(near_events())
@settings(max_examples=600, deadline=None)
def test_what_the_types_accept_the_reference_accepts_identically(obj: dict[str, Any]) -> None:
    try:
        typed = msgspec.convert(obj, Event)
    except msgspec.ValidationError:
        return  # refused: validate() asks the reference
    assert _settled(typed) == reference(obj)


@given(st.lists(near_events(), max_size=6))
@settings(max_examples=200, deadline=None)
def test_an_envelope_decodes_as_its_elements_do_one_by_one(objs: list[dict[str, Any]]) -> None:
    value = dumps(objs)
    items = decode_record(value)
    expected = [reference(o) for o in orjson.loads(value)]  # as JSON has them (inf is null)
    assert [i if isinstance(i, Event) else i.reason for i in items] == expected


def test_a_well_formed_event_takes_the_typed_check_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(obj: object) -> Event:
        raise AssertionError("the reference validator was called")

    monkeypatch.setattr(events_module, "_validate_fully", refuse)
    objs = [
        event("a", channel="web", page="/", page_type="landing", logged_in=True, utm={"x": [1]}),
        event("b", "interaction", action="vote", channel=""),
        event("c", "participation", participant={"email": "a@b.c"}, optins=["news"]),
        event("d", "participation", participant={"email": " "}),
        event("e", "share", network="x", participant={"email": "a@b.c"}),
    ]
    items = decode_record(dumps(objs))
    assert [type(i) for i in items] == [Event] * 5
    assert [i.channel for i in items] == ["web", "unknown", "unknown", "unknown", "unknown"]
    assert [i.participant for i in items] == [None, None, Participant(email="a@b.c"), None, None]


# --- Decoding the text straight into events agrees with decoding it into objects first ---------
#
# decode_record() first decodes the text straight into events (msgspec), refusing any field the
# contract does not name, and decodes it into objects (orjson) only when that fails. Where the
# first decodes, the second must give the same events: the texts below are near-events written
# in the ways JSON allows (spacing, escapes, repeated keys) and with what one parser may accept
# and the other not (invalid UTF-8, numbers out of range, lone surrogates) in any field.

ODD_VALUES = [
    b"1e400",
    b"-1e309",
    b"1" + b"0" * 400,
    b"123456789012345678901234567890",
    b"18446744073709551616",
    b"1.0",
    b"-0",
    b'"\xff"',  # invalid UTF-8
    b'"\xed\xa0\x80"',  # a surrogate in UTF-8 (invalid)
    b'"\\ud800"',  # a lone surrogate, escaped
    b'"\\u00e9\\u0000"',
    b'"\\x41"',  # an escape JSON does not have
    b"[1e999]",
    b"{}",
    b"null",
    b"tru",
]


def ascii_json(value: Any) -> bytes:
    """JSON with every non-ASCII character escaped (``\\u00e9``, surrogate pairs)."""
    return json.dumps(orjson.loads(dumps(value)), ensure_ascii=True).encode()


@st.composite
def written(draw: st.DrawFn, obj: Any) -> bytes:
    """``obj`` as JSON text, written in one of the ways JSON allows, sometimes spoiled."""
    if not isinstance(obj, dict):
        return dumps(obj)
    encode = draw(st.sampled_from([dumps, ascii_json]))
    pairs = [(encode(k), encode(v)) for k, v in obj.items()]
    if pairs and draw(st.booleans()):  # a repeated key: the last one counts
        k, _ = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (k, encode(draw(scalars))))
    if draw(st.booleans()):  # an odd value, in an extra field or in one the contract names
        name = draw(st.sampled_from(["x", *REQUIRED, "page", "channel", "participant"]))
        pairs.append((dumps(name), draw(st.sampled_from(ODD_VALUES))))
    space = draw(st.sampled_from([b"", b" ", b"\n\t "]))
    return b"{" + space + (b"," + space).join(k + b":" + space + v for k, v in pairs) + b"}"


@st.composite
def event_texts(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(written(draw(near_events())))
    objs = draw(st.lists(near_events(), max_size=5))
    return b"[" + b",".join(draw(written(o)) for o in objs) + b"]"


def exact_or_reference(value: bytes) -> tuple[list[Event | Rejection] | None, list[Any]]:
    first, size = value.lstrip()[:1], len(value)
    return _decode_exact(value, first, size), _decode_objects(value, first, size)


@given(event_texts())
@settings(max_examples=1500, deadline=None)
def test_what_decodes_straight_into_events_decodes_identically_through_objects(
    value: bytes,
) -> None:
    exact, reference = exact_or_reference(value)
    if exact is not None:
        assert exact == reference
        assert all(isinstance(e, Event) for e in reference)


@pytest.mark.parametrize("odd", ODD_VALUES)
@pytest.mark.parametrize("field", ["x", "ts", "page", "participant"])
def test_an_odd_value_in_any_field_is_judged_by_the_reference(odd: bytes, field: str) -> None:
    # Skipping a field it does not know, msgspec accepts invalid UTF-8 and numbers out of range
    # that orjson refuses: the straight decoding must refuse every field the contract does not name.
    text = dumps(event("o"))[:-1] + b',"' + field.encode() + b'":' + odd + b"}"
    for value in (text, b"[" + text + b"]"):
        exact, reference = exact_or_reference(value)
        assert exact is None or exact == reference
        assert decode_record(value) == reference


def test_contract_fields_only_take_the_straight_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> list[Event | Rejection]:
        raise AssertionError("decoded through objects")

    monkeypatch.setattr(events_module, "_decode_objects", refuse)
    objs = [
        event("a", channel="web", page="/", page_type="landing", logged_in=True),
        event("b", "participation", participant={"first_name": "Zoé"}, optins=["news"]),
    ]
    assert decode_record(dumps(objs)) == [validate(o) for o in objs]
    assert decode_record(b" \n" + dumps(objs[1])) == [validate(objs[1])]
    big = [event(f"e{i}", page="/" + "x" * 100) for i in range(1000)]  # 150 KB of small events
    assert decode_record(dumps(big)) == [validate(o) for o in big]


def test_an_envelope_over_64KiB_with_a_too_large_event_is_read_by_the_reference() -> None:
    objs = [event("small"), event("big", page="x" * MAX_EVENT_BYTES)]
    items = decode_record(dumps(objs))
    assert items[0] == validate(objs[0])
    assert isinstance(items[1], Rejection) and items[1].reason is Reason.TOO_LARGE
