"""Delivering queued events to the backend, in seq order, over one keep-alive connection.

The sender takes the oldest event in the outbox and POSTs it until the backend answers. Retryable
failures (see :mod:`agent.errors`) are retried with capped exponential backoff and jitter, for
ever, honouring ``Retry-After``; a permanent rejection moves the event to the dead letters. Only a
2xx removes an event from the outbox, so a crash at any point means it is sent again, with the
same ``event_id``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import ssl
import time
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

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

from agent import __version__
from agent.config import Config
from agent.errors import DeliveryError, PermanentDelivery, RetryableDelivery, StorageError
from agent.events import check_data, envelope
from agent.logs import add_secret, redact
from agent.outbox import STORAGE_RETRY, Queued, Store

log = logging.getLogger("adw_agent.deliver")


RETRYABLE_STATUS = frozenset({401, 403, 408, 425, 429})
MAX_RETRY_AFTER = 600.0
_RESPONSE_EXCERPT = 2000


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


def classify(response: httpx.Response, body: str) -> None:
    """Raise the delivery error a non-2xx response means; return for a 2xx.

    ``body`` is the excerpt of the answer that is kept (dead letters, logs, status); the
    caller has redacted the token from it.
    """
    status = response.status_code
    if 200 <= status < 300:
        return
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


class Sender:
    """Moves events from the outbox to the backend. Runs as one task on the event loop."""

    def __init__(self, config: Config, store: Store, client: httpx.AsyncClient) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._wake = asyncio.Event()
        self._auth_warned = False
        self._storage_warned = False
        self.last_error: str | None = None

    def wake(self) -> None:
        """New events were queued."""
        self._wake.set()

    def replace_client(self, config: Config, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """Use a new backend configuration from the next attempt on; returns the old client."""
        old, self._client, self._config = self._client, client, config
        return old

    async def run(self) -> None:
        """Deliver until cancelled. This is the sender's loop boundary: no error ends it. A
        store that cannot be used, or anything unexpected, is logged and tried again after a
        pause, with the event left queued."""
        while True:
            event: Queued | None = None
            try:
                event = self._store.head()
                if event is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._deliver(event)
                self._storage_warned = False
            except StorageError as exc:
                # The event stays queued and is sent again under the same event_id once the
                # store works. Said once, not on every try.
                if not self._storage_warned:
                    self._storage_warned = True
                    extra = _fields(event) if event is not None else {}
                    log.error("sender cannot use the store: %s", exc, extra=extra)
                await asyncio.sleep(STORAGE_RETRY)
            except Exception:
                extra = _fields(event) if event is not None else {}
                log.exception("unexpected error in the sender; trying again", extra=extra)
                await asyncio.sleep(STORAGE_RETRY)

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
        return self._store.depth() == 0

    async def _deliver(self, event: Queued) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableDelivery),
            wait=_Backoff(self._config.delivery.backoff_initial, self._config.delivery.backoff_max),
            stop=stop_never,
            before_sleep=lambda state: self._failed(event, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(event)
        except PermanentDelivery as exc:
            log.error(
                "event dead-lettered: %s",
                exc,
                extra=_fields(event, status=exc.status, response=exc.body[:200]),
            )
            self.last_error = str(exc)
            self._store.dead_letter(event, exc.status, exc.body)
            return
        self._store.ack(event.seq)
        self._auth_warned = False
        self.last_error = None

    async def _post(self, event: Queued) -> None:
        path = self._config.backend.event_path.replace("{type}", event.type)
        started = time.perf_counter()
        request = self._client.build_request(
            "POST", path, content=event.body, headers={"Idempotency-Key": event.event_id}
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                body = await read_excerpt(response)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise RetryableDelivery(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise RetryableDelivery(f"connection failed ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            # E.g. a body that cannot be decoded: the backend may answer properly next time.
            raise RetryableDelivery(f"request failed ({type(exc).__name__})") from None
        # The excerpt is kept and logged: a careless backend may echo the token back.
        classify(response, redact(body))
        log.debug(
            "event delivered",
            extra=_fields(event, latency_ms=round((time.perf_counter() - started) * 1000, 2)),
        )

    def _failed(self, event: Queued, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        message = str(exc)
        self.last_error = message
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        fields = _fields(event, attempt=state.attempt_number, retry_in=round(wait, 3))
        if isinstance(exc, RetryableDelivery) and exc.status in (401, 403):
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
            self._store.record_failure(event.seq, message)
        except StorageError as err:
            log.error("cannot record the failed attempt: %s", err)


def _fields(event: Queued, **more: Any) -> dict[str, Any]:
    return {"event_type": event.type, "event_id": event.event_id, "seq": event.seq, **more}
