"""caff on Flower: simulation and a real localhost deployment give the in-process engine's model."""

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="the Flower tests need flwr: pip install -e '.[flower]'")

from planner.planfile import read_plan_file  # noqa: E402
from trainer.engine import Server, TrainConfig, run, train_client  # noqa: E402
from trainer.server import lora_deltas  # noqa: E402

TIMING = {"seconds", "client_seconds", "total_seconds", "eval_seconds"}
PROCESS = {"process_bytes", "process_uss_bytes", "process_memory", "clientapp_bytes"}  # measured on Flower nodes
CONFIG = TrainConfig(task="shakespeare", method="caff", rounds=2, clients_per_round=3, pretrained=False,
                     eval_samples=16, seed=3)


def _run_file(tmp_path, plan_path, out, timeout=300):
    from trainer.flower import write_run_file

    return write_run_file(tmp_path / f"{out.name}.json", CONFIG, plan_path, out, timeout=timeout)


def _strip_timing(rows):
    return [{k: v for k, v in m.items() if k not in TIMING} | {"clients": [
        {k: v for k, v in c.items() if k not in TIMING | PROCESS} for c in m["clients"]]} for m in rows]


def _process_memory(rows):
    """How each trained client's process memory was obtained ("measured" or "predicted")."""
    return {c["process_memory"] for m in rows for c in m["clients"] if c["status"] == "trained"}


