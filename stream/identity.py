"""Participant identities, keyed-hashed before anything is stored.

The identity of a participant is ``(first_name, last_name, email)``, each trimmed and case-folded,
hashed with HMAC-SHA256 under the deployment's secret key. Without a participant object the
participant is the visitor. Only the hash ever leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac

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
        material = "visitor" + _SEP + event.visitor_id
    else:
        parts = (p.first_name, p.last_name, p.email)
        material = "person" + _SEP + _SEP.join(part.strip().casefold() for part in parts)
    return hmac.new(key, material.encode(), hashlib.sha256).hexdigest()[:32]
