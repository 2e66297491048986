"""How records look on the wire: the JSON bodies the routes answer with."""

from __future__ import annotations

from typing import Any

from models.connections import ConnectionRecord
from models.moments import iso
from models.transfers import TransferRecord

__all__ = ["iso", "render_connection", "render_transfer"]


def render_transfer(record: TransferRecord) -> dict[str, Any]:
    """The record as BitGo reads it: ``allocationId`` or ``deallocationId`` and the rest."""
    out: dict[str, Any] = {
        record.kind.id_field: str(record.transfer_id),
        f"partners{record.kind.label}Id": str(record.partners_transfer_id),
        "amount": {"currency": record.currency, "quantity": str(record.quantity)},
        "clientId": str(record.client_id),
        "connectionId": str(record.connection_id),
        "partnersClientId": record.partners_client_id,
        "partnersConnectionId": record.partners_connection_id,
        "status": record.status.value,
        "createdAt": iso(record.created_at),
        "updatedAt": iso(record.updated_at),
    }
    if record.rejection_reason is not None:
        out["rejectionReason"] = record.rejection_reason
    return out


def render_connection(record: ConnectionRecord) -> dict[str, Any]:
    return {
        "clientId": str(record.client_id),
        "connectionId": str(record.connection_id),
        "partnersClientId": record.partners_client_id,
        "partnersConnectionId": record.partners_connection_id,
    }
