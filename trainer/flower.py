"""caff on Flower's Message API: a ServerApp whose strategy gives each node its own plan, and a
ClientApp that runs caff's local training unchanged.

Nothing is implemented twice. The strategy holds the engine's `trainer.engine.Server`: it
samples the round, decides each device's mode, aggregates layer-wise, evaluates and
checkpoints, exactly as in the in-process engine. The ClientApp calls `trainer.engine.train_client`,
the function the in-process engine calls. So the global model after round r is the in-process
engine's, up to the order of floating-point sums.

- `CaffStrategy(FedAvg)`: ``configure_train`` builds one ``Message`` per training device, with
  its task (its entry of the plan: mode, steps, batch, learning rate; a ``ConfigRecord``) and the
  weights it needs, as an ``ArrayRecord`` of ONE array: the state dict packed (`packed_record`;
  Flower's per-array handling cost 43.5 s a round for caff's 69 arrays, 11.7 s as one). A plan of
  the whole model runs its whole forward pass, so it needs every array; a FedRA device gets only
  the blocks its shallow model holds, with the embeddings and head; a plan with
  ``frozen:bf16|int8`` gets those weights compact (`trainer.engine.received_arrays`). Replies come
  packed the same way. ``aggregate_train`` averages each tensor over the replies that hold it
  (stock FedAvg refuses replies whose keys differ); a reply that does not unpack is a failed device.
- Nodes and devices: the strategy asks every node (a ``query`` message) which device it is: its
  node config's ``device`` (a name in the plan) or ``partition-id`` (an index into the plan's
  devices; Flower's simulation sets it). Before round 1 it waits for a node per device (up to
  ``wait_seconds``); a node that connects later is asked at the start of the next round. A
  sampled device with no node records ``status: "no node"``.
- A node that disconnects mid-round: the SuperLink answers for it with an error once its
  heartbeats stop (about a minute), or the round's ``timeout`` passes; either way the round
  goes on with the other replies. The device's record says ``status: "failed"`` with the reason,
  and its update is lost for that round: the global model is averaged over the devices that did
  reply, as if it had not been sampled.

On a deployment node the ClientApp imports no torch: each message is a fresh process, so it
hands the task to the node's long-lived training worker (`trainer.nodeworker`), which loads only
its own device's data (`trainer.engine.client_shard`) once. The ServerApp reads one JSON file
named by the run config key ``run-file`` (`write_run_file`): the `TrainConfig`, the plan file,
the run directory, resume, seconds a round waits for replies, and the folder of pretrained
checkpoints (the app bundle that Flower ships carries code only). Its paths are read on the
SuperLink's machine. ``caff train --engine flower|flower-sim`` writes it.
"""

from __future__ import annotations

import time

MODULE_STARTED, MODULE_CPU = time.time(), time.process_time()  # this module's import starts (`timing`)

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from profiles.atomic import atomic_write  # noqa: E402
from profiles.packing import PACKED  # noqa: E402

if TYPE_CHECKING:  # torch and caff's engine load when a handler needs them: a query message needs neither
    import torch

    from trainer.engine import Server, TrainConfig

log = logging.getLogger("caff.flower")


def timing(**fields) -> None:
    """Append one JSON line of wall-clock times (seconds since the epoch) to the file that the
    environment variable ``CAFF_FLOWER_TIMINGS`` names, if it does (`bench/flower_rounds.py`)."""
    if path := os.environ.get("CAFF_FLOWER_TIMINGS"):
        with open(path, "a") as out:
            out.write(json.dumps(fields) + "\n")


def write_run_file(path: str | Path, config: TrainConfig, plan_path: str | Path, out: str | Path,
                   resume: bool = False, timeout: float = 600.0) -> str:
    """Write the run file the ServerApp reads; paths are made absolute. Returns its path."""
    from trainer.checkpoint import CHECKPOINT_DIR

    atomic_write(path, json.dumps({
        "config": config.model_dump(), "plan": str(Path(plan_path).resolve()), "out": str(Path(out).resolve()),
        "resume": resume, "timeout": timeout, "checkpoints": str(CHECKPOINT_DIR)}))
    return str(path)


def server_of_run_file(path: str) -> tuple[Server, float]:
    """The run's `Server` and the seconds a round waits for replies."""
    from planner.planfile import read_plan_file
    from trainer.engine import Server, TrainConfig

    fields = json.loads(Path(path).read_text())
    server = Server(TrainConfig(**fields["config"]), read_plan_file(fields["plan"]), fields["out"],
                    fields["resume"], fields["checkpoints"])
    return server, fields["timeout"]


