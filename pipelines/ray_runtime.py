"""The Ray runtime around the build graph: starting or joining Ray, keeping its internal notices
off the user's terminal, releasing a finished round's actors, and a stall watchdog.

Nothing here knows about stages or sources; ``pipelines/ray_build.py`` wires those.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Iterable, Iterator, Optional

from emo_data.config import ExecutorConfig

log = logging.getLogger("emo.build.ray")

# Environment passed on to the worker processes (matters on a cluster, where workers do not
# inherit the driver's environment).
FORWARD_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "EMO_SAMPLES_DIR", "RAY_AUTH_MODE",
               "HF_TOKEN", "PYANNOTE_TOKEN")


def assigned_gpu() -> bool:
    """Did Ray give this actor a GPU? (num_gpus > 0 in its operator's resources)"""
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - no Ray context: stay on the configured device
        return False


def worker_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def start_ray(address: Optional[str], workers: Optional[int], executor: ExecutorConfig,
               extra_env: Optional[dict[str, str]] = None) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (and must shut it down).
    ``extra_env`` goes to every worker (a token given in the config: it is never stored)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    verbose = log.isEnabledFor(logging.INFO)
    if not verbose:
        # A user watching the progress bars does not need Ray Data's notices; `emo-data -v` shows them.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env.update(extra_env or {})
    runtime_env = {"env_vars": env} if env else None
    if address:
        check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=verbose)
    else:
        ray.init(
            address="local",  # always a new embedded instance, never a `ray start` cluster found on this machine
            num_cpus=int(workers or os.cpu_count() or 1),
            object_store_memory=executor.object_store_memory,
            include_dashboard=False,
            runtime_env=runtime_env,
            # Ray runs workers at nice 15; the in-process executor runs at 0, and on a shared
            # machine nice-15 workers lose most of the CPU to anyone else's work.
            _system_config={
                "worker_niceness": executor.worker_niceness,
                # Keep idle task workers: by default Ray kills idle workers beyond one per CPU, and
                # with the actor pools holding those slots every per-clip task then paid for a new
                # Python worker (measured: a third of both cores went to worker start-up).
                "num_workers_soft_limit": executor.idle_workers or 4 * int(workers or os.cpu_count() or 1) + 4,
            },
            logging_level=logging.WARNING,
            # Worker processes' stdout/stderr (library deprecation warnings and the like) reach the
            # terminal only with -v; failures reach the manifest as rows either way.
            log_to_driver=verbose,
        )
    return True


# Ray's C++ components log to the driver's stderr in this form, e.g. core_worker.cc's "Actor ...
# has constructor arguments in the object store and max_restarts > 0" for every Ray Data actor.
_RAY_NATIVE_LOG = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.(?:cc|h):\d+:")


# Notices Ray's Python side prints to the driver's stderr: a worker's death seen by the raylet
# (handled: the source is retried or becomes a row), worker output lines.
_RAY_PY_NOTICE = re.compile(r"^(?:\x1b\[[\d;]*m)?\((?:raylet[^)\n]*\)|[^\n]*?pid=\d+[^\n]*?\))")


class _NoticeFilter:
    """A text stream for ``sys.stderr`` that drops whole lines of Ray's internal notices and
    passes everything else (progress bars redraw with ``\r`` and pass at once)."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if not (_RAY_PY_NOTICE.match(line) or _RAY_NATIVE_LOG.match(line.encode("utf-8", "replace"))):
                self._stream.write(line + "\n")
        if "\r" in self._pending and not self._pending.lstrip("\r").startswith(("(", "\x1b[33m(", "\x1b[36m(")):
            self._stream.write(self._pending)
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def drain(self) -> None:
        """Pass on a last line without its newline (the stream stays open)."""
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def close(self) -> None:
        self.drain()
        self._stream.close()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def native_logs_hidden(active: bool):
    """While active, file descriptor 2 goes to a temporary file (where Ray's C++ code and the log
    handlers Ray set up at import write) and Python's ``sys.stderr`` to the real terminal through
    :class:`_NoticeFilter`, so progress and this package's messages show and Ray's internal
    notices do not. What Ray wrote is dropped: it is all in Ray's session logs
    (``/tmp/ray/session_latest/logs``), and ``emo-data -v`` shows it live. Ray Data's warnings
    and errors about blocks it drops are silenced too: the build retries those sources or makes
    them rows."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    old_stderr, old_stdout = sys.stderr, sys.stdout
    sys.stderr = _NoticeFilter(open(os.dup(saved_fd), "w", buffering=1,
                                    encoding=getattr(old_stderr, "encoding", None) or "utf-8", errors="backslashreplace"))
    sys.stdout = _NoticeFilter(old_stdout)  # Ray prints the raylet's notices (a worker died, ...) to stdout
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    moved = []
    for handler in logging.root.handlers + logging.getLogger("emo").handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old_stderr:
            handler.setStream(sys.stderr)
            moved.append(handler)
    try:
        yield
    finally:
        sys.stderr.flush()
        for handler in moved:
            handler.setStream(old_stderr)
        sys.stderr.close()
        sys.stderr = old_stderr
        sys.stdout.drain()
        sys.stdout = old_stdout
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        captured.close()


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` GCS address nobody listens on (ray.init would wait minutes)."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot reach a Ray head at {address} ({exc}); start one with `ray start --head --port=...`") from exc


def release_round(started_embedded: bool, address: Optional[str], executor: ExecutorConfig,
                   extra_env: dict[str, str], wait_s: float = 30.0) -> None:
    """Before a retry round: the finished round's actors must give their CPUs back, or the new
    round's actors can never be scheduled (seen: a dead VideoPass actor's retry round waiting
    forever behind the first round's two live actors). On the embedded Ray, wait for every CPU to
    be free and restart Ray if they are not; on a cluster (other jobs may hold CPUs) go on, and
    the stall watchdog bounds the wait."""
    import gc

    import ray

    gc.collect()  # drop the finished dataset's executor and actor handles
    if not started_embedded:
        return
    deadline = time.monotonic() + wait_s
    total = ray.cluster_resources().get("CPU", 0.0)
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            return
        time.sleep(0.5)
    log.warning("the last round's actors still hold CPUs after %.0f s; restarting the embedded Ray", wait_s)
    ray.shutdown()
    start_ray(address, executor.workers, executor, extra_env)


class Watched:
    """Iterate ``rows`` on a helper thread; stop (``stalled = True``) when none arrives for
    ``timeout_s``. The driver can then end the build instead of waiting forever on a pipeline
    that cannot make progress (an actor that hangs, a retry that can never be scheduled)."""

    def __init__(self, rows: Iterable[Any], timeout_s: float, poll_s: float = 1.0):
        self.timeout_s, self.poll_s, self.stalled = timeout_s, poll_s, False
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(iter(rows),), daemon=True, name="emo-rows")
        self._thread.start()

    def _pump(self, rows: Iterator[Any]) -> None:
        try:
            for row in rows:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("row", row), timeout=self.poll_s)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[Any]:
        last = time.monotonic()
        while True:
            try:
                what, payload = self._queue.get(timeout=self.poll_s)
            except queue.Empty:
                if time.monotonic() - last > self.timeout_s:
                    self.stalled = True
                    self._stop.set()
                    return
                continue
            last = time.monotonic()
            if what == "end":
                return
            if what == "error":
                raise payload
            yield payload
