"""Participant identities, keyed-hashed before anything is stored.

The identity of a participant is ``(first_name, last_name, email)``, each trimmed and case-folded,
hashed with HMAC-SHA256 under the deployment's secret key. Without a participant object the
participant is the visitor. Only the hash ever leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac

import orjson

from stream.events import Event

_SEP = "\x1f"


def participant_hash(key: bytes, event: Event) -> str:
    """A stable, keyed, irreversible id for the event's participant.

    Args:
        key: The HMAC key (``KPI_IDENTITY_KEY``).
        event: A participation event.

    Returns:
        32 hex characters (128 bits of HMAC-SHA256).
    """
    p = event.participant
    if p is None:
        material = ("visitor" + _SEP + event.visitor_id).encode()
    else:
        parts = [part.strip().casefold() for part in (p.first_name, p.last_name, p.email)]
        # A JSON array, not the parts joined by a separator: a separator inside a field would
        # make two different people one identity.
        material = ("person" + _SEP).encode() + orjson.dumps(parts)
    return hmac.new(key, material, hashlib.sha256).hexdigest()[:32]