def packed_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as caff sends it through Flower: one uint8 array (`costmodel.wire.pack_state`)."""
    from costmodel.wire import pack_state

    return record_of_packed(pack_state(tensors))


def record_of_packed(packed) -> ArrayRecord:
    """The ``ArrayRecord`` that carries packed bytes (`profiles.packing.pack`) as its one array."""
    import numpy as np
    from flwr.app import Array

    return ArrayRecord({PACKED: Array.from_numpy_ndarray(np.frombuffer(packed, dtype=np.uint8))})


def unpacked_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict in a `packed_record`, bit for bit."""
    from costmodel.wire import unpack_state

    return unpack_state(record[PACKED].numpy())


class CaffStrategy(FedAvg):
    """FedAvg's round loop with caff's per-device plans and layer-wise aggregation."""

    def __init__(self, server: Server, wait_seconds: float = 120.0):
        super().__init__(fraction_evaluate=0.0, min_available_nodes=1)
        self.server = server
        self.wait_seconds = wait_seconds  # how long to wait for nodes before round 1
        self.node_of_device: dict[str, int] = {}
        self.queried_nodes: set[int] = set()
        self.round_tasks: list[dict] = []
        self.round_records: list[dict] = []
        self.round_started = 0.0
        self.round_times: dict = {}  # wall-clock times of this round (`timing`)

    def round_index(self, server_round: int) -> int:
        """caff's round of Flower's ``server_round`` (they differ after a resume)."""
        return self.server.first_round + server_round - 1

    def assign_nodes(self, grid: Grid) -> None:
        """Ask every node not asked before which device it is (see the module docstring).

        Before round 1 it waits, up to ``wait_seconds``, for as many nodes as the plan has
        devices; nodes that connect later are asked at the start of a later round."""
        devices = [d.device for d in self.server.plan.devices]
        if not self.queried_nodes:
            deadline = time.monotonic() + self.wait_seconds
            while len(grid.get_node_ids()) < len(devices) and time.monotonic() < deadline:
                time.sleep(1.0)
        new_nodes = sorted(set(grid.get_node_ids()) - self.queried_nodes)
        if not new_nodes:
            return
        self.queried_nodes |= set(new_nodes)
        replies = grid.send_and_receive([Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node)
                                         for node in new_nodes], timeout=self.wait_seconds)
        for reply in replies:
            if reply.has_error():
                continue
            said = reply.content["node"]
            index = int(said.get("partition-id", -1))
            name = said.get("device") or (devices[index] if 0 <= index < len(devices) else None)
            if name in devices:
                self.node_of_device[name] = reply.metadata.src_node_id
        log.info("%d of %d plan devices have a node", len(self.node_of_device), len(devices))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        from costmodel.compact import compact_linears
        from trainer.engine import received_arrays, task_model, task_record

        self.assign_nodes(grid)
        self.round_started = time.perf_counter()
        self.round_times = {"round": server_round, "configured": time.time()}
        tasks, self.round_records = self.server.tasks(self.round_index(server_round))
        self.round_tasks = [t for t in tasks if t["device"] in self.node_of_device]
        self.round_records += [task_record(t, status="no node")
                               for t in tasks if t["device"] not in self.node_of_device]
        records: dict[tuple, ArrayRecord] = {}  # one record per distinct set of arrays sent, shared

        def arrays(task: dict) -> ArrayRecord:  # a FedRA device gets only its blocks; compact weights compact
            spec, mode, held = task_model(task)
            key = (held and tuple(held), mode.frozen, compact_linears(spec, mode))
            if key not in records:
                records[key] = packed_record(received_arrays(task, self.server.state))
            return records[key]
        return [Message(RecordDict({"arrays": arrays(task), "task": ConfigRecord(task)}),
                        message_type=MessageType.TRAIN, dst_node_id=self.node_of_device[task["device"]])
                for task in self.round_tasks]

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord, None]:
        from trainer.engine import task_record

        self.round_times["replied"] = time.time()
        records, updates, errors = list(self.round_records), {}, {}
        expected = {t["device"]: self.node_of_device[t["device"]] for t in self.round_tasks}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors[node] = reply.error.reason
                continue
            record = dict(reply.content["record"])
            if expected.get(record.get("device")) != node or record["device"] in updates:
                errors[node] = f"a reply for device {record.get('device')!r}, which this node was not asked to train"
                continue
            if record.get("status") != "trained" or not isinstance(record.get("samples"), int) or record["samples"] < 1:
                errors[node] = "a reply without a trained record and its sample count"
                continue
            try:
                updates[record["device"]] = unpacked_state(reply.content["arrays"])
            except Exception as error:  # noqa: BLE001 - a node's malformed reply loses its update, not the run
                errors[node] = f"a reply whose arrays do not unpack ({type(error).__name__})"
                continue
            records.append(record)
        for task in self.round_tasks:
            if task["device"] not in updates:
                reason = errors.get(expected[task["device"]], "no reply before the round's timeout")
                records.append(task_record(task, status="failed", reason=reason))
                log.warning("round %d: %s failed (%s); its update is lost", server_round, task["device"], reason)
        self.server.finish(self.round_index(server_round), records, updates, self.round_started)
        timing(who="server", **self.round_times, finished=time.time())
        return ArrayRecord(self.server.state), None


