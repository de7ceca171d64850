"""Delivering queued events to the backend, in seq order, over one keep-alive connection.

The sender takes the oldest events in the outbox, up to ``delivery.batch_max``, and POSTs them
as one JSON array until the backend answers (or one event per request, for a backend without
the batch route). Retryable failures (see :mod:`agent.errors`) are retried with capped
exponential backoff and jitter, for ever, honouring ``Retry-After``; a permanent rejection of a
batch splits it, and a permanent rejection of one event moves it to the dead letters. Only a
2xx removes events from the outbox, so a crash at any point means they are sent again, with the
same ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import math
import random
import sqlite3
import ssl
import time
from datetime import UTC
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
)
from tenacity.wait import wait_base

from agent import __version__
from agent.config import Config
from agent.errors import DeliveryError, PermanentDelivery, RetryableDelivery, StorageError
from agent.events import check_data, envelope
from agent.logs import add_secret, redact, redact_excerpt
from agent.outbox import STORAGE_RETRY, Store
from agent.outbox_queue import Queued

log = logging.getLogger("adw_agent.deliver")


RETRYABLE_STATUS = frozenset({401, 403, 408, 425, 429})
#: Answers on the batch route that mean the backend does not have it.
NO_BATCH_STATUS = frozenset({404, 405})
#: The most bytes of events in one batch (an event larger than this goes alone): memory and
#: the backend's request size stay bounded whatever the events hold.
BATCH_BYTES = 1024 * 1024
#: The longest a ``Retry-After`` is honoured; a longer one is cut to this.
MAX_RETRY_AFTER = 600.0
# Slack on top of an exchange or wait before the sender counts as stalled: the store writes
# around an exchange, a busy event loop.
_GRACE = 5.0
_RESPONSE_EXCERPT = 2000
_LOCATION_MAX = 200


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP date is always UTC, never local time
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


async def read_excerpt(response: httpx.Response, limit: int = _RESPONSE_EXCERPT) -> str:
    """The first ``limit`` bytes of a streamed response's body, as text.

    The backend does not decide how much is read: at most one network read past ``limit``,
    the rest is never read (the connection is then closed instead of kept alive). The bytes
    are taken as sent, not decompressed: a small compressed body could expand without bound.
    """
    data = bytearray()
    if response.is_stream_consumed:  # the whole body is in memory already
        data += response.content[:limit]
    else:
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) > limit:
                break
    return data[:limit].decode("utf-8", errors="replace")


class _Answer(BaseModel):
    """A backend's answer to events it accepted: how many were new, how many it had already."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    accepted: Annotated[int, Field(strict=True, ge=0)]
    duplicates: Annotated[int, Field(strict=True, ge=0)]


def reported_duplicates(body: str, sent: int) -> int:
    """How many of the ``sent`` events a 2xx answer says the backend already had.

    0 when the answer does not say (a backend owes no body: the events were delivered all the
    same), or says more than was sent.
    """
    try:
        answer = _Answer.model_validate_json(body)
    except ValidationError:
        return 0
    if answer.accepted + answer.duplicates > sent:
        return 0
    return answer.duplicates


class Redirected(RetryableDelivery):
    """A 3xx: the backend URL is wrong (redirects are never followed), not the event."""

    def __init__(
        self,
        message: str,
        status: int,
        body: str,
        retry_after: float | None,
        *,
        location: str,
    ) -> None:
        super().__init__(message, status, body, retry_after)
        self.location = location


def clean_location(value: str | None) -> str:
    """A ``Location`` fit to log: without userinfo, query or fragment, and cut short."""
    if not value:
        return "(no Location)"
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an unparsable Location)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    printable = "".join(c if c.isprintable() else "?" for c in clean)
    return redact(printable[:_LOCATION_MAX]) or "(an empty Location)"


