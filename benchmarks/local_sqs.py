"""What bin/soak needs around the local SQS endpoint: a proxy in front of it that can be cut (an
SQS outage), and a look at its queues.

Copied from ``tests/helpers.py`` (``sqs_client``, ``queue_counts``, ``PausableProxy``), so the
harness does not import the test suite.
"""

from __future__ import annotations

import threading

import boto3


def sqs_client(endpoint_url: str):
    return boto3.client("sqs", endpoint_url=endpoint_url, region_name="us-east-1")


def queue_counts(endpoint_url: str, queue_name: str) -> tuple[int, int]:
    """(visible, in flight) messages of an SQS queue."""
    client = sqs_client(endpoint_url)
    url = client.get_queue_url(QueueName=queue_name)["QueueUrl"]
    attrs = client.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


class PausableProxy:
    """A TCP proxy on 127.0.0.1 in front of the local endpoint, to simulate an SQS outage.

    ``pause()`` closes the listening socket and resets every open connection (clients see
    "connection refused"); ``resume()`` listens on the same port again.
    """

    def __init__(self, target_port: int):
        import socket

        self._socket_mod = socket
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: set = set()
        self._listener = None
        self.resume()

    @property
    def broker_url(self) -> str:
        return f"sqs://127.0.0.1:{self.port}"

    def resume(self) -> None:
        socket = self._socket_mod
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def pause(self) -> None:
        socket = self._socket_mod
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    close = pause

    def _accept(self, listener) -> None:
        socket = self._socket_mod
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