class PromptGrid:
    """A ServerApp's grid that looks for replies every ``interval`` seconds; everything else is
    the grid it wraps. Flower's HTTP grid (a deployment) looks every 3 s, hard-coded
    (``flwr/superlink/grid/http_grid.py``, ``send_and_receive``), so a round waited up to 3 s
    after its last reply had reached the SuperLink. Each look is a request the SuperLink serves
    (tens of milliseconds of its CPU here), so it looks once a second, not faster."""

    def __init__(self, grid: Grid, interval: float = 1.0):
        self.grid, self.interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Send ``messages`` and return the replies that come within ``timeout`` seconds (None: all)."""
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(self.interval)
        return replies


def make_server_app(run_file: str | None = None) -> ServerApp:
    """The ServerApp of a run file; None: the file the run config's ``run-file`` names (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server, timeout = server_of_run_file(run_file or str(context.run_config["run-file"]))
        rounds = server.config.rounds - server.first_round + 1
        if rounds > 0:
            CaffStrategy(server).start(PromptGrid(grid), ArrayRecord(server.state), num_rounds=rounds, timeout=timeout)

    return app


server_app = make_server_app()


def node_folder(context: Context) -> Path:
    """This node's folder for the run: ``CACHE/run-RUN-node-NODE``, where CACHE is the node config's
    ``cache-dir`` or ``$FLWR_HOME/caff-nodes`` (default ``~/.flwr``): nodes that share a machine and
    a Flower home keep their own (each has its own worker). Folders of runs untouched for a day are
    removed when a new run's folder is made."""
    cache = Path(str(context.node_config.get("cache-dir")
                     or Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser() / "caff-nodes"))
    folder = cache / f"run-{context.run_id}-node-{context.node_id}"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for old in cache.glob("run-*"):
            if old != folder and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    return folder


client_app = ClientApp()


@client_app.query()
def client_identity(message: Message, context: Context) -> Message:
    """Which plan device this node is: its node config's ``device`` or ``partition-id``."""
    said = {key: context.node_config[key] for key in ("device", "partition-id") if key in context.node_config}
    return Message(RecordDict({"node": ConfigRecord(said)}), reply_to=message)


