"""A counting TCP proxy in front of the local SQS/S3 endpoint, for bin/bench.

Run as ``python -m benchmarks.request_counter TARGET_PORT SIDE [SIDE ...]``: it listens on
127.0.0.1, one port per side (``orchestrator``, ``worker``: whoever is given that port), forwards
every byte to ``127.0.0.1:TARGET_PORT`` unchanged and, on the way, reads only the head of each
HTTP request (and at most the first 512 bytes of a form-encoded body) to count requests by
side and operation: ``SQS SendMessage`` (``X-Amz-Target`` of the JSON protocol, or ``Action=``
of the query protocol), ``S3 PutObject`` (method and path shape, path-style addressing), ...

It prints ``{"ports": {SIDE: PORT, ...}}`` once listening, then answers every ``counts`` line on
stdin with one JSON line ``{SIDE: {OPERATION: N}}`` (totals since start; the bench takes
differences). It exits when stdin closes, so it never outlives the bench.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
from collections import Counter
from urllib.parse import parse_qs, urlsplit

PREFIX_BYTES = 512  # of a form-encoded body, enough to find Action= of the query protocol
MAX_HEAD = 65536
CREDENTIAL_SERVICE = re.compile(r"Credential=[^/,]+/\d+/[^/,]+/([^/,]+)/")
ACTION = re.compile(rb"(?:^|&)Action=([A-Za-z0-9]+)")
S3_OPERATIONS = {  # (method, names an object) -> operation, path-style addressing
    ("PUT", True): "PutObject",
    ("GET", True): "GetObject",
    ("DELETE", True): "DeleteObject",
    ("HEAD", True): "HeadObject",
    ("PUT", False): "CreateBucket",
    ("HEAD", False): "HeadBucket",
    ("GET", False): "ListObjects",
    ("DELETE", False): "DeleteBucket",
    ("POST", False): "DeleteObjects",
}


def classify(method: str, target: str, headers: dict[str, str], body_prefix: bytes) -> str:
    """The operation one request is: ``SQS <Action>``, ``S3 <Operation>`` or ``other <what>``."""
    amz_target = headers.get("x-amz-target")
    if amz_target:  # JSON protocol: "AmazonSQS.SendMessage"
        service, _, action = amz_target.rpartition(".")
        return f"SQS {action}" if "sqs" in service.lower() else f"{service} {action}"
    parts = urlsplit(target)
    if parts.path.startswith("/moto-api"):
        return "other moto-api"
    match = CREDENTIAL_SERVICE.search(headers.get("authorization", ""))
    service = match.group(1) if match else ""
    action = parse_qs(parts.query).get("Action", [None])[0]
    if action is None:
        found = ACTION.search(body_prefix)
        action = found.group(1).decode() if found else None
    if action is not None:  # query protocol
        return f"SQS {action}" if service in ("sqs", "") else f"{service} {action}"
    if service == "s3":
        path = parts.path.lstrip("/").split("/", 1)
        names_object = len(path) == 2 and bool(path[1])
        if method == "POST" and "delete" in parts.query:
            return "S3 DeleteObjects"
        return f"S3 {S3_OPERATIONS.get((method, names_object), method)}"
    return f"other {service or '?'} {method}"


class RequestStream:
    """Finds request boundaries in one connection's client-to-server bytes (keep-alive,
    Content-Length or chunked bodies) and reports each request's operation once it is complete."""

    def __init__(self, report) -> None:
        self.report = report
        self.state = "head"
        self.buf = b""
        self.remaining = 0
        self.request: tuple[str, str, dict[str, str]] | None = None
        self.prefix = b""
        self.want_prefix = False

    def feed(self, data: bytes) -> None:
        while data:
            if self.state == "blind":  # a head we could not parse: forward the rest uncounted
                return
            if self.state in ("body", "chunk-data"):
                take = min(self.remaining, len(data))
                if self.want_prefix and self.state == "body" and len(self.prefix) < PREFIX_BYTES:
                    self.prefix += data[: min(take, PREFIX_BYTES - len(self.prefix))]
                self.remaining -= take
                data = data[take:]
                if self.remaining == 0:
                    if self.state == "body":
                        self._done()
                    else:
                        self.state = "chunk-size"
                continue
            buf = self.buf + data  # head, chunk-size line or trailer: needs whole lines
            rest = self._consume_lines(buf)
            if rest is None:
                self.buf = buf
                if len(buf) > MAX_HEAD:
                    self._blind()
                return
            self.buf, data = b"", rest

    def _consume_lines(self, buf: bytes) -> bytes | None:
        """Consume one complete head, chunk-size line or trailer line at the start of ``buf``;
        returns the bytes after it, or None when more bytes are needed."""
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            self._start(buf[:end])
            return buf[end + 4 :]
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        line, rest = buf[:end], buf[end + 2 :]
        if self.state == "chunk-size":
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._blind()
                return b""
            if size == 0:
                self.state = "trailer"
            else:
                self.state, self.remaining = "chunk-data", size + 2  # data and its CRLF
        elif line == b"":  # trailer: the empty line ends the chunked body
            self._done()
        return rest

    def _start(self, head: bytes) -> None:
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            self._blind()
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.request = (method.upper(), target, headers)
        self.prefix = b""
        self.want_prefix = "x-amz-target" not in headers and "form-urlencoded" in headers.get("content-type", "")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
            return
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            self._blind()
            return
        if length > 0:
            self.state, self.remaining = "body", length
        else:
            self._done()

    def _done(self) -> None:
        if self.request is not None:
            self.report(classify(*self.request, self.prefix))
        self.request, self.prefix, self.state = None, b"", "head"

    def _blind(self) -> None:
        self.report("other unparsed")
        self.state = "blind"


class CountingProxy:
    def __init__(self, target_port: int, sides: list[str]) -> None:
        self.target_port = target_port
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = {side: Counter() for side in sides}
        self.ports: dict[str, int] = {}
        for side in sides:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            self.ports[side] = listener.getsockname()[1]
            threading.Thread(target=self._accept, args=(listener, side), daemon=True).start()

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {side: dict(counter) for side, counter in self.counts.items()}

    def _accept(self, listener: socket.socket, side: str) -> None:
        counter = self.counts[side]

        def report(operation: str) -> None:
            with self.lock:
                counter[operation] += 1

        while True:
            client, _ = listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = RequestStream(report)
            threading.Thread(target=self._pump, args=(client, upstream, stream.feed), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, peek) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if peek is not None:
                    try:
                        peek(data)
                    except Exception:
                        peek = None
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def main() -> int:
    target_port, sides = int(sys.argv[1]), sys.argv[2:]
    proxy = CountingProxy(target_port, sides or ["all"])
    print(json.dumps({"ports": proxy.ports}), flush=True)
    for line in sys.stdin:
        if line.strip() == "counts":
            print(json.dumps(proxy.snapshot()), flush=True)
    os._exit(0)  # stdin closed: the bench is gone or done; pumps are daemon threads


if __name__ == "__main__":
    sys.exit(main())
