"""--workers N: N processes serving the same listening sockets, for more than one core.

The parent binds the sockets, forks the workers (each builds its own event loop, upstream
connections, log writer and Redis client after the fork: none of those survive a fork), then
only supervises: it forwards SIGTERM, SIGINT and SIGHUP to every worker and waits. A worker
whose parent dies (even by SIGKILL) gets SIGTERM from the kernel and drains like any stop.

A worker that dies (a crash, an OOM kill: any exit but a clean one after a stop signal) is
logged, and the parent then stops the other workers and exits with status 1; a worker
stopped on its own by a signal stops the others too, and the parent exits 0. It does not restart it:
a proxy quietly serving at part of its capacity is harder to notice than one that exits,
and the service manager (systemd `Restart=on-failure`, deploy/) restarts the whole set with
a clean state; limits live in Redis (--workers needs --redis-url), so nothing is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("llamacpp_proxy")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPING = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl(2)


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this worker when the parent dies (even by SIGKILL), so no orphan goes on
    serving the port unsupervised (Linux; elsewhere the service manager has to)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run(count: int, sockets: list[socket.socket], serve: Callable[[int], int]) -> int:
    """Fork `count` workers that each run `serve(index)` (its return value is the worker's
    exit status) on the inherited `sockets`; supervise them; return the parent's status.
    The caller must have no threads running: a thread does not survive a fork, and a lock
    it held would stay held in the child."""
    workers: dict[int, int] = {}  # pid -> index
    stopping = False
    failed = False
    parent = os.getpid()

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in STOPPING:
            stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):  # exited: the wait loop reaps it
                os.kill(pid, signum)

    # Signals stay blocked while forking: one arriving between a fork and the child's reset
    # would otherwise run the parent's forwarding handler in the child.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        for index in range(count):
            try:
                pid = os.fork()
            except OSError as exc:
                log.error("cannot start worker %d: %s; stopping the others", index, exc)
                failed = True
                forward(signal.SIGTERM, None)
                break
            if pid == 0:
                for sig in FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                _stop_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                status = 1
                try:
                    status = serve(index)
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)
            workers[pid] = index
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    for sock in sockets:
        sock.close()  # the workers hold their own copies; the parent never accepts
    log.info("started %d workers: %s", len(workers), ", ".join(map(str, workers)))

    while workers:
        try:
            pid, status = os.wait()  # EINTR is retried after `forward` runs (PEP 475)
        except ChildProcessError:
            break
        if pid not in workers:
            continue
        index = workers.pop(pid)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if clean:
            # Only a stop signal makes a worker exit 0; one sent to it alone (systemd's
            # KillMode=control-group signals every process at once) still stops them all.
            if not stopping:
                log.info("worker %d (pid %d) stopped; stopping the others", index, pid)
                forward(signal.SIGTERM, None)
            continue
        if not stopping:
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s); stopping the other workers "
                "(the service manager restarts the proxy)",
                index,
                pid,
                _exit_status(status),
            )
            forward(signal.SIGTERM, None)
        else:
            log.error("worker %d (pid %d) stopped with %s", index, pid, _exit_status(status))
        failed = True
    return 1 if failed else 0