def serialized_bytes(record: ArrayRecord) -> int:
    """Bytes of ``record`` as Flower sends it: every distinct object of its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(part.deflate()) for part in get_all_nested_objects(record).values())


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    """Run the task the server sent, on this node's data, with caff's local training; reply with
    what it trained and its record, whose upload and download bytes Flower's serialization measures.

    On a deployment node every message runs in a fresh ``flwr-clientapp`` process: this handler
    imports no torch and hands the task to the node's training worker (`trainer.nodeworker`,
    started on the first message), which keeps the node's shard and measured figures. The record
    holds the worker's process memory, measured (``process_memory: "measured"``; ``process_bytes``:
    its peak resident set; ``process_uss_bytes``: its private bytes at the reply) and this
    process's peak resident set (``clientapp_bytes``). In Flower's simulation (run config
    ``simulation``) the Ray worker processes serve many virtual nodes through the run: they train
    here, keep shards and figures in memory, and the record keeps the predicted process memory."""
    started, cpu_started = time.time(), time.process_time()
    task, received = dict(message.content["task"]), message.content["arrays"]
    times = {}
    if context.run_config.get("simulation", False):
        from trainer.engine import client_shard, train_client

        record, reply = train_client(task, unpacked_state(received), client_shard(task))
        arrays = packed_record(reply)
    else:
        from trainer.nodeworker import ask
        from trainer.probe import peak_rss_bytes

        answer, reply = ask(node_folder(context), task, received[PACKED].numpy(), os.getppid())
        record, times = answer["record"] | {"clientapp_bytes": peak_rss_bytes()}, answer["times"]
        arrays = record_of_packed(reply)
    record |= {"upload_bytes": serialized_bytes(arrays), "download_bytes": serialized_bytes(received)}
    if os.environ.get("CAFF_FLOWER_TIMINGS"):
        import psutil

        timing(who="client", round=task["round"], device=task["device"], sent=message.metadata.created_at,
               process=psutil.Process().create_time(), module=MODULE_STARTED, handler=started, **times,
               training=record["seconds"], replied=time.time(), cpu_module=MODULE_CPU, cpu_handler=cpu_started,
               cpu_replied=time.process_time())
    return Message(RecordDict({"arrays": arrays, "record": ConfigRecord(record)}), reply_to=message)


def run_simulation(run_file: str, n_nodes: int, app_dir: str | Path, log_dir: str | Path,
                   timeout: float | None = None) -> None:
    """Run a run file's rounds on ``n_nodes`` virtual nodes of Flower's simulation engine (Ray),
    here: a ``flower-superlink --simulation`` of its own on a free port of 127.0.0.1 (ended with
    the run), and ``flwr run`` with the run config ``simulation=true``. Each virtual node has
    ``partition-id`` i, so it acts for device i of the plan; one CPU each. Logs in ``log_dir``."""
    with localhost_federation(0, log_dir, secure=False, simulation=True) as federation:
        flwr_run(run_file, federation.address, app_dir, log_file=Path(log_dir) / "flwr-run.log", timeout=timeout,
                 federation_config=f"num-supernodes={n_nodes} client-resources-num-cpus=1",
                 run_config={"simulation": True})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def flwr_cli(address: str, root_certificates: str | Path | None):
    """The environment of a ``flwr`` command whose default connection is the SuperLink at ``address``:
    TLS trusting ``root_certificates`` (a CA certificate), or insecure when it is None. Its Flower
    home is private and removed when the block exits."""
    import tempfile

    tls = f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"
    with tempfile.TemporaryDirectory() as home:
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "caff"\n\n[superlink.caff]\naddress = "{address}"\n{tls}\n')
        yield {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _flwr(args: list[str], env: dict, log_file, timeout: float | None = None) -> None:
    """Run the ``flwr`` CLI; ValueError naming its exit code (and log) if it fails."""
    with open(log_file or os.devnull, "ab") as output:
        finished = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], env=env, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if finished.returncode != 0:
        raise ValueError(f"flwr {args[0]} exited with {finished.returncode}"
                         + (f" (see {log_file})" if log_file else ""))


def register_node(public_key: str | Path, address: str, root_certificates: str | Path,
                  log_file: str | Path | None = None) -> None:
    """Register a SuperNode's public key (OpenSSH) with the SuperLink at ``address`` (``flwr supernode register``)."""
    with flwr_cli(address, root_certificates) as env:
        _flwr(["supernode", "register", str(Path(public_key).resolve()), "caff"], env, log_file, timeout=60)


def _wait_for_port(address: str, process: subprocess.Popen, seconds: float = 60.0) -> None:
    """Wait until something accepts connections at ``address`` (HOST:PORT), or ``process`` ends."""
    import socket

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
            return
        time.sleep(0.1)
    raise ValueError(f"the SuperLink at {address} did not start")


@dataclass
class Federation:
    """A running localhost federation: the SuperLink's address, its processes (SuperLink first,
    then the SuperNodes) and the CA certificate to trust (None: insecure)."""

    address: str
    processes: list
    root_certificates: Path | None


