"""Two ``serve`` replicas on one PostgreSQL: what one applies, the other's clients see, and a
re-sent event is a duplicate whichever replica it reaches."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import websockets

from tests.adw_backend.conftest import PgCluster, ServeProcess, throwaway_cluster
from tests.adw_backend.factory import cost_update, workflow_update
from tests.adw_backend.loop import LoopServer
from tests.adw_backend.picture import Picture

WAIT = 30.0


def test_event_posted_to_a_reaches_a_client_of_b(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    database = pg_cluster.create_database()
    a = start_serve(database)
    b = start_serve(database)
    with b.client() as client:
        assert client.get("/healthz").json()["listening"] in (True, False)
    b.wait_listening()

    async def scenario() -> None:
        async with (
            websockets.connect(b.ws_url) as on_b,
            httpx.AsyncClient(base_url=a.url) as to_a,
            httpx.AsyncClient(base_url=b.url) as to_b,
        ):
            snapshot = orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT))
            assert snapshot["type"] == "workflows_snapshot"
            ev = workflow_update("r1", 1, branch_name="feat-replica")
            response = await to_a.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
            assert response.json() == {"accepted": 1, "duplicates": 0}
            message: dict[str, Any] = orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT))
            assert message["type"] == "workflow_update"
            assert message["data"]["adw_id"] == "r1"
            assert message["data"]["seq"] == 1
            assert message["data"]["workflow"]["state"]["branch_name"] == "feat-replica"

            # The same event sent to B (the agent retrying through another replica).
            response = await to_b.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
            assert response.json() == {"accepted": 0, "duplicates": 1}
            # Interleaved writes to both replicas all land in one projection.
            posts = [
                (to_a if seq % 2 else to_b).post(
                    "/api/v1/event/cost_update", content=orjson.dumps(cost_update("r1", seq, seq))
                )
                for seq in range(2, 22)
            ]
            assert all(r.status_code == 200 for r in await asyncio.gather(*posts))
            seen = [orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT)) for _ in range(20)]
            assert sorted(m["data"]["seq"] for m in seen) == list(range(2, 22))
            workflow = (await to_a.get("/api/v1/workflows/r1")).json()
            assert workflow["cost"]["current_cost"] == 21
            assert len(workflow["cost_points"]) == 20

            # A batch to A reaches B's client whole, each ADW's events in order.
            batch = [cost_update(adw, seq, seq) for seq in range(1, 101) for adw in ("x1", "x2")]
            response = await to_a.post("/api/v1/events", content=orjson.dumps(batch))
            assert response.json() == {"accepted": 200, "duplicates": 0}
            seen = [orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT)) for _ in batch]
            for adw in ("x1", "x2"):
                seqs = [m["data"]["seq"] for m in seen if m["data"]["adw_id"] == adw]
                assert seqs == list(range(1, 101))
            # A deletion on A is announced by B.
            assert (await to_a.delete("/api/v1/workflows/x1")).status_code == 200
            message = orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT))
            assert message == {**message, "type": "workflow_deleted", "data": {"adw_id": "x1"}}

    asyncio.run(scenario())


def test_database_outage_is_503_then_recovers(
    start_serve: Callable[..., ServeProcess],
) -> None:
    """PostgreSQL stopped hard under a running replica: every route answers 503 with a reason
    (the client's timeout bounds a hang), WebSocket connects are closed with 1011, and once
    the database is back the same process serves again and its old client is up to date."""
    with throwaway_cluster() as cluster:
        server = start_serve(cluster.url())
        server.wait_listening()

        async def scenario() -> None:
            async with (
                websockets.connect(server.ws_url) as before,
                httpx.AsyncClient(base_url=server.url, timeout=10.0) as client,
            ):
                picture = Picture()
                picture.apply(orjson.loads(await asyncio.wait_for(before.recv(), WAIT)))
                ev = workflow_update("o1", 1, branch_name="before")
                answer = await client.post("/api/v1/event/workflow_update", content=_body(ev))
                assert answer.json()["accepted"] == 1
                picture.apply(orjson.loads(await asyncio.wait_for(before.recv(), WAIT)))

                cluster.stop()
                late = workflow_update("o1", 2, branch_name="during")
                calls = [
                    ("POST", "/api/v1/event/workflow_update", _body(late)),
                    ("POST", "/api/v1/events", _body([late])),
                    ("GET", "/api/v1/workflows", None),
                    ("GET", "/api/v1/workflows/o1", None),
                    ("GET", "/api/v1/workflows/o1/events", None),
                    ("DELETE", "/api/v1/workflows/o1", None),
                ]
                for method, path, body in calls:
                    answer = await client.request(method, path, content=body)
                    assert answer.status_code == 503, (method, path, answer.text)
                    assert answer.json() == {"detail": "database unavailable"}
                    assert answer.headers["retry-after"] == "1"
                health = await client.get("/healthz")
                assert health.status_code == 503
                assert health.json() == {
                    "detail": "database unavailable",
                    "database": "down",
                    "listening": False,
                }
                assert (await client.get("/")).status_code == 200
                async with websockets.connect(server.ws_url) as during:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(during.recv(), WAIT)
                    assert closed.value.rcvd is not None
                    assert closed.value.rcvd.code == 1011

                cluster.start_server()

                async def healthy() -> bool:
                    return (await client.get("/healthz")).status_code == 200

                # What the agent does: send the same event again until it is accepted.
                await _until("the database answers again", healthy)
                answer = await client.post("/api/v1/event/workflow_update", content=_body(late))
                assert answer.json() == {"accepted": 1, "duplicates": 0}
                found = (await client.get("/api/v1/workflows/o1")).json()
                assert found["state"]["branch_name"] == "during"
                assert found["revision"] == 2

                async def listening() -> bool:
                    return await _listening(client) is True

                await _until("the replica listens again", listening)
                # The client connected through the outage ends with the database's picture.
                while picture.workflows["o1"]["revision"] < 2:
                    picture.apply(orjson.loads(await asyncio.wait_for(before.recv(), WAIT)))
                assert picture.workflows == {"o1": found}

        asyncio.run(scenario())
    assert "Traceback" not in server.stderr()


def _body(value: object) -> bytes:
    return orjson.dumps(value)


async def _listening(client: httpx.AsyncClient) -> bool | None:
    found: bool | None = (await client.get("/healthz")).json()["listening"]
    return found


async def _until(what: str, condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``condition`` (a state of the system, not a time) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await condition():
        assert loop.time() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


def test_a_client_catches_up_on_what_its_replica_missed_while_not_listening(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    database = pg_cluster.create_database()
    name = database.rsplit("/", 1)[1]
    a = start_serve(database)
    b = start_serve(database)
    a.wait_listening()
    b.wait_listening()

    async def scenario() -> None:
        async with (
            websockets.connect(a.ws_url) as on_a,
            httpx.AsyncClient(base_url=a.url) as to_a,
            httpx.AsyncClient(base_url=b.url) as to_b,
        ):
            picture = Picture()
            picture.apply(orjson.loads(await asyncio.wait_for(on_a.recv(), WAIT)))
            ev = workflow_update("m1", 1, branch_name="heard")
            assert (await to_b.post("/api/v1/events", content=orjson.dumps([ev]))).is_success
            picture.apply(orjson.loads(await asyncio.wait_for(on_a.recv(), WAIT)))
            assert picture.workflows["m1"]["state"]["branch_name"] == "heard"

            with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
                # No new connection to the database until the event is in: A cannot listen
                # again before B has committed it (B posts on a connection it already holds).
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                try:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query ILIKE 'LISTEN%%' AND datname = %s",
                        (name,),
                    )

                    async def deaf() -> bool:
                        return await _listening(to_a) is False

                    await _until("A stops listening", deaf)
                    missed = [
                        workflow_update("m1", 2, branch_name="missed"),
                        cost_update("m2", 1, 1.5),
                    ]
                    answer = await to_b.post("/api/v1/events", content=orjson.dumps(missed))
                    assert answer.json() == {"accepted": 2, "duplicates": 0}
                    assert await _listening(to_a) is False
                finally:
                    admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

            # A listens again and brings its client back to the database's truth.
            while (
                picture.workflows.get("m1", {}).get("state", {}).get("branch_name") != ("missed")
                or "m2" not in picture.workflows
            ):
                picture.apply(orjson.loads(await asyncio.wait_for(on_a.recv(), WAIT)))
            truth = (await to_a.get("/api/v1/workflows")).json()["workflows"]
            assert picture.workflows == {w["adw_id"]: w for w in truth}
            assert picture.snapshots == 2

    asyncio.run(scenario())


def test_concurrent_writes_to_one_adw_through_two_replicas_leave_every_client_current(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    """Both replicas fold events of one ADW at once: the revision counts every event exactly
    once, and a client of each replica, dropping what is older than it holds, ends with the
    database's projection whatever order its messages came in."""
    database = pg_cluster.create_database()
    replicas = [start_serve(database), start_serve(database)]
    for replica in replicas:
        replica.wait_listening()
    total = 60

    async def scenario() -> None:
        async with (
            websockets.connect(replicas[0].ws_url) as on_a,
            websockets.connect(replicas[1].ws_url) as on_b,
            httpx.AsyncClient(base_url=replicas[0].url) as to_a,
            httpx.AsyncClient(base_url=replicas[1].url) as to_b,
        ):
            pictures = [Picture(), Picture()]
            for picture, socket in zip(pictures, (on_a, on_b), strict=True):
                picture.apply(orjson.loads(await asyncio.wait_for(socket.recv(), WAIT)))
            posts = [
                (to_a if seq % 2 else to_b).post(
                    "/api/v1/event/cost_update", content=_body(cost_update("c1", seq, seq))
                )
                for seq in range(1, total + 1)
            ]
            assert all(r.status_code == 200 for r in await asyncio.gather(*posts))
            truth = (await to_a.get("/api/v1/workflows/c1")).json()
            assert truth["revision"] == total
            assert truth["cost"]["current_cost"] == total
            for picture, socket in zip(pictures, (on_a, on_b), strict=True):
                while picture.workflows.get("c1", {}).get("revision", 0) < total:
                    picture.apply(orjson.loads(await asyncio.wait_for(socket.recv(), WAIT)))
                assert picture.workflows == {"c1": truth}

    asyncio.run(scenario())


def test_a_replica_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    """kill -9 of the replica a batch is being written through; the agent, answered by no one,
    sends the same batch to the other replica: every event is applied exactly once (the
    revision counts them), and the surviving replica's client ends with the database."""
    database = pg_cluster.create_database()
    name = database.rsplit("/", 1)[1]
    a = start_serve(database)
    b = start_serve(database)
    a.wait_listening()
    b.wait_listening()
    adws = [f"k{n}" for n in range(10)]
    batch = [cost_update(adw, seq, seq) for seq in range(1, 101) for adw in adws]

    async def scenario() -> None:
        async with (
            websockets.connect(b.ws_url) as on_b,
            httpx.AsyncClient(base_url=a.url, timeout=WAIT) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=WAIT) as to_b,
        ):
            picture = Picture()
            picture.apply(orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT)))
            sending = asyncio.create_task(to_a.post("/api/v1/events", content=_body(batch)))

            def writing() -> bool:
                with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
                    row = admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                        " AND (state LIKE 'idle in transaction%%' OR query ILIKE 'INSERT%%')",
                        (name,),
                    ).fetchone()
                    return row is not None and row[0] > 0

            async def in_flight() -> bool:
                return sending.done() or await asyncio.to_thread(writing)

            await _until("the batch reaches the database or is answered", in_flight)
            a.kill()
            with contextlib.suppress(httpx.HTTPError):
                await sending
            answer = (await to_b.post("/api/v1/events", content=_body(batch))).json()
            assert answer["accepted"] + answer["duplicates"] == len(batch)
            assert answer["accepted"] in (0, len(batch))  # one transaction: all or nothing
            truth = (await to_b.get("/api/v1/workflows")).json()["workflows"]
            assert sorted(w["adw_id"] for w in truth) == adws
            for workflow in truth:
                assert workflow["revision"] == 100
                assert len(workflow["cost_points"]) == 100
            while any(picture.workflows.get(adw, {}).get("revision", 0) < 100 for adw in adws):
                picture.apply(orjson.loads(await asyncio.wait_for(on_b.recv(), WAIT)))
            assert picture.workflows == {w["adw_id"]: w for w in truth}

    asyncio.run(scenario())


