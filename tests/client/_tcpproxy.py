"""A loopback TCP forwarder for client tests: stands in for an API replica (or a public S3 name)
that can be killed abruptly, every open connection cut mid-request, as ``kill -9`` would."""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port``. ``kill()`` closes the listener and every
    connection at once; ``kill_after_upstream_bytes`` does it by itself once that many request bytes
    went upstream (a replica dying in the middle of a request body)."""

    def __init__(self, target_port: int, *, kill_after_upstream_bytes: int | None = None) -> None:
        self.target_port = target_port
        self.kill_after = kill_after_upstream_bytes
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream_bytes = 0
        self.connections = 0
        self.killed = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.killed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                down.close()
                continue
            with self._lock:
                if self.killed.is_set():
                    down.close()
                    up.close()
                    return
                self._socks += [down, up]
                self.connections += 1
            threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if upstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
                        over = self.kill_after is not None and self.upstream_bytes >= self.kill_after
                    if over:
                        self.kill()
                        return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill(self) -> None:
        self.killed.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in [self.listener, *socks]:
            # shutdown first: close() alone does not wake a thread blocked in recv on the socket,
            # and sends nothing to the peer while that thread still holds it
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
