"""The receiving half of adw-agent: events in, live workflow state out.

Install with ``pip install 'adw-agent[backend]'``. Two ways to run it:

- ``adw-agent serve [--host H] [--port P] [--database URL] [--token-file F]
  [--read-token-file F]``: a standalone service; ``--port 0`` picks a free port and the first
  line of standard output is the URL. The default database is the embedded SQLite file
  ``adw-backend.db``; a ``postgresql://`` URL uses PostgreSQL (replicas share it and see each
  other's events through LISTEN/NOTIFY).
- ``app.include_router(create_router(settings=Settings(...), on_applied=callback))`` in an
  existing FastAPI app (see :mod:`adw_backend.router`).

Layout: :mod:`~adw_backend.settings` (the one frozen config), :mod:`~adw_backend.intake`
(bodies read with a bound, parsed and checked), :mod:`~adw_backend.projection` (pure folding
rules), :mod:`~adw_backend.store` (all SQL, in front of :mod:`~adw_backend.store_schema`:
tables, engine, transactions; :mod:`~adw_backend.store_ingest`: the write path;
:mod:`~adw_backend.store_cache`: the SQLite projection cache; :mod:`~adw_backend.store_reads`:
the reads), :mod:`~adw_backend.broadcast` (WebSocket fan-out, replica notices),
:mod:`~adw_backend.service` (what the routes share, started once), :mod:`~adw_backend.router`
(HTTP and WebSocket routes), :mod:`~adw_backend.app` and :mod:`~adw_backend.serve` (the
standalone service), :mod:`~adw_backend.errors`. The event models come from
:mod:`agent.events`.

Routes
------
- ``POST /api/v1/event/{type}``: one envelope. ``POST /api/v1/events``: a JSON array of up to
  1,000 envelopes in one transaction. Both answer ``{"accepted": n, "duplicates": m}``; a
  re-sent event (same ``event_id``) is a duplicate and changes nothing.
- ``GET /api/v1/workflows[?status=running|completed|failed][&limit=N]`` → ``{"workflows":
  [projection…]}``, most recently updated first (1,000 by default, at most 10,000).
- ``GET /api/v1/workflows/{adw_id}`` → the projection (404 if unknown).
- ``GET /api/v1/workflows/{adw_id}/events?after_seq=N&limit=K`` → ``{"events": [envelope…]}``
  in (epoch, seq) order (``after_epoch=E`` makes the cursor ``(E, N)``).
- ``DELETE /api/v1/workflows/{adw_id}``: an operator forgets a workflow and its events.
- ``WS /ws/workflows``; ``GET /healthz`` (200 while the database answers, else 503);
  ``GET /`` the live page (``static/index.html``).

Auth: when tokens are configured, every route except ``/`` and ``/healthz`` needs
``Authorization: Bearer <token>`` (401 otherwise). Read tokens may GET and open the WebSocket
only. A browser cannot set headers on a WebSocket, so ``/ws/workflows?token=…`` works too.
Errors are ``{"detail": "one line"}``: 400/413/422 for bad input, 401, 404, 503 (with
``Retry-After``) when the database does not answer.

Projection (JSON) per ADW
-------------------------
::

    {"adw_id", "revision": int, "status": "running"|"completed"|"failed",
     "state": {every key of the newest adw_state.json snapshot},
     "current_phase", "completed_phases": [...], "phase_costs": {phase: float|null},  # ≤ 100
     "failed_phase", "last_error",
     "cost": {"current_cost", "settled_cost", "final", "estimated_share",
              "estimate_complete", "tokens": {...}, "breakdown": {...}},
     "cost_points": [{"t": iso, "cost": float, "phase": str|null}, ...],  # ≤ 500, time order
     "agent": {"state", "version", "last_heartbeat": iso|null, "outbox_depth",
               "oldest_undelivered_age", "last_delivery_error", "storage_error",
               "dead_letters"},
     "created_at", "updated_at", "ended_at"}   # event timestamps (ISO 8601) or null

``revision`` is one more for each event applied to the workflow (0 for a projection stored
before revisions existed): of two projections of one workflow, the larger revision is newer.
Values never seen are null (``cost.final`` false, ``tokens``/``breakdown`` empty). At most 100
completed phases are kept per workflow, and phase names are cut to 200 characters.

WebSocket messages
------------------
On connect, one ``{"type": "workflows_snapshot", "data": {"workflows": [projection…]},
"timestamp", "source": "backend"}`` holding the 1,000 most recently updated workflows. Then,
per applied event, ``{"type": <event type>, "data": {...event data, "adw_id", "seq", "epoch",
"workflow": <projection after it>}, "timestamp": <event timestamp>, "source": <event source>}``.
A deleted workflow: ``{"type": "workflow_deleted", "data": {"adw_id"}, "timestamp", "source":
"backend"}``. A client that falls behind (``ws_queue`` messages or ``ws_queue_bytes``) is closed
with code 1013 (1001 when the server stops, 1011 when the database does not answer); reconnect
and take the new snapshot.

Two rules for a client. Messages may arrive out of order (a replica publishes its own commits
at once and the other replicas' after loading them), so a message whose ``workflow.revision``
is not above the one held for that workflow is dropped. And a ``workflows_snapshot`` may come
again mid-stream, replacing the whole picture: each time a replica's listener has its
``LISTEN`` in place again after losing it, every client of that replica is sent a fresh one
(see :mod:`~adw_backend.broadcast`).

``GET /healthz`` answers ``{"status": "ok", "database": "up", "ws_clients", "listening"}``, or
503 with ``{"detail", "database": "down", "listening"}``; ``listening`` is null without
PostgreSQL and false while this replica cannot hear the others.
"""

from __future__ import annotations

from adw_backend.router import create_router
from adw_backend.settings import Settings, load_settings

__all__ = ["Settings", "create_router", "load_settings"]
