"""Events of contract v1: decoding records and validating event objects.

A record value is UTF-8 JSON, either one event object or a JSON array of them (an envelope). A bad
event inside an envelope rejects that event only. Bad input is data: every problem becomes a
:class:`Rejection` with one of the contract's reasons, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final

import msgspec
import orjson

MAX_EVENT_BYTES: Final = 64 * 1024
MAX_ID_CHARS: Final = 128
# 0001-01-01 .. 9999-12-31 would fit datetime, but epoch ms before 1970 is no campaign event.
MAX_TS_MS: Final = 253_402_300_799_999


class Reason(StrEnum):
    """Why an event was rejected (label ``reason`` of ``kpi_events_rejected_total``)."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    INVALID_UTF8 = "invalid_utf8"
    PROCESSING_ERROR = "processing_error"
    """Not about the event: the worker failed on the record (a bug), and dead-lettered it."""


class EventType(StrEnum):
    """The event types of contract v1."""

    PAGE_VIEW = "page_view"
    INTERACTION = "interaction"
    PARTICIPATION = "participation"
    SHARE = "share"


_TYPES: Final = {t.value: t for t in EventType}
_PARTICIPATION: Final = EventType.PARTICIPATION  # a member read from its class costs ~0.1 us


_fields: Final = msgspec.structs.astuple


class Participant(msgspec.Struct, frozen=True, gc=False):
    """The identity fields of a participation, as sent (hashed before anything is stored)."""

    first_name: str = ""
    last_name: str = ""
    email: str = ""

    def __eq__(self, other: object) -> bool:  # a subclass's (decoded from JSON) too
        return isinstance(other, Participant) and _fields(self) == _fields(other)

    def __hash__(self) -> int:
        return hash(_fields(self))


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Ts = Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]


class Event(msgspec.Struct, gc=False):
    """A valid event.

    Its field types are the contract's rules. A record whose events have only the contract's
    fields decodes from its text straight into events (:class:`_ExactEvent`, one C call); any
    other is decoded into objects, which :func:`validate` checks against the types in one C call
    (``msgspec.convert``), and only an object that fails them is checked again field by field, in
    Python, for the precise reason (or found valid: the per-type fields are checked only for the
    types that name them). Events compare equal by their fields, whichever way they were decoded.

    Attributes:
        event_id: Unique id, 1..128 chars.
        type: The event type.
        ts_ms: Event time, epoch milliseconds (UTC); ``ts`` in JSON.
        campaign_id: The campaign, 1..128 chars.
        visitor_id: The anonymous visitor, 1..128 chars.
        channel: Traffic source, ``"unknown"`` when absent.
        participant: Identity of a participation, ``None`` when absent (the visitor then is the
            participant), and on the other types.
        page, page_type, logged_in, action, network, optins: The per-type optional fields, when
            sent with their JSON type (``None`` otherwise); v1 counts nothing from them.
    """

    event_id: _Id
    type: EventType
    ts_ms: _Ts = msgspec.field(name="ts")
    campaign_id: _Id
    visitor_id: _Id
    channel: str = "unknown"
    participant: Participant | None = None
    page: str | None = None
    page_type: str | None = None
    logged_in: bool | None = None
    action: str | None = None
    network: str | None = None
    optins: list[str] | None = None

    def __eq__(self, other: object) -> bool:  # a subclass's (decoded from JSON) too
        return isinstance(other, Event) and _fields(self) == _fields(other)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event (or record) refused, with what goes to the dead-letter topic.

    Attributes:
        reason: The contract's reason.
        message: A short human explanation (never contains field values: they may be PII).
        raw: The original bytes for a whole record; for one event of an envelope, that event
            serialized again as JSON (the whole record when it is nested too deeply to encode).
        index: Position inside the envelope, ``None`` for a whole record.
    """

    reason: Reason
    message: str
    raw: bytes
    index: int | None = None


class _Invalid(Exception):
    """Internal: carries a rejection out of the nested validators."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
# ``\Z``, not ``$`` (which also matches before a trailing newline); ASCII digits only.
_RFC3339: Final = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII
)