async def _send_until_stored(client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> None:
    """What the agent does: send the same batch again until it is answered 200."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * WAIT
    while True:
        with contextlib.suppress(httpx.TransportError):
            answer = await client.post("/api/v1/events", content=_body(batch))
            if answer.status_code == 200:
                return
            assert answer.status_code == 503, answer.text
        assert loop.time() < deadline, "never stored"
        await asyncio.sleep(0.05)


class _Follower:
    """A WebSocket client that reconnects whenever it is closed, holding a :class:`Picture`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.picture = Picture()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, websockets.WebSocketException):
                async with websockets.connect(self.url) as socket:
                    async for text in socket:
                        self.picture.apply(orjson.loads(text))
                        self.changed.set()
            await asyncio.sleep(0.05)

    async def until_equal(self, truth: dict[str, dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while self.picture.workflows != truth:
            self.changed.clear()
            remaining = deadline - loop.time()
            held = {k: w["revision"] for k, w in self.picture.workflows.items()}
            assert remaining > 0, f"the client's picture never matched; revisions held: {held}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


def test_postgresql_restarted_under_writes_through_two_replicas(
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Writes keep coming through both replicas while PostgreSQL restarts; the senders retry
    a 503 as the agent does. Afterwards every event is applied once and a client of each
    replica, reconnecting when closed, holds exactly the database's picture."""
    with throwaway_cluster() as cluster:
        replicas = [start_serve(cluster.url()), start_serve(cluster.url())]
        for replica in replicas:
            replica.wait_listening()
        adws = ["p1", "p2", "p3"]

        async def scenario() -> None:
            followers = [_Follower(r.ws_url) for r in replicas]
            following = [asyncio.create_task(f.run()) for f in followers]
            async with (
                httpx.AsyncClient(base_url=replicas[0].url, timeout=WAIT) as to_a,
                httpx.AsyncClient(base_url=replicas[1].url, timeout=WAIT) as to_b,
            ):

                async def writer(adw: str) -> None:
                    for seq in range(1, 41):
                        target = to_a if seq % 2 else to_b
                        await _send_until_stored(target, [cost_update(adw, seq, seq)])

                writing = asyncio.gather(*(writer(adw) for adw in adws))

                async def some_written() -> bool:
                    found = (await to_a.get("/api/v1/workflows")).json()["workflows"]
                    revisions: list[int] = [w["revision"] for w in found]
                    return sum(revisions) >= 10

                await _until("the first writes", some_written)
                await asyncio.to_thread(cluster.stop)
                await asyncio.to_thread(cluster.start_server)
                await writing
                truth = (await to_a.get("/api/v1/workflows")).json()["workflows"]
                assert sorted(w["adw_id"] for w in truth) == adws
                assert all(w["revision"] == 40 for w in truth)
                for follower in followers:
                    await follower.until_equal({w["adw_id"]: w for w in truth})
            for task in following:
                task.cancel()
            await asyncio.gather(*following, return_exceptions=True)

        asyncio.run(scenario())
    for replica in replicas:
        assert "Traceback" not in replica.stderr()


def test_a_workflow_held_by_a_stuck_transaction_is_503_not_a_hang(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    """A transaction that holds a workflow and does not end (a replica frozen mid-request):
    a write to that workflow waits at most the lock timeout, answers 503, and is accepted
    when sent again after the holder is gone; other workflows are not held up."""
    database = pg_cluster.create_database()
    server = start_serve(database)
    with server.client() as client:
        first = workflow_update("l1", 1, branch_name="first")
        assert client.post("/api/v1/events", content=_body([first])).json()["accepted"] == 1
        with psycopg.connect(database) as holder:
            holder.execute("SELECT 1 FROM adw_workflows WHERE adw_id = 'l1' FOR UPDATE")
            other = workflow_update("l2", 1, branch_name="free")
            assert client.post("/api/v1/events", content=_body([other])).json()["accepted"] == 1
            held = workflow_update("l1", 2, branch_name="second")
            answer = client.post("/api/v1/events", content=_body([held]))
            assert answer.status_code == 503
            assert answer.json() == {"detail": "database unavailable"}
            holder.rollback()
        assert client.post("/api/v1/events", content=_body([held])).json()["accepted"] == 1
        found = client.get("/api/v1/workflows/l1").json()
        assert (found["state"]["branch_name"], found["revision"]) == ("second", 2)
    assert "Traceback" not in server.stderr()


class _CuttingProxy(LoopServer):
    """A TCP proxy in front of PostgreSQL that, once armed, forwards the next ``COMMIT`` it
    sees and then cuts that connection: the database commits, the replica never hears so."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.target = port
        self.port = 0
        self.armed = threading.Event()
        self.cut = threading.Event()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, watch: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
                if watch and b"COMMIT" in chunk and self.armed.is_set():
                    self.armed.clear()
                    self.cut.set()
                    break
        except OSError:
            pass
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        down = asyncio.create_task(self._pipe(reader, up_writer, watch=True))
        up = asyncio.create_task(self._pipe(up_reader, writer, watch=False))
        await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
        # One side ended (or was cut): end both, so the replica sees its connection lost.
        up_writer.close()
        writer.close()
        await asyncio.gather(down, up, return_exceptions=True)

    async def _run(self) -> None:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        async with server:
            self.port = server.sockets[0].getsockname()[1]
            self._started.set()
            await self._stopped()
            # The connections still open (the replica is gone by now) end with the proxy.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)


def test_a_commit_whose_answer_is_lost_still_reaches_the_replicas_clients(
    start_serve: Callable[..., ServeProcess], pg_cluster: PgCluster
) -> None:
    """The connection drops between the commit and its answer: the request is 503 and the
    agent sends again (a duplicate then), and the replica's clients, which heard of the event
    neither from the request nor (their replica's own) from the database, are resynchronised."""
    database = pg_cluster.create_database()
    name = database.rsplit("/", 1)[1]
    with _CuttingProxy(pg_cluster.port) as proxy:
        server = start_serve(f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}")
        server.wait_listening()

        async def scenario() -> None:
            async with (
                websockets.connect(server.ws_url) as socket,
                httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client,
            ):
                picture = Picture()
                picture.apply(orjson.loads(await asyncio.wait_for(socket.recv(), WAIT)))
                lost = workflow_update("u1", 1, branch_name="committed")
                proxy.armed.set()
                answer = await client.post("/api/v1/events", content=_body([lost]))
                assert answer.status_code == 503
                assert proxy.cut.is_set()
                with psycopg.connect(database) as direct:
                    stored = direct.execute(
                        "SELECT count(*) FROM adw_events WHERE event_id = %s", (lost["event_id"],)
                    ).fetchone()
                assert stored == (1,)  # committed, though the replica could not know
                while "u1" not in picture.workflows:
                    picture.apply(orjson.loads(await asyncio.wait_for(socket.recv(), WAIT)))
                truth = (await client.get("/api/v1/workflows/u1")).json()
                assert picture.workflows == {"u1": truth}
                assert truth["state"]["branch_name"] == "committed"
                again = await client.post("/api/v1/events", content=_body([lost]))
                assert again.json() == {"accepted": 0, "duplicates": 1}

                # The same for an operator's deletion.
                proxy.cut.clear()
                proxy.armed.set()
                assert (await client.delete("/api/v1/workflows/u1")).status_code == 503
                assert proxy.cut.is_set()
                while "u1" in picture.workflows:
                    picture.apply(orjson.loads(await asyncio.wait_for(socket.recv(), WAIT)))
                assert (await client.get("/api/v1/workflows/u1")).status_code == 404

        asyncio.run(scenario())
    assert "Traceback" not in server.stderr()