def _raw(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _metrics(out):
    return _strip_timing(_raw(out))


def _same_model(a, b):
    first, second = load_file(str(a / "global-2.safetensors")), load_file(str(b / "global-2.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-6), key


@pytest.mark.parametrize("method", ["caff", *(pytest.param(m, marks=pytest.mark.slow)
                                             for m in ("lora", "fedra", "full", "head"))])
def test_flower_simulation_gives_the_in_process_engines_model(tmp_path, three_device_plan, monkeypatch, caff, method):
    """Also the wire: every client's measured upload (Flower's serialization) fits its planned upload."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's workers: the same float sums as this process
    args = ["train", "--task", "shakespeare", "--method", method, "--plan", str(three_device_plan), "--rounds", "2",
            "--clients-per-round", "3", "--seed", "3", "--no-pretrained", "--eval-samples", "16"]
    assert caff(*args, "--out", str(tmp_path / "local")).returncode == 0
    simulated = caff(*args, "--engine", "flower-sim", "--out", str(tmp_path / "sim"))
    assert simulated.returncode == 0, simulated.stderr
    assert "round   2" in simulated.stdout
    _same_model(tmp_path / "local", tmp_path / "sim")
    assert _metrics(tmp_path / "sim") == _metrics(tmp_path / "local")
    assert _process_memory(_raw(tmp_path / "local")) == _process_memory(_raw(tmp_path / "sim")) == {"predicted"}
    trained = [c for m in _metrics(tmp_path / "sim") for c in m["clients"] if c["status"] == "trained"]
    assert trained and all(c["upload_bytes"] <= c["predicted_upload_bytes"] for c in trained)


def _strategy(tmp_path, plan_path, config=CONFIG):
    from trainer.flower import CaffStrategy

    server = Server(config, read_plan_file(plan_path), tmp_path / "run")
    strategy = CaffStrategy(server)
    strategy.node_of_device = {device.device: 100 + i for i, device in enumerate(server.plan.devices)}
    strategy.queried_nodes = set(strategy.node_of_device.values())  # asked already: no query goes out
    return strategy


class KnownNodes:
    """A grid whose nodes have all been asked which device they are."""

    def __init__(self, strategy):
        self.nodes = strategy.queried_nodes

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture
def flower_task_identity():
    """Messages can only be made inside a Flower run; pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _stop_workers(folder):
    """End the training workers (`trainer.nodeworker`) that served node folders under ``folder``."""
    import signal

    for pid_file in folder.glob("**/worker.pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _context(cache):
    """A node's context in run 1, its files under ``cache``."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=0, node_config={"cache-dir": str(cache)}, state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory):
    """One node's files for this module's tests: one training worker serves them, as on a node."""
    cache = tmp_path_factory.mktemp("node")
    yield cache
    _stop_workers(cache)


@pytest.fixture
def node_context(node_cache):
    return _context(node_cache)


def test_a_failed_node_loses_its_update_and_the_round_goes_on(tmp_path, three_device_plan, flower_task_identity,
                                                              node_context):
    from flwr.app import Error, Message

    from trainer.flower import client_train, unpacked_state

    strategy = _strategy(tmp_path, three_device_plan)
    before = dict(strategy.server.state)
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    assert len(messages) == 2, "d0 cannot train under caff; d1 and d2 do"
    for message in messages:  # each node gets its own plan and every global array, packed into one
        assert list(message.content["arrays"].keys()) == ["state"]
        assert unpacked_state(message.content["arrays"]).keys() == before.keys()
    survivor, lost = messages
    replies = [client_train(survivor, node_context), Message(Error(code=5, reason="node went away"), reply_to=lost)]
    strategy.aggregate_train(1, replies)

    clients = {c["device"]: c for c in strategy.server.metrics[-1]["clients"]}
    lost_device = dict(lost.content["task"])["device"]
    assert clients[lost_device]["status"] == "failed" and "node went away" in clients[lost_device]["reason"]
    # one contributor: every tensor it trained moves by its own change, every other keeps its value
    record, reply = train_client(dict(survivor.content["task"]), before)
    deltas = lora_deltas(reply, record.get("lora_scale"), before)
    after = strategy.server.state
    for key in before:
        expected = before[key] + deltas[key] if key in deltas else before[key]
        assert torch.allclose(after[key], expected, atol=1e-6), key
    assert deltas and set(deltas) != set(before)


@pytest.mark.parametrize("method", ["caff", "lora", "fedra", "full", "head"])
def test_replies_carry_what_was_trained_and_the_planned_upload_bounds_the_wire(
        tmp_path, three_device_plan, flower_task_identity, node_context, method):
    """A round through the strategy and the ClientApp (Flower's serialization, no transport): every
    reply's serialized arrays fit the planned upload, and the round equals the in-process engine's."""
    from trainer.flower import client_train, unpacked_state

    config = CONFIG.model_copy(update={"method": method, "rounds": 1})
    strategy = _strategy(tmp_path / "flower", three_device_plan, config)
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    replies = [client_train(message, node_context) for message in messages]
    for reply in replies:
        record, arrays = dict(reply.content["record"]), reply.content["arrays"]
        assert record["upload_bytes"] <= record["predicted_upload_bytes"], record
        assert record["upload_bytes"] > sum(len(a.data) for a in arrays.values()) and record["download_bytes"] > 0
        if "lora" in record["mode"]:  # factors as trained, not dense B A products
            assert any(".lora_A." in key for key in unpacked_state(arrays)) and record["lora_scale"] == 2.0
    strategy.aggregate_train(1, replies)
    in_process = run(config, read_plan_file(three_device_plan), tmp_path / "in-process")
    assert _strip_timing(strategy.server.metrics) == _strip_timing(in_process)
    assert in_process[0]["uploaded_bytes"] == sum(dict(r.content["record"])["upload_bytes"] for r in replies) > 0


def _same_replies(first, second, strip=TIMING | PROCESS):
    from trainer.flower import unpacked_state

    for one, two in zip(first, second, strict=True):
        assert {k: v for k, v in dict(one.content["record"]).items() if k not in strip} == \
            {k: v for k, v in dict(two.content["record"]).items() if k not in strip}
        one_arrays = unpacked_state(one.content["arrays"])
        two_arrays = unpacked_state(two.content["arrays"])
        assert one_arrays.keys() == two_arrays.keys()
        assert all(torch.equal(one_arrays[k], two_arrays[k]) for k in one_arrays)


def _worker_pid(folder):
    return int((folder / "worker.pid").read_text())


@pytest.fixture
def own_node(tmp_path):
    """A node of the test's own, its files in ``tmp_path / "node"``; its worker ends with the test."""
    yield _context(tmp_path / "node")
    _stop_workers(tmp_path / "node")


def test_a_nodes_worker_keeps_its_shard_and_figures_and_a_fresh_worker_reads_them_back(
        tmp_path, three_device_plan, flower_task_identity, own_node):
    """A deployment node's messages go to its training worker (`trainer.nodeworker`). The first
    writes the device's shard (the loader's storage layout) and its measured FLOPs and peak to the
    node's folder; the worker keeps them in memory, so the next message, served by the same worker,
    neither reads nor writes those files and replies the same. A fresh worker (the old one killed,
    its socket stale) reads them back. The record's process memory is the worker's peak resident set."""
    import signal

    import trainer.engine
    from trainer.flower import client_train
    from trainer.nodeworker import alive
    from trainer.probe import peak_rss_bytes
    from trainer.shardfile import load_shard

    strategy = _strategy(tmp_path, three_device_plan)
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    before = peak_rss_bytes()
    first = [client_train(message, own_node) for message in messages]
    after = peak_rss_bytes() + 2**20  # the kernel's resident-set counters are per-CPU, read with some slack
    folder = tmp_path / "node" / "run-1-node-0"
    worker = _worker_pid(folder)
    status = Path(f"/proc/{worker}/status").read_text().splitlines()
    worker_peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) * 1024
    for message, reply in zip(messages, first):
        task, record = dict(message.content["task"]), dict(reply.content["record"])
        assert record["process_memory"] == "measured" and 0 < record["process_bytes"] <= worker_peak
        assert 0 < record["process_uss_bytes"] <= record["process_bytes"]
        assert before <= record["clientapp_bytes"] <= after  # the ClientApp here is this test's process
        loader = trainer.engine.client_shard(task)
        saved = load_shard(folder / f"shakespeare-{task['n_devices']}-3-{task['index']}.shard")
        assert all(torch.equal(a, b) for a, b in zip(saved, loader))
        assert saved[0].untyped_storage().data_ptr() == saved[1].untyped_storage().data_ptr()  # windows of one storage
        assert saved[0].untyped_storage().nbytes() == loader[0].untyped_storage().nbytes()

    files = {path: path.read_bytes() for pattern in ("*.shard", "measured-*.json") for path in folder.glob(pattern)}
    assert len(files) == 2 * len(messages)
    for path in files:
        path.unlink()
    again = [client_train(message, own_node) for message in messages]
    assert _worker_pid(folder) == worker and not any(path.exists() for path in files)  # kept in memory
    _same_replies(first, again)
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    task = dict(messages[0].content["task"]) | {"memory_budget_bytes": 1}  # refused before its step
    with pytest.raises(RuntimeError, match="^the node worker failed: [^\n]*budget[^\n]*$"):
        client_train(Message(RecordDict({"arrays": messages[0].content["arrays"], "task": ConfigRecord(task)}),
                             message_type=MessageType.TRAIN, dst_node_id=0), own_node)
    assert _worker_pid(folder) == worker and alive(worker)  # and it serves on

    os.kill(worker, signal.SIGKILL)  # a fresh worker finds a stale socket and the files, its FLOPs marked + 1
    os.waitpid(worker, 0)  # the shim, this process, started it
    for path, raw in files.items():
        saved = json.loads(raw) if path.suffix == ".json" else None
        path.write_bytes(raw if saved is None else json.dumps(saved | {"value": [saved["value"][0] + 1,
                                                                                   saved["value"][1]]}).encode())
    fresh = [client_train(message, own_node) for message in messages]
    assert _worker_pid(folder) != worker and not alive(worker)
    _same_replies(first, fresh, TIMING | PROCESS | {"flops"})
    flops = [[dict(r.content["record"])["flops"] for r in replies] for replies in (first, fresh)]
    assert flops[1] == [f + 1 for f in flops[0]]


def test_a_worker_ends_when_the_process_it_watches_is_gone(tmp_path):
    """A node's worker watches the process that started its ClientApps (a SuperNode's SuperExec):
    once that is gone, the worker ends too, its socket removed; it never lingers as an orphan."""
    import subprocess
    import sys

    from trainer.nodeworker import alive, connect, socket_path

    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        connect(tmp_path, watched.pid).close()
        deadline = time.monotonic() + 30
        while not (tmp_path / "worker.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = _worker_pid(tmp_path)
        assert alive(worker)
    finally:
        watched.kill()
        watched.wait()
    assert _workers_gone([worker], seconds=120) and not socket_path(tmp_path).exists()


SHIM = """
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from trainer.flower import client_train

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
job = json.load(sys.stdin)
arrays = ArrayRecord({"state": Array.from_numpy_ndarray(np.fromfile(job["received"], dtype=np.uint8))})
message = Message(RecordDict({"arrays": arrays, "task": ConfigRecord(job["task"])}), message_type=MessageType.TRAIN,
                  dst_node_id=0)
reply = client_train(message, Context(run_id=1, node_id=0, node_config={"cache-dir": job["cache"]},
                                      state=RecordDict(), run_config={}))
reply.content["arrays"]["state"].numpy().tofile(job["reply"])
print(json.dumps({"record": dict(reply.content["record"]), "torch": "torch" in sys.modules}))
"""


def test_the_clientapp_imports_no_torch_and_a_nodes_messages_share_one_worker(
        tmp_path, three_device_plan, flower_task_identity):
    """Each message in a ClientApp process of its own, as Flower runs them: that process never imports
    torch, both messages are trained by one worker process, and each reply is the in-process engine's."""
    import subprocess
    import sys

    from costmodel.wire import unpack_state
    from trainer.flower import unpacked_state
    from trainer.nodeworker import alive

    strategy = _strategy(tmp_path, three_device_plan)
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    folder, workers = tmp_path / "node" / "run-1-node-0", []
    try:
        for i, message in enumerate(messages):
            task = dict(message.content["task"])
            received = unpacked_state(message.content["arrays"])
            message.content["arrays"]["state"].numpy().tofile(tmp_path / f"received-{i}")
            job = {"task": task, "received": str(tmp_path / f"received-{i}"),
                   "cache": str(tmp_path / "node"), "reply": str(tmp_path / f"reply-{i}")}
            shim = subprocess.run([sys.executable, "-c", SHIM], input=json.dumps(job), capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            assert shim.returncode == 0, shim.stderr[-2000:]
            said = json.loads(shim.stdout.splitlines()[-1])
            assert said["torch"] is False
            workers.append(_worker_pid(folder))
            assert alive(workers[-1])  # the ClientApp process ended, its worker did not
            record, reply = train_client(task, received)
            strip = TIMING | PROCESS
            assert {k: v for k, v in said["record"].items() if k not in strip} == \
                {k: v for k, v in record.items() if k not in strip}
            replied = unpack_state((tmp_path / f"reply-{i}").read_bytes())
            assert replied.keys() == reply.keys() and all(torch.equal(replied[k], reply[k]) for k in reply)
        assert len(messages) == 2 and workers[0] == workers[1]
    finally:
        _stop_workers(tmp_path / "node")


def test_a_round_without_replies_records_every_device_failed(tmp_path, three_device_plan, flower_task_identity):
    strategy = _strategy(tmp_path, three_device_plan)
    before = dict(strategy.server.state)
    strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    strategy.aggregate_train(1, [])
    statuses = sorted(c["status"] for c in strategy.server.metrics[-1]["clients"])
    assert statuses == ["failed", "failed", "sat out"]
    assert all(torch.equal(before[k], strategy.server.state[k]) for k in before)


def test_a_reply_for_another_nodes_device_is_refused(tmp_path, three_device_plan, flower_task_identity,
                                                     node_context):
    from flwr.app import Message

    from trainer.flower import client_train

    strategy = _strategy(tmp_path, three_device_plan)
    before = dict(strategy.server.state)
    honest, impostor = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    reply = client_train(honest, node_context)
    strategy.aggregate_train(1, [Message(reply.content, reply_to=impostor)])  # the other node sends it
    statuses = {c["device"]: (c["status"], c.get("reason", "")) for c in strategy.server.metrics[-1]["clients"]}
    assert [status for status, _ in statuses.values()].count("failed") == 2
    assert "was not asked" in statuses[dict(impostor.content["task"])["device"]][1]
    assert all(torch.equal(before[k], strategy.server.state[k]) for k in before)


def test_a_reply_whose_arrays_do_not_unpack_is_a_failed_device(tmp_path, three_device_plan, flower_task_identity,
                                                               node_context):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from trainer.flower import client_train

    strategy = _strategy(tmp_path, three_device_plan)
    first, second = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    good, bad = client_train(first, node_context), client_train(second, node_context)
    garbage = ArrayRecord({"state": Array.from_numpy_ndarray(np.frombuffer(b"not safetensors", dtype=np.uint8))})
    strategy.aggregate_train(1, [good, Message(RecordDict({"arrays": garbage, "record": bad.content["record"]}),
                                               reply_to=second)])
    statuses = {c["device"]: (c["status"], c.get("reason", "")) for c in strategy.server.metrics[-1]["clients"]}
    assert statuses[dict(first.content["task"])["device"]][0] == "trained"
    assert statuses[dict(second.content["task"])["device"]] == ("failed", "a reply whose arrays do not unpack "
                                                                "(SafetensorError)")


def test_a_fedra_node_receives_only_the_blocks_it_holds(tmp_path, three_device_plan, flower_task_identity,
                                                        node_context):
    from trainer.flower import client_train, unpacked_state

    strategy = _strategy(tmp_path, three_device_plan, CONFIG.model_copy(update={"method": "fedra"}))
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    assert messages
    for message in messages:
        held = set(dict(message.content["task"])["held_blocks"])
        names = unpacked_state(message.content["arrays"]).keys()
        assert {int(k.split(".")[1]) for k in names if k.startswith("blocks.")} == held
        assert {"embed.tok.weight", "head.out.weight"} <= set(names)
        reply = dict(client_train(message, node_context).content["record"])
        assert reply["status"] == "trained" and reply["peak_bytes"] <= reply["memory_budget_bytes"]


def test_the_server_grid_returns_every_reply_and_gives_up_at_its_timeout(monkeypatch):
    """`PromptGrid.send_and_receive`: replies that come over several looks are all returned; a
    reply that never comes ends the wait at the timeout with what did come."""
    from types import SimpleNamespace

    from trainer.flower import PromptGrid

    class Grid:  # replies to message i arrive on the grid's look i + 1; message 9 never gets one
        looks = 0

        def push_messages(self, messages):
            return list(messages)

        def pull_messages(self, waiting):
            Grid.looks += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                    for i in sorted(waiting) if i < Grid.looks and i != 9]

        def get_node_ids(self):
            return [1, 2]

    grid = PromptGrid(Grid(), interval=0.01)
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's
    assert sorted(r.metadata.reply_to_message_id for r in grid.send_and_receive([0, 1, 2])) == [0, 1, 2]
    got = grid.send_and_receive([3, 9], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in got] == [3]


def _pids_gone(processes):
    return all(process.poll() is not None for process in processes)


def _workers_gone(pids, seconds=10.0):
    """Whether the processes ``pids`` (not this process's children) are all gone within ``seconds``."""
    from trainer.nodeworker import alive

    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def test_localhost_deployment_gives_the_in_process_engines_model(tmp_path, three_device_plan, monkeypatch, caff):
    """flower-superlink and three flower-supernodes on free ports, with TLS and SuperNode
    authentication, two rounds with ``flwr run``; a fourth node, whose key nobody registered, is refused."""
    from trainer.flower import localhost_federation

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["train", "--task", "shakespeare", "--method", "caff", "--plan", str(three_device_plan), "--rounds", "2",
            "--clients-per-round", "3", "--seed", "3", "--no-pretrained", "--eval-samples", "16"]
    assert caff(*args, "--out", str(tmp_path / "local")).returncode == 0
    # node 0 names its device; nodes 1 and 2 give a partition id (device d1 and device d0); node 3 is unregistered
    configs = ["device='d2'", "partition-id=1", "partition-id=0", "device='d1'"]
    with localhost_federation(3, tmp_path / "logs", node_config=lambda i: configs[i], unregistered=1) as federation:
        deployed = caff(*args, "--engine", "flower", "--superlink", federation.address, "--root-certificates",
                        str(federation.root_certificates), "--out", str(tmp_path / "flower"))
        intruder = (tmp_path / "logs" / "process-4.log").read_text()
    assert deployed.returncode == 0, deployed.stderr
    assert _pids_gone(federation.processes)
    workers = [int(path.read_text()) for path in (tmp_path / "logs" / "flwr-home" / "caff-nodes").glob("*/worker.pid")]
    assert len(workers) == 2 and _workers_gone(workers)  # one per training node (d0 sits out), ended with its node
    assert "Failed to activate SuperNode" in intruder, intruder[-2000:]
    _same_model(tmp_path / "local", tmp_path / "flower")
    assert _metrics(tmp_path / "flower") == _metrics(tmp_path / "local")
    assert _process_memory(_raw(tmp_path / "flower")) == {"measured"}


def test_a_node_killed_mid_round_does_not_stall_the_run(tmp_path, three_device_plan, monkeypatch):
    """About 80 s: the SuperLink answers for the dead node once its heartbeats stop."""
    import signal

    from trainer.flower import flwr_run, localhost_federation

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "flower"
    with localhost_federation(3, tmp_path / "logs") as federation:
        import threading

        processes = federation.processes

        def kill_d2_when_it_trains():  # node 2 acts for device d2, the one that trains all blocks
            log = tmp_path / "logs" / "process-3.log"
            deadline = time.time() + 300
            while time.time() < deadline and b"train message" not in (log.read_bytes() if log.exists() else b""):
                time.sleep(0.2)
            os.killpg(processes[3].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_d2_when_it_trains, daemon=True)
        killer.start()
        started = time.time()
        flwr_run(_run_file(tmp_path, three_device_plan, out, timeout=240), federation.address,
                 os.path.dirname(os.path.dirname(__file__)), log_file=tmp_path / "flwr-run.log", timeout=600,
                 root_certificates=federation.root_certificates)
        killer.join()
    assert _pids_gone(processes)
    folders = tmp_path / "logs" / "flwr-home" / "caff-nodes"
    assert _workers_gone([int(path.read_text()) for path in folders.glob("*/worker.pid")])
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2, f"the run stopped after {len(rounds)} rounds ({time.time() - started:.0f} s)"
    d2 = [next(c for c in m["clients"] if c["device"] == "d2") for m in rounds]
    assert [c["status"] for c in d2] == ["failed", "failed"], d2
    d1 = [next(c for c in m["clients"] if c["device"] == "d1") for m in rounds]
    assert [c["status"] for c in d1] == ["trained", "trained"]


def test_no_superlink_is_a_one_line_error(tmp_path, three_device_plan, caff):
    from trainer.flower import free_port

    args = ["train", "--task", "shakespeare", "--plan", str(three_device_plan), "--rounds", "1", "--no-pretrained",
            "--engine", "flower", "--superlink", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "run")]
    result = caff(*args, "--insecure")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "flwr run exited" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "state.json").exists()
    unsaid = caff(*args)  # neither TLS nor an explicit --insecure
    assert unsaid.returncode == 2 and unsaid.stderr.count("\n") == 1 and "--insecure" in unsaid.stderr


def test_caff_certs_makes_a_chain_for_the_hosts_and_openssh_node_keys(tmp_path, caff):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert caff("certs", str(tmp_path), "--host", "127.0.0.1", "--host", "link.example", "--nodes", "2").returncode == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    for i in range(2):
        private = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), password=None)
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert isinstance(private.curve, ec.SECP384R1) and private.public_key() == public
        assert (tmp_path / f"node-{i}").stat().st_mode & 0o077 == 0
    again = caff("certs", str(tmp_path), "--host", "127.0.0.1")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already holds" in again.stderr