def parse_ts_ms(value: object) -> int:
    """Event time in epoch milliseconds from an integer (ms) or an RFC 3339 string with offset.

    Args:
        value: The ``ts`` field as decoded from JSON.

    Returns:
        Epoch milliseconds.

    Raises:
        _Invalid: with ``bad_timestamp`` for floats, booleans, strings without an offset,
            impossible dates, and anything outside 1970..9999.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        ts_ms = value
    elif isinstance(value, str):
        match = _RFC3339.match(value)
        if match is None:
            raise _Invalid(Reason.BAD_TIMESTAMP, "ts is not RFC 3339 with an offset")
        date, time, fraction, offset = match.groups()
        micros = (fraction or ".")[1:7].ljust(6, "0")
        offset = "+00:00" if offset in ("Z", "z") else offset
        try:
            parsed = datetime.fromisoformat(f"{date}T{time}.{micros}{offset}")
        except ValueError:
            raise _Invalid(Reason.BAD_TIMESTAMP, "ts is not a valid date") from None
        ts_ms = (parsed - _EPOCH) // _ONE_MS  # exact integer arithmetic, no float seconds
    else:
        raise _Invalid(Reason.BAD_TIMESTAMP, "ts must be epoch milliseconds or an RFC 3339 string")
    if not 0 <= ts_ms <= MAX_TS_MS:
        raise _Invalid(Reason.BAD_TIMESTAMP, "ts is out of range")
    return ts_ms


def _required_id(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise _Invalid(Reason.MISSING_FIELD, f"{name} is missing")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise _Invalid(Reason.INVALID_FIELD, f"{name} must be a string of 1..{MAX_ID_CHARS} chars")
    return value


def _optional(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if value is not None and not isinstance(value, kind):
        raise _Invalid(Reason.INVALID_FIELD, f"{name} has the wrong type")
    return value


def _participant(obj: dict[str, Any]) -> Participant | None:
    raw = _optional(obj, "participant", dict)
    optins = _optional(obj, "optins", list)
    if optins is not None and not all(isinstance(o, str) for o in optins):
        raise _Invalid(Reason.INVALID_FIELD, "optins must be a list of strings")
    if raw is None:
        return None
    fields = [_optional(raw, name, str) or "" for name in ("first_name", "last_name", "email")]
    return _identifying(Participant(*fields))


def _identifying(participant: Participant) -> Participant | None:
    """``None`` for a participant whose fields are all blank: it identifies nobody (the visitor
    is the participant)."""
    p = participant
    return p if p.first_name.strip() or p.last_name.strip() or p.email.strip() else None


# Optional fields each type names, with their JSON types (checked, otherwise ignored in v1).
_TYPED_FIELDS: Final[dict[EventType, tuple[tuple[str, type], ...]]] = {
    EventType.PAGE_VIEW: (("page", str), ("page_type", str), ("logged_in", bool)),
    EventType.INTERACTION: (("action", str),),
    EventType.PARTICIPATION: (),
    EventType.SHARE: (("network", str),),
}
_KEPT_FIELDS: Final = tuple(pair for fields in _TYPED_FIELDS.values() for pair in fields)

_convert: Final = msgspec.convert
_Failed: Final = msgspec.ValidationError
_EVENTS: Final = list[Event]


class _ExactParticipant(Participant, frozen=True, forbid_unknown_fields=True):
    """A participant with no field but its own (see :class:`_ExactEvent`)."""


class _ExactEvent(Event, forbid_unknown_fields=True):
    """An event whose JSON has no field but the contract's: the record's JSON decodes straight
    into it (msgspec, no intermediate objects). With nothing skipped, everything in the text was
    read into a typed field, so the text is valid wherever it decodes: the parser that skips an
    unknown field accepts what the reference rejects in it (invalid UTF-8, a number out of range).
    """

    participant: _ExactParticipant | None = None


_EXACT_ENVELOPE: Final = msgspec.json.Decoder(list[_ExactEvent]).decode
_EXACT_EVENT: Final = msgspec.json.Decoder(_ExactEvent).decode
_ELEMENTS: Final = msgspec.json.Decoder(list[msgspec.Raw]).decode
# What msgspec raises on text it refuses (invalid UTF-8 in a string is a UnicodeDecodeError).
_NOT_EXACT: Final = (msgspec.DecodeError, ValueError, RecursionError)


def validate(obj: object) -> Event:
    """Validate one decoded JSON value as an event.

    The contract's rules are :class:`Event`'s field types, checked in C; an object they refuse
    goes through :func:`_validate_fully`, which finds the precise reason, or finds it valid (the
    types check the per-type fields on every type; the contract, only on the types naming them).

    Args:
        obj: A value decoded from JSON.

    Returns:
        The event.

    Raises:
        _Invalid: with the rejection reason (module-internal; use :func:`decode_record`).
    """
    try:
        event: Event = _convert(obj, Event)
    except _Failed:
        return _validate_fully(obj)
    return _settled(event)


def _settled(event: Event) -> Event:
    """What the types cannot say: an empty channel is ``unknown``; only a participation has a
    participant, and only one who is somebody."""
    if not event.channel:
        event.channel = "unknown"
    participant = event.participant
    if participant is not None and (
        event.type is not _PARTICIPATION or _identifying(participant) is None
    ):
        event.participant = None
    return event


def _all_settled(events: Sequence[Event]) -> list[Event | Rejection]:
    """:func:`_settled` on a record's typed events, where it may change one (most it would not)."""
    for event in events:
        if event.participant is not None or not event.channel:
            _settled(event)
    return events  # type: ignore[return-value]  # a list, read-only from here


