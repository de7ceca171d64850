"""The reads: workflows, one workflow, its events, and events with their projections."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from adw_backend.errors import NotFound
from adw_backend.projection import EventView, Projection, Status, upgrade
from adw_backend.store_schema import Applied, Database, events, workflows


class Reader:
    """Every read of the store; each one transaction, never waiting for the write turn."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def workflows(self, status: Status | None = None, limit: int = 1000) -> list[Projection]:
        """The ``limit`` most recently updated workflows (or those with ``status``)."""
        query = (
            sa.select(workflows.c.projection)
            .order_by(workflows.c.updated_at.desc(), workflows.c.adw_id)
            .limit(limit)
        )
        if status is not None:
            query = query.where(workflows.c.status == status)
        with self._db.begin(write=False) as conn:
            return [upgrade(row.projection) for row in conn.execute(query)]

    def workflow(self, adw_id: str) -> Projection:
        with self._db.begin(write=False) as conn:
            row = conn.execute(
                sa.select(workflows.c.projection).where(workflows.c.adw_id == adw_id)
            ).first()
        if row is None:
            raise NotFound(f"no workflow {adw_id!r}")
        return upgrade(row.projection)

    def events(
        self, adw_id: str, *, after_seq: int = -1, after_epoch: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Stored events of ``adw_id`` in (epoch, seq) order, as the agent sent them.

        With ``after_epoch``, those after (after_epoch, after_seq); without, those whose seq
        is over ``after_seq`` in any epoch.
        """
        query = sa.select(
            events.c.type,
            events.c.event_id,
            events.c.adw_id,
            events.c.epoch,
            events.c.seq,
            events.c.timestamp,
            events.c.source,
            events.c.data,
        ).where(events.c.adw_id == adw_id)
        if after_epoch is None:
            query = query.where(events.c.seq > after_seq)
        else:
            query = query.where(
                sa.or_(
                    events.c.epoch > after_epoch,
                    sa.and_(events.c.epoch == after_epoch, events.c.seq > after_seq),
                )
            )
        query = query.order_by(events.c.epoch, events.c.seq).limit(limit)
        with self._db.begin(write=False) as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]

    def event_messages(self, event_ids: list[str]) -> list[Applied]:
        """Stored events with their workflows' current projections (for another replica's
        broadcast), in (epoch, seq) order per ADW; events deleted meanwhile are left out."""
        if not event_ids:
            return []
        with self._db.begin(write=False) as conn:
            rows = list(
                conn.execute(
                    sa.select(events)
                    .where(events.c.event_id.in_(event_ids))
                    .order_by(events.c.adw_id, events.c.epoch, events.c.seq)
                )
            )
            ids = sorted({row.adw_id for row in rows})
            current = {
                wf.adw_id: upgrade(wf.projection)
                for wf in conn.execute(
                    sa.select(workflows.c.adw_id, workflows.c.projection).where(
                        workflows.c.adw_id.in_(ids)
                    )
                )
            }
        out: list[Applied] = []
        for row in rows:
            if row.adw_id not in current:
                continue
            view: EventView = {
                "type": row.type,
                "event_id": row.event_id,
                "adw_id": row.adw_id,
                "epoch": row.epoch,
                "seq": row.seq,
                "timestamp": row.timestamp,
                "data": row.data,
            }
            out.append(Applied(view, row.source, current[row.adw_id]))
        return out
