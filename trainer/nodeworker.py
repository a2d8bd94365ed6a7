"""A Flower node's training worker: one long-lived process per node and run that imports torch and
caff once and trains every message the node gets.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. A ClientApp that trained
in that process re-imported torch (with ``torch._dynamo``, which every torch optimizer imports)
for each message: about 6 CPU-seconds, against half a second of caff's work. So on a deployment
node, caff's ClientApp (`trainer.flower.client_train`) is a thin shim that imports no torch: it
hands the task and the received arrays to this node's worker (`ask`) and wraps the reply.

- The shim starts the worker on the node's first train message if none answers (`connect`):
  ``python -m trainer.nodeworker FOLDER WATCH``, in the shim's process group (so whatever ends
  the SuperNode's group ends it too), one torch thread. It serves a Unix socket (`socket_path`),
  one request per connection, one at a time. A stale socket (a dead worker) is replaced.
- It exits when no request came for ``IDLE_SECONDS``, or when the process WATCH is gone (the
  shim's parent: the SuperNode's SuperExec, which outlives messages). Never an orphan for long.
- It keeps each device's data shard and its measured FLOPs and peak in memory; on disk, in the
  node's folder, the shard file (`node_shard`) and `MeasuredFiles` are what a fresh worker reads.
- A request is a frame: 16 bytes (the lengths of a JSON header and of a payload), the header,
  the payload: the state dict packed as it crossed Flower (`costmodel.wire.pack_state`), passed
  through by the shim unopened, unpacked and packed again by the worker. An
  error in the worker comes back as one line (``error`` in the header); a worker that dies or
  hangs is a closed socket or a timeout (``REPLY_SECONDS``) for the shim, never a hang.

The worker's record holds its own process memory (``process_bytes``: peak resident set, VmHWM;
``process_uss_bytes``: private bytes at the reply): the device's training process. Bytes, seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path

from profiles.atomic import atomic_write

IDLE_SECONDS = 600.0  # a worker with no request for this long exits
START_SECONDS = 60.0  # a new worker must take connections within this
REPLY_SECONDS = 1800.0  # a request's reply must come within this (torch's import on a first one included)

log = logging.getLogger("caff.nodeworker")


def socket_path(folder: Path) -> Path:
    """The worker socket of a node folder: a short path (Unix sockets allow about 100 bytes) in a
    directory only this user may enter, named after the folder."""
    private = Path(tempfile.gettempdir()) / f"caff-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    if private.stat().st_uid != os.getuid() or private.stat().st_mode & 0o077:
        raise RuntimeError(f"{private} is not private to this user")
    return private / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".sock")


def send(connection: socket.socket, header: dict, payload: bytes = b"") -> None:
    """Write one frame: the lengths of the header and the payload, the JSON header, the payload."""
    encoded = json.dumps(header).encode()
    connection.sendall(struct.pack("!QQ", len(encoded), len(payload)) + encoded)
    connection.sendall(payload)


def receive(connection: socket.socket) -> tuple[dict, bytearray]:
    """Read one frame; ConnectionError if the other end closes first."""
    def exactly(n: int) -> bytearray:
        buffer, got = bytearray(n), 0
        view = memoryview(buffer)
        while got < n:
            read = connection.recv_into(view[got:])
            if read == 0:
                raise ConnectionError("the other end closed the connection")
            got += read
        return buffer
    header_bytes, payload_bytes = struct.unpack("!QQ", exactly(16))
    return json.loads(exactly(header_bytes)), exactly(payload_bytes)


def _connect(path: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        raise
    return connection


def connect(folder: Path, watch: int) -> socket.socket:
    """A connection to ``folder``'s worker; starts one (watching process ``watch``) if none answers."""
    path = socket_path(folder)
    try:
        return _connect(path)
    except OSError:
        pass
    root = str(Path(__file__).resolve().parents[1])  # this checkout (or Flower's app bundle) first
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with open(folder / "worker.log", "ab") as output:
        worker = subprocess.Popen([sys.executable, "-m", "trainer.nodeworker", str(folder), str(watch)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            return _connect(path)
        except OSError:
            if worker.poll() is not None:  # it found another worker answering (exit 0), or it failed
                with contextlib.suppress(OSError):
                    return _connect(path)
                raise RuntimeError(f"the node worker exited with {worker.returncode} (see {folder / 'worker.log'})")
            if time.monotonic() > deadline:
                worker.kill()
                raise RuntimeError(f"the node worker did not answer within {START_SECONDS:.0f} s") from None
            time.sleep(0.05)


def ask(folder: Path, task: dict, packed: bytes, watch: int) -> tuple[dict, bytearray]:
    """Have ``folder``'s worker train ``task`` from the ``packed`` state dict: (its reply header:
    ``record`` and ``times``, what it trained, packed). RuntimeError with one line if it fails or
    does not answer."""
    with connect(folder, watch) as connection:
        connection.settimeout(REPLY_SECONDS)
        try:
            send(connection, {"task": task}, packed)
            header, reply = receive(connection)
        except OSError as error:  # a timeout, or a closed connection
            raise RuntimeError(f"the node worker gave no reply ({error}; see {folder / 'worker.log'})") from None
    if "error" in header:
        raise RuntimeError(f"the node worker failed: {header['error']}")
    return header, reply


def node_shard(task: dict, folder: Path) -> tuple:
    """The training samples of ``task``'s device: parsed by the per-client loader
    (`trainer.engine.client_shard`) the first time and written to ``folder`` as a shard file
    (`trainer.shardfile`: the loader's storages and views), read back from it after that."""
    from trainer.engine import client_shard
    from trainer.shardfile import load_shard, save_shard

    path = folder / f"{task['task']}-{task['n_devices']}-{task['seed']}-{task['index']}.shard"
    if path.exists():
        return load_shard(path)
    shard = client_shard(task)
    save_shard(path, shard)
    return shard


class MeasuredFiles(MutableMapping):
    """What a node measured in this run, (spec, mode, batch, steps) -> (FLOPs, peak bytes): in
    memory, and one JSON file per key in its folder, which a fresh worker reads."""

    def __init__(self, folder: Path):
        self.folder, self.known = folder, {}

    def _path(self, key: tuple) -> Path:
        return self.folder / f"measured-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.json"

    def __getitem__(self, key: tuple) -> tuple[int, int]:
        if key not in self.known:
            try:
                saved = json.loads(self._path(key).read_text())
            except FileNotFoundError:
                raise KeyError(key) from None
            if saved["key"] != list(key):
                raise KeyError(key)
            self.known[key] = tuple(saved["value"])
        return self.known[key]

    def __setitem__(self, key: tuple, value: tuple[int, int]) -> None:
        atomic_write(self._path(key), json.dumps({"key": list(key), "value": list(value)}))
        self.known[key] = tuple(value)

    def __delitem__(self, key: tuple) -> None:
        self._path(key).unlink()
        self.known.pop(key, None)

    def __iter__(self):
        return (tuple(json.loads(path.read_text())["key"]) for path in self.folder.glob("measured-*.json"))

    def __len__(self) -> int:
        return len(list(self.folder.glob("measured-*.json")))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def listen(path: Path) -> socket.socket | None:
    """A socket listening at ``path``; None if a live worker answers there already. Stale sockets
    (a killed worker's: nothing answers) are removed, this one's and those a minute old beside it."""
    try:
        _connect(path).close()
        return None
    except OSError:
        path.unlink(missing_ok=True)
    for old in path.parent.glob("*.sock"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 60:
                try:
                    _connect(old).close()
                except OSError:
                    old.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    return listener


def serve(folder: Path, watch: int) -> None:
    """Serve ``folder``'s node until idle for ``IDLE_SECONDS`` or process ``watch`` is gone."""
    path = socket_path(folder)
    listener = listen(path)
    if listener is None:
        return
    inode = path.stat().st_ino
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # ended: remove the socket on the way out
    atomic_write(folder / "worker.pid", str(os.getpid()))
    log.info("serving %s at %s while process %d lives", folder, path, watch)
    from costmodel.wire import pack_state, unpack_state
    from trainer.engine import train_client
    from trainer.probe import peak_rss_bytes, uss_bytes

    shards, measured = {}, MeasuredFiles(folder)
    listener.settimeout(1.0)
    last = time.monotonic()
    try:
        while alive(watch) and time.monotonic() - last < IDLE_SECONDS:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(REPLY_SECONDS)
                received_at, cpu = time.time(), time.process_time()
                try:
                    header, payload = receive(connection)
                except ConnectionError:  # another worker's probe (`listen`), or a shim that gave up
                    continue
                try:
                    task = header["task"]
                    received = unpack_state(payload)
                    key = (task["task"], task["n_devices"], task["seed"], task["index"])
                    if key not in shards:
                        shards[key] = node_shard(task, folder)
                    loaded = time.time()
                    record, reply = train_client(task, received, shards[key], measured)
                    trained = time.time()
                    private = uss_bytes()
                    record |= {"process_bytes": peak_rss_bytes(), "process_memory": "measured"} | (
                        {"process_uss_bytes": private} if private is not None else {})
                    packed = pack_state(reply)
                    times = {"received": received_at, "data": loaded, "trained": trained,
                             "worker_cpu": time.process_time() - cpu}
                    send(connection, {"record": record, "times": times}, packed)
                except Exception as error:  # noqa: BLE001 - one line back to the shim, the traceback in the log
                    log.exception("a request failed")
                    line = f"{type(error).__name__}: {error}".splitlines()[0]
                    with contextlib.suppress(OSError):
                        send(connection, {"error": line})
            last = time.monotonic()
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # still this worker's socket
                path.unlink()
        listener.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    serve(Path(sys.argv[1]), int(sys.argv[2]))