def classify(response: httpx.Response, body: str) -> None:
    """Raise the delivery error a non-2xx response means; return for a 2xx.

    ``body`` is the excerpt of the answer that is kept (dead letters, logs, status); the
    caller has redacted the token from it.
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        location = clean_location(response.headers.get("location"))
        raise Redirected(
            f"backend answered {status} redirecting to {location} (not followed)",
            status,
            body,
            retry_after_seconds(response.headers.get("retry-after")),
            location=location,
        )
    if status in RETRYABLE_STATUS or status >= 500:
        raise RetryableDelivery(
            f"backend answered {status}",
            status,
            body,
            retry_after_seconds(response.headers.get("retry-after")),
        )
    raise PermanentDelivery(f"backend rejected the event with {status}", status, body)


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


def build_client(
    config: Config, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """One keep-alive client for the agent's lifetime; TLS verification always on.

    ``transport`` replaces the network (tests script the backend's answers with it).
    """
    verify: ssl.SSLContext | bool = True
    if config.backend.ca_bundle is not None:
        verify = ssl.create_default_context(cafile=str(config.backend.ca_bundle))
    elif urlsplit(config.backend.url).scheme == "http":
        # Plain http never reaches TLS: requests go to this base URL and redirects are not
        # followed. A context that still verifies but trusts no CA would fail closed, and
        # skips loading the CA bundle: ~20 ms of start-up and ~1 MB per agent (BENCHMARKS.md).
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"adw-agent/{__version__}",
        # Answers are read raw and only in part (read_excerpt): ask for them uncompressed.
        "Accept-Encoding": "identity",
    }
    if config.token is not None:
        token = config.token.get_secret_value()
        # Every token a client ever sends stays redacted, a reloaded one too: an answer to a
        # request made with an old token may still arrive after a reload.
        add_secret(token)
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(
        base_url=config.backend.url,
        headers=headers,
        verify=verify,
        timeout=httpx.Timeout(config.backend.timeout, connect=config.backend.connect_timeout),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        trust_env=False,
        transport=transport,
    )


class _NoBatchRoute(Exception):
    """The backend has no batch route: send one event per request from now on."""


class Sender:
    """Moves events from the outbox to the backend. Runs as one task on the event loop.

    Events go out in batches of up to ``delivery.batch_max`` on ``backend.batch_path``, in seq
    order, or one per request on ``backend.event_path`` when ``batch_max`` is 1 or the backend
    answered 404/405 on the batch route (until the next reload).
    """

    def __init__(self, config: Config, store: Store, client: httpx.AsyncClient) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._wake = asyncio.Event()
        # Set by a reload that changed the backend: the current wait ends at once.
        self._backend_changed = asyncio.Event()
        self._auth_warned = False
        self._storage_warned = False
        self._redirect_logged: str | None = None
        self._batching = config.delivery.batch_max > 1
        # By when (monotonic) the current exchange or wait must be over; None while idle.
        self._due: float | None = None
        self.last_error: str | None = None
        #: Why delivery cannot make progress on its own (a redirect, a stalled sender), or
        #: None. Also kept in the store's meta ``sender`` for ``status`` and ``healthcheck``.
        self.problem: str | None = None
        with contextlib.suppress(sqlite3.Error):
            # A problem recorded before a restart stays reported until delivery succeeds.
            saved = store.meta("sender")
            if isinstance(saved, dict) and isinstance(saved.get("problem"), str):
                self.problem = saved["problem"]
        self.stalled = False

    def wake(self) -> None:
        """New events were queued."""
        self._wake.set()

    def replace_client(self, config: Config, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """Use a new backend configuration from the next attempt on; returns the old client.

        If the backend (or the token) changed, a backoff or ``Retry-After`` wait in progress
        ends now: the new backend is tried at once. Whether the backend takes batches is
        found out again.
        """
        old, self._client = self._client, client
        if config.backend != self._config.backend or config.token != self._config.token:
            self._backend_changed.set()
        self._config = config
        self._batching = config.delivery.batch_max > 1
        return old

    def check_progress(self, now: float | None = None) -> bool:
        """Whether the sender is stalled: busy past the longest an exchange plus the wait
        after it may take. Logged and recorded once when it starts; called by the main loop,
        which then withholds the watchdog ping."""
        now = time.monotonic() if now is None else now
        stalled = self._due is not None and now > self._due
        if stalled and not self.stalled:
            overdue = now - (self._due or now)
            log.error(
                "the sender has made no progress for longer than an exchange and its retry "
                "wait may take (%.0fs overdue)",
                overdue,
            )
            self._set_problem("the sender has stopped making progress")
        elif not stalled and self.stalled:
            self._set_problem(None)
        self.stalled = stalled
        return stalled

    async def run(self) -> None:
        """Deliver until cancelled. This is the sender's loop boundary: no error ends it. A
        store that cannot be used, or anything unexpected, is logged and tried again after a
        pause, with the event left queued."""
        while True:
            batch: list[Queued] = []
            try:
                limit = self._config.delivery.batch_max if self._batching else 1
                batch = self._store.queue.head_batch(limit, BATCH_BYTES)
                if not batch:
                    self._due = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._deliver(batch)
                self._storage_warned = False
            except _NoBatchRoute:
                continue  # the same events again, one per request
            except StorageError as exc:
                # The event stays queued and is sent again under the same event_id once the
                # store works. Said once, not on every try.
                if not self._storage_warned:
                    self._storage_warned = True
                    extra = _fields(batch[0]) if batch else {}
                    log.error("sender cannot use the store: %s", exc, extra=extra)
                await self._pause(STORAGE_RETRY)
            except Exception:
                extra = _fields(batch[0]) if batch else {}
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
            await self._post(event)
        except DeliveryError as exc:
            log.warning("could not send %s directly: %s", event_type, exc, extra=_fields(event))
            return False
        return True

    def idle(self) -> bool:
        """Nothing left to send."""
        return self._store.queue.depth() == 0

    async def _pause(self, seconds: float) -> None:
        self._due = time.monotonic() + seconds + _GRACE
        await asyncio.sleep(seconds)

    async def _sleep(self, seconds: float) -> None:
        """The wait before a retry; a reload that changes the backend ends it."""
        self._due = time.monotonic() + seconds + _GRACE
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
                    self._due = time.monotonic() + self._config.backend.timeout + _GRACE
                    if self._batching:
                        duplicates = await self._post_batch(batch)
                    else:
                        duplicates = await self._post(batch[0])
        except PermanentDelivery as exc:
            if len(batch) > 1:
                # One transaction on the backend's side: nothing of the batch was kept. Halve
                # it until only the rejected events are left, in seq order.
                log.warning(
                    "backend rejected a batch of %d events (%s); splitting it",
                    len(batch),
                    exc.status,
                    extra=_fields(batch[0], last_seq=batch[-1].seq),
                )
                middle = len(batch) // 2
                await self._deliver(batch[:middle])
                await self._deliver(batch[middle:])
                return
            event = batch[0]
            log.error(
                "event dead-lettered: %s",
                exc,
                extra=_fields(event, status=exc.status, response=exc.body[:200]),
            )
            self.last_error = str(exc)
            self._store.queue.dead_letter(event, exc.status, exc.body)
            self._delivered()
            return
        self._store.queue.ack_many([event.seq for event in batch], duplicates)
        self._auth_warned = False
        self.last_error = None
        self._delivered()

    def _delivered(self) -> None:
        """The backend gave a verdict: whatever kept delivery from progressing is over."""
        self._redirect_logged = None
        if self.problem is not None and not self.stalled:
            self._set_problem(None)

    def _set_problem(self, problem: str | None) -> None:
        self.problem = problem
        try:
            self._store.set_meta("sender", {"problem": problem, "since": time.time()})
        except StorageError as exc:
            log.error("cannot record the sender's state: %s", exc)

    async def _post_batch(self, batch: list[Queued]) -> int:
        """POST the batch; returns how many of its events the backend said it already had."""
        body = b"[" + b",".join(event.body for event in batch) + b"]"
        # Each event keeps its event_id for the backend to deduplicate by; the key names
        # this very set of events, so a retried request carries the same one.
        ids = ",".join(event.event_id for event in batch).encode()
        key = "batch-" + hashlib.sha256(ids).hexdigest()[:32]
        request = self._client.build_request(
            "POST", self._config.backend.batch_path, content=body, headers={"Idempotency-Key": key}
        )
        started = time.perf_counter()
        response, excerpt = await self._exchange(request)
        if response.status_code in NO_BATCH_STATUS:
            self._batching = False
            log.warning(
                "backend answered %s on %s: it takes no batches; sending one event per "
                "request on %s until the configuration is reloaded",
                response.status_code,
                self._config.backend.batch_path,
                self._config.backend.event_path,
            )
            raise _NoBatchRoute
        classify(response, excerpt)
        duplicates = reported_duplicates(excerpt, len(batch))
        log.debug(
            "events delivered",
            extra=_fields(
                batch[0],
                last_seq=batch[-1].seq,
                events=len(batch),
                duplicates=duplicates,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
            ),
        )
        return duplicates

    async def _post(self, event: Queued) -> int:
        """POST one event; returns 1 if the backend said it already had it, else 0."""
        path = self._config.backend.event_path.replace("{type}", event.type)
        started = time.perf_counter()
        request = self._client.build_request(
            "POST", path, content=event.body, headers={"Idempotency-Key": event.event_id}
        )
        response, excerpt = await self._exchange(request)
        classify(response, excerpt)
        duplicates = reported_duplicates(excerpt, 1)
        log.debug(
            "event delivered",
            extra=_fields(
                event,
                duplicates=duplicates,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
            ),
        )
        return duplicates

    async def _exchange(self, request: httpx.Request) -> tuple[httpx.Response, str]:
        """Send ``request``; the answer and an excerpt of its body, with the token redacted.

        ``backend.timeout`` bounds the whole exchange, whatever the backend does: httpx's
        own timeouts apply to each read, and a backend that drips its answer a byte at a
        time, or sends ``102 Processing`` over and over, would hold every read open.
        """
        limit = self._config.backend.timeout
        try:
            async with asyncio.timeout(limit):
                response = await self._client.send(request, stream=True)
                try:
                    body = await read_excerpt(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise RetryableDelivery(
                f"timed out: the exchange took longer than backend.timeout ({limit:g}s)"
            ) from None
        except httpx.TimeoutException as exc:
            raise RetryableDelivery(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise RetryableDelivery(f"connection failed ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            # E.g. a body that cannot be decoded: the backend may answer properly next time.
            raise RetryableDelivery(f"request failed ({type(exc).__name__})") from None
        # The excerpt is kept and logged: a careless backend may echo the token back, in
        # full or cut off by the end of the excerpt.
        return response, redact_excerpt(body)

    def _failed(self, batch: list[Queued], state: RetryCallState) -> None:
        event = batch[0]
        exc = state.outcome.exception() if state.outcome is not None else None
        message = str(exc)
        self.last_error = message
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        fields = _fields(event, attempt=state.attempt_number, retry_in=round(wait, 3))
        if len(batch) > 1:
            fields["events"] = len(batch)
        if isinstance(exc, Redirected):
            if self._redirect_logged != exc.location:
                self._redirect_logged = exc.location
                log.error(
                    "backend answered %s redirecting to %s; redirects are not followed: "
                    "check backend.url. Events are kept and retried",
                    exc.status,
                    exc.location,
                    extra=fields,
                )
                self._set_problem(f"backend redirects to {exc.location} ({exc.status})")
        elif isinstance(exc, RetryableDelivery) and exc.status in (401, 403):
            if not self._auth_warned:
                self._auth_warned = True
                log.error(
                    "backend refused the credentials (%s); check the token "
                    "(backend.token_file, ADW_AGENT_TOKEN or the adw-token credential). "
                    "Events are kept and retried",
                    exc.status,
                    extra=fields,
                )
        elif state.attempt_number == 1 or state.attempt_number % 10 == 0:
            log.warning("delivery failed, will retry: %s", message, extra=fields)
        try:
            self._store.queue.record_failure(event.seq, message)
        except StorageError as err:
            log.error("cannot record the failed attempt: %s", err)


def _fields(event: Queued, **more: Any) -> dict[str, Any]:
    return {"event_type": event.type, "event_id": event.event_id, "seq": event.seq, **more}
