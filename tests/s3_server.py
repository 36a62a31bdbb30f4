"""A local S3-compatible server for tests (moto, on 127.0.0.1), and a TCP proxy in front of it that
can stop answering and come back — the outages a long run meets. Each test that needs one starts it
and stops it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

__all__ = ["Proxy", "free_port", "moto_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server, stopped on exit. Raises ``RuntimeError`` when it
    cannot start here (callers skip)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    msg = "moto_server could not start here"
                    raise RuntimeError(msg) from None
                time.sleep(0.1)
        else:
            msg = "moto_server did not answer on 127.0.0.1 within 10 s"
            raise RuntimeError(msg)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``target`` from a process of its own (no share of the test's GIL).
    :meth:`down` refuses connections and cuts the open ones, as a server that stopped; :meth:`up`
    answers again on the same port; :meth:`close` ends it."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen([sys.executable, "-m", "tests.s3_server", target, str(self.port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
        if self._process.stdout is None or self._process.stdout.readline().strip() != "ready":
            msg = "the test proxy did not start"
            raise RuntimeError(msg)

    def down(self) -> None:
        self._say("down")

    def up(self) -> None:
        self._say("up")

    def _say(self, command: str) -> None:
        """A command on the process's stdin, answered once carried out (a signal would reach whichever
        of its threads the kernel picks)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        if self._process.stdout.readline().strip() != command:
            msg = f"the test proxy did not carry out {command!r}"
            raise RuntimeError(msg)

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


class _Forwarder:
    """The proxy process's work: accept, connect to the target, copy both ways."""

    def __init__(self, target: str, port: int) -> None:
        host, target_port = target.replace("http://", "").split(":")
        self.target = (host, int(target_port))
        self.port = port
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._open = self._open, set()

        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone does not
            listener.close()
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: down()
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # accepted as it went down: refuse it
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the end on; the other direction ends on its own


if __name__ == "__main__":
    forwarder = _Forwarder(sys.argv[1], int(sys.argv[2]))
    forwarder.up()
    print("ready", flush=True)
    for line in sys.stdin:  # "down" / "up", each answered when done
        getattr(forwarder, line.strip())()
        print(line.strip(), flush=True)
