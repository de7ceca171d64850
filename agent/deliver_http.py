"""One exchange with the backend: the HTTP client, the POST of a batch or of one event, and
what the answer means.

The sender (:mod:`agent.deliver`) decides what to send and when; this module sends it and
classifies the answer into the delivery errors of :mod:`agent.errors`: retryable (3xx, 401,
403, 408, 425, 429, 5xx, timeouts and connection failures) or permanent (any other 4xx).
Redirects are never followed. The answer is read in part only, and with the token redacted.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import math
import ssl
import time
from datetime import UTC
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import __version__
from agent.config import Config
from agent.errors import PermanentDelivery, RetryableDelivery
from agent.logs import add_secret, redact, redact_excerpt
from agent.outbox_queue import Queued

log = logging.getLogger("adw_agent.deliver")

RETRYABLE_STATUS = frozenset({401, 403, 408, 425, 429})
#: Answers on the batch route that mean the backend does not have it.
NO_BATCH_STATUS = frozenset({404, 405})
#: The longest a ``Retry-After`` is honoured; a longer one is cut to this.
MAX_RETRY_AFTER = 600.0
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


class NoBatchRoute(Exception):
    """The backend has no batch route: send one event per request from now on."""


class Exchange:
    """POSTs events to the backend over one keep-alive client, and reads what it answered."""

    def __init__(self, config: Config, client: httpx.AsyncClient) -> None:
        self._config = config
        self._client = client

    def replace(self, config: Config, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """Use a new backend configuration from the next request on; returns the old client."""
        old, self._client = self._client, client
        self._config = config
        return old

    async def post_batch(self, batch: list[Queued]) -> int:
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
            log.warning(
                "backend answered %s on %s: it takes no batches; sending one event per "
                "request on %s until the configuration is reloaded",
                response.status_code,
                self._config.backend.batch_path,
                self._config.backend.event_path,
            )
            raise NoBatchRoute
        classify(response, excerpt)
        duplicates = reported_duplicates(excerpt, len(batch))
        log.debug(
            "events delivered",
            extra=event_fields(
                batch[0],
                last_seq=batch[-1].seq,
                events=len(batch),
                duplicates=duplicates,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
            ),
        )
        return duplicates

    async def post(self, event: Queued) -> int:
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
            extra=event_fields(
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


def event_fields(event: Queued, **more: Any) -> dict[str, Any]:
    return {"event_type": event.type, "event_id": event.event_id, "seq": event.seq, **more}
