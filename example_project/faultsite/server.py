"""The HTTP/1.1 server: listeners, connections and the request log.

One asyncio event loop serves every host. Each host with an address gets its own
listening socket, and virtual hosts share one listener at 127.0.0.1 where the
``Host`` header picks the host. Responses are written with the transport's buffer
limit at 0, so ``drain()`` returns only once the whole response is in the kernel, and
the logged ``answered`` time is when the server finished writing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultsite.config import VIRTUAL_ADDRESS, HostConfig, SiteConfig
from faultsite.content import SiteContent
from faultsite.faults import pick_latency
from faultsite.listeners import reserve_port
from faultsite.profiles import HostState, Response, decide
from faultsite.protocol import BadRequest, ParsedRequest, encode_head, read_request

logger = logging.getLogger(__name__)

_HEAD_LIMIT = 64 * 1024
_LISTEN_BACKLOG = 1024

Clock = Callable[[], float]


class RequestLog:
    """JSON lines file with one record per request, flushed after every line.

    A record has ``host`` (name, or null for an unknown ``Host``), ``address``
    (the local address that took the connection), ``hostname`` (from the ``Host``
    header), ``path`` (the request target), ``method``, ``attempt`` (requests for
    that path on that host so far, from 1), ``arrival`` and ``answered``
    (``time.monotonic()``, or null when nothing was answered), ``status``,
    ``outcome``, ``retry_after`` (seconds) and ``connection`` (an id per
    connection). ``outcome`` is one of: ``served`` (content, including 404s),
    ``rejected`` (503 or 429 from the profile), ``banned``, ``reset``,
    ``blackhole`` (logged on arrival), ``unknown-host`` (421), ``bad-request`` and
    ``client-closed`` (the client left before the response was written).
    """

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record as a JSON line and flush it to the file."""
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


@dataclass
class Exchange:
    """One request on one connection, with what the log needs to describe it."""

    connection: int
    address: str
    arrival: float
    host: HostState | None = None
    request: ParsedRequest | None = None
    attempt: int | None = None

    def record(
        self,
        answered: float | None,
        status: int | None,
        outcome: str,
        retry_after: int | None,
    ) -> dict[str, Any]:
        """Return the log record of this exchange."""
        request = self.request
        return {
            "host": self.host.config.name if self.host is not None else None,
            "address": self.address,
            "hostname": request.hostname if request is not None else None,
            "path": request.target if request is not None else None,
            "method": request.method if request is not None else None,
            "attempt": self.attempt,
            "arrival": self.arrival,
            "answered": answered,
            "status": status,
            "outcome": outcome,
            "retry_after": retry_after,
            "connection": self.connection,
        }


