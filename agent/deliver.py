"""Delivering queued events to the backend, in seq order, over one keep-alive connection.

The sender takes the oldest events in the outbox, up to ``delivery.batch_max``, and POSTs them
as one JSON array until the backend answers (or one event per request, for a backend without
the batch route). Retryable failures (see :mod:`agent.errors`) are retried with capped
exponential backoff and jitter, for ever, honouring ``Retry-After``; a permanent rejection of a
batch splits it, and a permanent rejection of one event moves it to the dead letters. Only a
2xx removes events from the outbox, so a crash at any point means they are sent again, with the
same ``event_id``.

The HTTP side, one exchange and what its answer means, is :mod:`agent.deliver_http`; what
keeps delivery from progressing is reported by :mod:`agent.deliver_problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
)
from tenacity.wait import wait_base

from agent.config import Config
from agent.deliver_http import Exchange, NoBatchRoute, event_fields
from agent.deliver_problems import Problems
from agent.errors import DeliveryError, PermanentDelivery, RetryableDelivery, StorageError
from agent.events import check_data, envelope
from agent.outbox import STORAGE_RETRY, Store
from agent.outbox_queue import Queued

log = logging.getLogger("adw_agent.deliver")


#: The most bytes of events in one batch (an event larger than this goes alone): memory and
#: the backend's request size stay bounded whatever the events hold.
BATCH_BYTES = 1024 * 1024


class _Backoff(wait_base):
    """Exponential backoff with jitter, or later if the backend said when to come back."""

    def __init__(self, initial: float, maximum: float) -> None:
        # wait_exponential_jitter's ``initial`` is deprecated in newer tenacity and its
        # replacement is missing in older ones: compose the same wait from stable parts.
        self._exp = wait_exponential(multiplier=initial, max=maximum)
        self._jitter = initial
        self._max = maximum

    def __call__(self, retry_state: RetryCallState) -> float:
        jitter = random.uniform(0, self._jitter)  # noqa: S311  (spreads retries, not a secret)
        wait = min(float(self._exp(retry_state)) + jitter, self._max)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, RetryableDelivery) and exc.retry_after is not None:
            # Never sooner than the backoff: "Retry-After: 0" must not make a busy loop.
            return max(exc.retry_after, wait)
        return wait


class Sender:
    """Moves events from the outbox to the backend. Runs as one task on the event loop.

    Events go out in batches of up to ``delivery.batch_max`` on ``backend.batch_path``, in seq
    order, or one per request on ``backend.event_path`` when ``batch_max`` is 1 or the backend
    answered 404/405 on the batch route (until the next reload).
    """

    def __init__(self, config: Config, store: Store, client: httpx.AsyncClient) -> None:
        self._config = config
        self._queue = store.queue
        self._exchange = Exchange(config, client)
        self._wake = asyncio.Event()
        # Set by a reload that changed the backend: the current wait ends at once.
        self._backend_changed = asyncio.Event()
        self._storage_warned = False
        self._batching = config.delivery.batch_max > 1
        self.problems = Problems(store)

    @property
    def last_error(self) -> str | None:
        return self.problems.last_error

    @property
    def problem(self) -> str | None:
        """Why delivery cannot make progress on its own, or None (see :class:`Problems`)."""
        return self.problems.problem

    def wake(self) -> None:
        """New events were queued."""
        self._wake.set()

    def replace_client(self, config: Config, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """Use a new backend configuration from the next attempt on; returns the old client.

        If the backend (or the token) changed, a backoff or ``Retry-After`` wait in progress
        ends now: the new backend is tried at once. Whether the backend takes batches is
        found out again.
        """
        old = self._exchange.replace(config, client)
        if config.backend != self._config.backend or config.token != self._config.token:
            self._backend_changed.set()
        self._config = config
        self._batching = config.delivery.batch_max > 1
        return old

    def check_progress(self, now: float | None = None) -> bool:
        """Whether the sender is stalled (see :meth:`Problems.check_progress`)."""
        return self.problems.check_progress(now)

    async def run(self) -> None:
        """Deliver until cancelled. This is the sender's loop boundary: no error ends it. A
        store that cannot be used, or anything unexpected, is logged and tried again after a
        pause, with the event left queued."""
        while True:
            batch: list[Queued] = []
            try:
                limit = self._config.delivery.batch_max if self._batching else 1
                batch = self._queue.head_batch(limit, BATCH_BYTES)
                if not batch:
                    self.problems.idle()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._deliver(batch)
                self._storage_warned = False
            except NoBatchRoute:
                self._batching = False
                continue  # the same events again, one per request
            except StorageError as exc:
                # The event stays queued and is sent again under the same event_id once the
                # store works. Said once, not on every try.
                if not self._storage_warned:
                    self._storage_warned = True
                    extra = event_fields(batch[0]) if batch else {}
                    log.error("sender cannot use the store: %s", exc, extra=extra)
                await self._pause(STORAGE_RETRY)
            except Exception:
                extra = event_fields(batch[0]) if batch else {}
                log.exception("unexpected error in the sender; trying again", extra=extra)
                await self._pause(STORAGE_RETRY)

    async def send_direct(self, event_type: str, data: dict[str, Any], *, adw_id: str) -> bool:
        """POST one event that could not be queued because the store cannot be written.

        Best effort: one attempt, never re-sent. It carries ``seq`` 0, outside the ADW's
        sequence, so it cannot reorder or be mistaken for a queued event. Returns whether the
        backend accepted it.
        """
        body = envelope(event_type, adw_id, 0, "event", check_data(event_type, data))
        event = Queued(0, body["event_id"], event_type, time.time(), 0, orjson.dumps(body))
        try:
            await self._exchange.post(event)
        except DeliveryError as exc:
            log.warning(
                "could not send %s directly: %s", event_type, exc, extra=event_fields(event)
            )
            return False
        return True

    def idle(self) -> bool:
        """Nothing left to send."""
        return self._queue.depth() == 0

    async def _pause(self, seconds: float) -> None:
        self.problems.busy(seconds)
        await asyncio.sleep(seconds)

    async def _sleep(self, seconds: float) -> None:
        """The wait before a retry; a reload that changes the backend ends it."""
        self.problems.busy(seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._backend_changed.wait(), seconds)
            log.info("the backend configuration changed; retrying now")

    async def _deliver(self, batch: list[Queued]) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableDelivery),
            wait=_Backoff(self._config.delivery.backoff_initial, self._config.delivery.backoff_max),
            stop=stop_never,
            before_sleep=lambda state: self._failed(batch, state),
            sleep=self._sleep,
            reraise=True,
        )
        duplicates = 0
        try:
            async for attempt in retrying:
                with attempt:
                    # A reload from here on ends the wait that may follow this attempt.
                    self._backend_changed.clear()
                    self.problems.busy(self._config.backend.timeout)
                    # By the batch in hand, not the current setting: a reload may have turned
                    # batches off since it was taken, and every event of it is acknowledged.
                    if len(batch) > 1 or self._batching:
                        duplicates = await self._exchange.post_batch(batch)
                    else:
                        duplicates = await self._exchange.post(batch[0])
        except PermanentDelivery as exc:
            if len(batch) > 1:
                # One transaction on the backend's side: nothing of the batch was kept. Halve
                # it until only the rejected events are left, in seq order.
                log.warning(
                    "backend rejected a batch of %d events (%s); splitting it",
                    len(batch),
                    exc.status,
                    extra=event_fields(batch[0], last_seq=batch[-1].seq),
                )
                middle = len(batch) // 2
                await self._deliver(batch[:middle])
                await self._deliver(batch[middle:])
                return
            event = batch[0]
            log.error(
                "event dead-lettered: %s",
                exc,
                extra=event_fields(event, status=exc.status, response=exc.body[:200]),
            )
            self.problems.last_error = str(exc)
            self._queue.dead_letter(event, exc.status, exc.body)
            self.problems.verdict()
            return
        self._queue.ack_many([event.seq for event in batch], duplicates)
        self.problems.acknowledged()

    def _failed(self, batch: list[Queued], state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        message = self.problems.failed(batch, exc, state.attempt_number, wait)
        try:
            self._queue.record_failure(batch[0].seq, message)
        except StorageError as err:
            log.error("cannot record the failed attempt: %s", err)