def _validate_fully(obj: object) -> Event:
    """:func:`validate`, field by field, raising the first problem found (the reference: an
    object :class:`Event`'s types accept gives the same event here)."""
    if not isinstance(obj, dict):
        raise _Invalid(Reason.NOT_AN_OBJECT, "event is not a JSON object")
    event_id = _required_id(obj, "event_id")
    type_value = obj.get("type")
    if type_value is None:
        raise _Invalid(Reason.MISSING_FIELD, "type is missing")
    if not isinstance(type_value, str):
        raise _Invalid(Reason.INVALID_FIELD, "type must be a string")
    event_type = _TYPES.get(type_value)
    if event_type is None:
        raise _Invalid(Reason.UNKNOWN_TYPE, "type is not a v1 event type")
    if "ts" not in obj or obj["ts"] is None:
        raise _Invalid(Reason.MISSING_FIELD, "ts is missing")
    ts_ms = parse_ts_ms(obj["ts"])
    campaign_id = _required_id(obj, "campaign_id")
    visitor_id = _required_id(obj, "visitor_id")
    channel = _optional(obj, "channel", str) or "unknown"
    for name, kind in _TYPED_FIELDS[event_type]:
        _optional(obj, name, kind)
    participant = _participant(obj) if event_type is EventType.PARTICIPATION else None
    # Kept when well typed, whatever the type (as Event's types keep them).
    kept: dict[str, Any] = {
        name: value for name, kind in _KEPT_FIELDS if isinstance(value := obj.get(name), kind)
    }
    optins = obj.get("optins")
    if isinstance(optins, list) and all(isinstance(o, str) for o in optins):
        kept["optins"] = optins
    return Event(event_id, event_type, ts_ms, campaign_id, visitor_id, channel, participant, **kept)


def _one(obj: object, raw: bytes | None, index: int | None) -> Event | Rejection:
    try:
        return validate(obj)
    except _Invalid as invalid:
        if raw is None:
            raw = orjson.dumps(obj)
        return Rejection(invalid.reason, invalid.message, raw, index)


class EventJson:
    """The JSON of a record's events, as forwarded or dead-lettered: each event object encoded
    again, with its extra fields. Events keep no copy of their object: the record is decoded
    again when one is asked for, once.

    Args:
        value: The record's value (an event object, or an envelope of them).
    """

    __slots__ = ("_objects", "_value")

    def __init__(self, value: bytes) -> None:
        self._value = value
        self._objects: list[Any] | None = None

    def __getitem__(self, index: int) -> bytes:
        """The JSON of the record's ``index``-th event (its item of :func:`decode_record`)."""
        objects = self._objects
        if objects is None:
            decoded = orjson.loads(self._value)
            objects = self._objects = decoded if isinstance(decoded, list) else [decoded]
        return orjson.dumps(objects[index])