class Site:
    """A running fault site: binds every listener, serves, and stops on request.

    Call ``start()`` once, then ``wait_stopped()``. ``stop()`` may be called from a
    signal handler. ``clock`` is the monotonic clock behind every logged time and
    every time-based decision (recovery windows, token buckets).
    """

    def __init__(self, config: SiteConfig, log: RequestLog, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.content = SiteContent.from_root(
            config.root, pages=config.pages, js_pages=config.js_pages
        )
        self.started = 0.0
        self.port = config.port
        self.hosts: dict[str, HostState] = {}
        self._virtual: dict[str, HostState] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._pending_sockets: list[socket.socket] = []
        self._delayed_starts: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._next_connection = 0
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind every listener and start serving; raise BindError when a bind fails."""
        self.started = self.clock()
        sockets = self._bind_all()

        for name, sock in sockets.items():
            host = self.hosts.get(name)
            if host is not None and host.refuses_until_listening:
                # Bound but not listening: the kernel refuses connections until
                # listen() is called when the failure window ends.
                self._pending_sockets.append(sock)
                start_at = self.started + host.config.fail_seconds
                task = asyncio.create_task(self._listen_at(host, sock, start_at))
                self._delayed_starts.append(task)
                continue
            await self._listen(host, sock)

    def ready_info(self) -> dict[str, Any]:
        """Return the content of the ready file: pid, start time, content and hosts."""
        hosts: dict[str, Any] = {}
        for name, host in self.hosts.items():
            config = host.config
            url_host = config.hostname if config.hostname is not None else host.address
            entry: dict[str, Any] = {
                "url": f"http://{url_host}:{host.port}/",
                "address": host.address,
                "port": host.port,
                "profile": config.profile,
            }
            if config.hostname is not None:
                entry["hostname"] = config.hostname
            hosts[name] = entry

        return {
            "pid": os.getpid(),
            "started": self.started,
            "port": self.port,
            "seed": self.config.seed,
            "content": {
                "root": self.config.root,
                "pages": self.config.pages,
                "js_pages": self.config.js_pages,
            },
            "hosts": hosts,
        }

    def stop(self) -> None:
        """Ask the site to stop. ``wait_stopped()`` then closes everything."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait for ``stop()``, then close listeners and connections."""
        await self._stopped.wait()

        for task in self._delayed_starts:
            task.cancel()
        for sock in self._pending_sockets:
            sock.close()
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._connections):
            task.cancel()

        pending = [*self._delayed_starts, *self._connections]
        await asyncio.gather(*pending, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def _bind_all(self) -> dict[str, socket.socket]:
        """Bind the listeners and fill ``self.hosts``; return sockets by host name.

        The virtual listener's socket has the empty string as its name.
        """
        shared: list[str] = []
        probes: list[str] = []
        for config in self.config.hosts:
            if config.address is None or config.port is not None:
                continue
            if config.profile == "dead":
                probes.append(config.address)
            else:
                shared.append(config.address)

        if self.config.needs_virtual_listener:
            shared.append(VIRTUAL_ADDRESS)
        if any(config.is_virtual and config.profile == "dead" for config in self.config.hosts):
            probes.append(self.config.dead_address)

        self.port, by_address = reserve_port(shared, probes, self.config.port)
        if self.port == 0:
            # Only hosts with their own port: pick one for virtual URLs anyway.
            self.port, _none = reserve_port([], [VIRTUAL_ADDRESS], 0)

        sockets: dict[str, socket.socket] = {}
        if VIRTUAL_ADDRESS in by_address:
            sockets[""] = by_address[VIRTUAL_ADDRESS]

        for config in self.config.hosts:
            self._add_host(config)
            if config.address is None:
                continue
            if config.port is None:
                if config.profile != "dead":
                    sockets[config.name] = by_address[config.address]
                continue

            # A host with a port of its own.
            if config.profile == "dead":
                reserve_port([], [config.address], config.port)
            else:
                _port, own = reserve_port([config.address], [], config.port)
                sockets[config.name] = own[config.address]
        return sockets

    def _add_host(self, config: HostConfig) -> None:
        if config.is_virtual:
            dead = config.profile == "dead"
            address = self.config.dead_address if dead else VIRTUAL_ADDRESS
            host = HostState(config, address, self.port)
            if not dead:
                assert config.hostname is not None
                self._virtual[config.hostname] = host
        else:
            assert config.address is not None
            port = config.port if config.port is not None else self.port
            host = HostState(config, config.address, port)
        self.hosts[config.name] = host

    async def _listen(self, host: HostState | None, sock: socket.socket) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(host, reader, writer)

        server = await asyncio.start_server(
            handle, sock=sock, limit=_HEAD_LIMIT, backlog=_LISTEN_BACKLOG
        )
        self._servers.append(server)

    async def _listen_at(self, host: HostState, sock: socket.socket, start_at: float) -> None:
        if host.config.fail_until_file is not None:
            # Poll, so a test can end the failure window at the moment it chooses.
            while host.failing(self.clock(), self.started):
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(max(0.0, start_at - self.clock()))
        self._pending_sockets.remove(sock)
        await self._listen(host, sock)
        logger.info("host %s: failure window ended, now listening", host.config.name)

    async def _serve_connection(
        self,
        fixed_host: HostState | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Serve the requests of one connection until either side closes it."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        # A zero high-water mark makes drain() wait until the kernel has everything.
        writer.transport.set_write_buffer_limits(high=0)
        self._next_connection += 1
        connection = self._next_connection
        address = writer.get_extra_info("sockname")[0]

        try:
            if fixed_host is not None and fixed_host.config.profile == "blackhole":
                exchange = Exchange(connection, address, self.clock(), fixed_host)
                await self._swallow(exchange, reader)
            else:
                await self._serve_requests(fixed_host, connection, address, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as error:
            logger.debug("connection %d ended: %r", connection, error)
        except asyncio.CancelledError:
            # Cancelled by wait_stopped(). Ending normally keeps asyncio's stream
            # callback from logging the cancellation as an error.
            logger.debug("connection %d closed at shutdown", connection)
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve_requests(
        self,
        fixed_host: HostState | None,
        connection: int,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        keep_alive = True
        while keep_alive:
            request = await read_request(reader, self.clock)
            if request is None:
                return

            if isinstance(request, BadRequest):
                exchange = Exchange(connection, address, request.arrival)
                response = Response(request.status, "bad-request", (request.reason + "\n").encode())
                await self._send(exchange, response, writer, keep_alive=False)
                return

            exchange = Exchange(connection, address, request.arrival, request=request)
            host = fixed_host or self._virtual.get(request.hostname or "")
            if host is None:
                response = Response(421, "unknown-host", b"No host of this name is served here.\n")
                keep_alive = await self._send(exchange, response, writer, request.keep_alive)
                continue

            exchange.host = host
            if host.config.profile == "blackhole":
                await self._swallow(exchange, reader)
                return
            keep_alive = await self._respond(exchange, writer)

    async def _swallow(self, exchange: Exchange, reader: asyncio.StreamReader) -> None:
        """Log each request of a blackhole connection on arrival, and never respond.

        Reads until the client closes the connection. A connection closed before a
        complete request arrived is logged once, with a null path.
        """
        host = exchange.host
        assert host is not None
        logged = False
        request: ParsedRequest | BadRequest | None = exchange.request

        while True:
            if isinstance(request, ParsedRequest):
                exchange.request = request
                exchange.arrival = request.arrival
                exchange.attempt = host.next_attempt(request.target)
                self.log.write(exchange.record(None, None, "blackhole", None))
                logged = True
            elif isinstance(request, BadRequest):
                # Nothing more can be parsed, so wait for the client to give up.
                await reader.read()
                break
            request = await read_request(reader, self.clock)
            if request is None:
                break

        if not logged:
            self.log.write(exchange.record(None, None, "blackhole", None))

    async def _respond(self, exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        """Decide, delay and send the response to one request.

        Return whether the connection stays open for the next request.
        """
        host = exchange.host
        request = exchange.request
        assert host is not None and request is not None

        exchange.attempt = host.next_attempt(request.target)
        response = decide(
            host,
            request,
            exchange.attempt,
            started=self.started,
            seed=self.config.seed,
            content=self.content,
        )

        latency = pick_latency(
            self.config.seed, host.config.name, request.target, host.latency_range()
        )
        if latency > 0:
            await asyncio.sleep(latency)

        return await self._send(exchange, response, writer, request.keep_alive)

    async def _send(
        self,
        exchange: Exchange,
        response: Response,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
    ) -> bool:
        """Write the response and log it; return whether the connection stays open.

        A reset response keeps the head a normal response would have (its full
        ``Content-Length`` and ``Connection`` value), so nothing warns the client.
        """
        head = encode_head(
            response.status, response.content_type, len(response.body), keep_alive, response.headers
        )
        is_head_request = exchange.request is not None and exchange.request.method == "HEAD"
        body = b"" if is_head_request else response.body

        outcome = response.outcome
        answered: float | None = None
        try:
            if response.reset:
                await self._send_and_reset(writer, head + body[: len(body) // 2], exchange)
                answered = self.clock()
                keep_alive = False
            else:
                answered = await self._write(writer, head + body)
        except (ConnectionError, OSError) as error:
            logger.debug("connection %d: response not sent: %r", exchange.connection, error)
            outcome = "client-closed"
            keep_alive = False

        record = exchange.record(answered, response.status, outcome, response.retry_after)
        self.log.write(record)
        logger.debug(
            "%s %s %s: %d %s",
            record["host"],
            record["method"],
            record["path"],
            response.status,
            outcome,
        )
        return keep_alive

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> float:
        """Write data and return the monotonic time when the kernel had all of it."""
        writer.write(data)
        # Most responses fit the socket buffer, so write() has sent everything and the
        # clock is read at once rather than after another pass of the event loop.
        if writer.transport.get_write_buffer_size() == 0:
            return self.clock()
        await writer.drain()
        return self.clock()

    async def _send_and_reset(
        self, writer: asyncio.StreamWriter, data: bytes, exchange: Exchange
    ) -> None:
        """Send part of a response, then reset the connection (RST, not FIN)."""
        writer.write(data)
        await writer.drain()

        # An optional stall before the reset, like a server that hangs mid-body.
        delay = exchange.host.config.reset_delay if exchange.host is not None else 0.0
        if delay > 0:
            await asyncio.sleep(delay)

        sock = writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER on with a timeout of 0 makes close() send RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