@contextlib.contextmanager
def localhost_federation(n_nodes: int, log_dir: str | Path, node_config=lambda i: f"partition-id={i}",
                         secure: bool = True, unregistered: int = 0, simulation: bool = False):
    """A SuperLink and ``n_nodes`` SuperNodes on 127.0.0.1, on free ports; yields a `Federation`.

    Secure (the default): TLS with a fresh CA and a certificate for 127.0.0.1, and SuperNode
    authentication: each node has its own key, registered with ``flwr supernode register``
    before it starts. ``unregistered`` more nodes start with keys nobody registered (the
    SuperLink must refuse them). ``secure=False``: ``--insecure`` everywhere. Every process it
    starts is ended by its pid when the block exits, also on failure; their output goes to
    ``log_dir``. ``node_config(i)`` is node i's ``--node-config``. ``simulation``: the SuperLink
    runs Flower's simulation engine (its nodes are virtual: start it with no nodes, insecure).

    The SuperLink keeps its state in memory (Flower's default): with a SQLite file here, pushes
    failed with "database is locked" under load and a node's reply was lost. The processes share
    this machine's cores: each gets one torch (OpenMP) thread, telemetry and Flower's update check
    (no network here) are off, and a SuperNode's SuperExec polls for messages every 0.5 s (Flower's default: 1 s; at
    0.1 s four idle nodes took a third of a core here)."""
    from trainer.certs import make_certificates, make_node_key

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    link = f"127.0.0.1:{free_port()}"  # the SuperLink's HTTP API: Fleet, Control and ServerAppIo
    link_command = [str(bin_dir / "flower-superlink"), "--host", "127.0.0.1", "--port", link.split(":")[1],
                    "--disable-runtime-dependency-installation",
                    *(["--simulation"] if simulation else [])]
    node_security = [["--insecure"]] * (n_nodes + unregistered)
    ca = None
    if secure:
        made = make_certificates(log_dir / "certs", ["127.0.0.1"])
        ca = made["ca"]
        link_command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(made["server"]),
                         "--ssl-keyfile", str(made["server_key"]), "--enable-supernode-auth"]
        keys = [make_node_key(log_dir / "certs", f"node-{i}") for i in range(n_nodes + unregistered)]
        node_security = [["--root-certificates", str(ca), "--auth-supernode-private-key", str(private)]
                         for private, _ in keys]
    else:
        link_command.append("--insecure")
    processes = []

    def start(command: list[str]) -> None:
        with open(log_dir / f"process-{len(processes)}.log", "wb") as output:
            processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                              env={**os.environ, "FLWR_HOME": str(log_dir / "flwr-home"),
                                                   "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
                                                   "FLWR_DISABLE_UPDATE_CHECK": "1",
                                                   "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"},
                                              start_new_session=True))
    try:
        start(link_command)
        _wait_for_port(link, processes[0])
        if secure:
            for _, public in keys[:n_nodes]:
                register_node(public, link, ca, log_dir / "register.log")
        for i in range(n_nodes + unregistered):
            start([str(bin_dir / "flower-supernode"), *node_security[i], "--superlink", link, "--host", "127.0.0.1",
                   "--port", str(free_port()), "--node-config", node_config(i)])
        yield Federation(link, processes, ca)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the process and the app processes it started
            process.wait()


def flwr_run(run_file: str, control_address: str, app_dir: str | Path, log_file: str | Path | None = None,
             timeout: float | None = None, root_certificates: str | Path | None = None,
             federation_config: str | None = None, run_config: dict | None = None) -> None:
    """Submit a run file to a SuperLink with ``flwr run`` and wait until the run finishes.

    The connection uses TLS and trusts ``root_certificates`` (a CA certificate), or is insecure
    when that is None; paths in the run file are read on the SuperLink's machine. The run's logs
    go to ``log_file`` (``--stream``); since that stream can end before the run does when a round
    is silent for minutes, the run's status is then polled (``flwr ls``) until it is finished.
    ``federation_config``: ``flwr run --federation-config`` (a simulation's nodes and resources);
    ``run_config``: more run config (JSON values) beside ``run-file``."""
    import re

    deadline = None if timeout is None else time.monotonic() + timeout
    log_file = log_file or os.devnull
    with flwr_cli(control_address, root_certificates) as env:
        settings = " ".join(f"{key}={json.dumps(value)}" for key, value in {"run-file": run_file,
                                                                            **(run_config or {})}.items())
        _flwr(["run", str(app_dir), "caff", "--stream", "--run-config", settings,
               *(["--federation-config", federation_config] if federation_config else [])], env, log_file, timeout)
        started = re.findall(r"Successfully started run (\d+)", Path(log_file).read_text(errors="replace")) \
            if log_file != os.devnull else []
        while started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a busy machine: ask again
                listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "caff", "--run-id",
                                         started[-1], "--format", "json"], env=env, capture_output=True, text=True,
                                        timeout=120)
                runs = json.loads(listed.stdout or "{}").get("runs", [])
                if not runs or runs[0]["status"].startswith("finished"):
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise ValueError(f"the Flower run {started[-1]} did not finish within {timeout:.0f} s")
            time.sleep(1.0)