# orjson decodes up to 1024 levels of nesting but encodes at most this many: an event nested
# deeper could be neither forwarded nor dead-lettered as JSON, so it is rejected as invalid JSON.
_MAX_ENCODABLE_DEPTH: Final = 254
_TOO_DEEP: Final = f"event is nested more than {_MAX_ENCODABLE_DEPTH} levels deep"


def _encode(obj: object) -> bytes | None:
    """``obj`` as JSON, ``None`` when nested too deeply to encode."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return None


def decode_record(value: bytes | None) -> list[Event | Rejection]:
    """Decode one record value into its events and rejections, in record order.

    Args:
        value: The record's value bytes (``None`` for a tombstone).

    Returns:
        One item per event (an envelope gives one per element; an empty envelope gives none).
        A record that cannot be decoded at all gives a single whole-record rejection.
    """
    if value is None:
        return [Rejection(Reason.NOT_AN_OBJECT, "record has no value (tombstone)", b"")]
    size = len(value)
    first = value.lstrip()[:1]
    if size > MAX_EVENT_BYTES and first != b"[":
        return [Rejection(Reason.TOO_LARGE, f"event is {size} bytes, over 64 KiB", value)]
    exact = _decode_exact(value, first, size)
    return exact if exact is not None else _decode_objects(value, first, size)


def _decode_exact(value: bytes, first: bytes, size: int) -> list[Event | Rejection] | None:
    """The common case in one C call per record: valid events with only the contract's fields,
    decoded from the text straight into events. ``None`` for anything else (the reference,
    :func:`_decode_objects`, then finds the reasons and the events with extra fields)."""
    events: list[_ExactEvent]
    try:
        if first == b"[":
            if size > MAX_EVENT_BYTES and any(len(e) > MAX_EVENT_BYTES for e in _ELEMENTS(value)):
                return None  # an element may be too large (its text, compacted, is never larger)
            events = _EXACT_ENVELOPE(value)
        elif first == b"{":
            events = [_EXACT_EVENT(value)]
        else:
            return None
    except _NOT_EXACT:
        return None
    return _all_settled(events)


def _decode_objects(value: bytes, first: bytes, size: int) -> list[Event | Rejection]:
    """:func:`decode_record` through the decoded JSON objects, one by one when need be: the
    reference (its events equal :func:`_decode_exact`'s where that decodes)."""
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return [Rejection(Reason.INVALID_UTF8, "record is not valid UTF-8", value)]
        return [Rejection(Reason.INVALID_JSON, f"invalid JSON: {exc.msg}"[:200], value)]
    # Nesting too deep to encode needs more opening brackets than that (a cheap pre-check).
    deep = value.count(b"[") + value.count(b"{") > _MAX_ENCODABLE_DEPTH
    if not isinstance(decoded, list):
        if deep and _encode(decoded) is None:
            return [Rejection(Reason.INVALID_JSON, _TOO_DEEP, value)]
        return [_one(decoded, value, None)]
    if size <= MAX_EVENT_BYTES and not deep:
        # No element can exceed the limit when the whole envelope does not: skip re-encoding.
        try:
            events: list[Event] = _convert(decoded, _EVENTS)  # the common case: one C call
        except _Failed:
            pass
        else:
            return _all_settled(events)
        items: list[Event | Rejection] = []
        append = items.append
        for i, obj in enumerate(decoded):
            try:
                append(validate(obj))
            except _Invalid as invalid:
                append(Rejection(invalid.reason, invalid.message, orjson.dumps(obj), i))
        return items
    out: list[Event | Rejection] = []
    for i, obj in enumerate(decoded):
        raw = _encode(obj)
        if raw is None:
            # Not encodable: the dead-letter record carries the whole envelope (and the index).
            out.append(Rejection(Reason.INVALID_JSON, _TOO_DEEP, value, i))
        elif len(raw) > MAX_EVENT_BYTES:
            out.append(
                Rejection(Reason.TOO_LARGE, f"event is {len(raw)} bytes, over 64 KiB", raw, i)
            )
        else:
            out.append(_one(obj, raw, i))
    return out
