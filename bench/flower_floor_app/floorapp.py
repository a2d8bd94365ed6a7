"""Flower's own floor for `bench/flower_rounds.py`: a trivial numpy ClientApp that sends back the
arrays it received, on the same federation and ServerApp grid (`trainer.flower.PromptGrid`) as caff.

Run config: ``nodes`` (how many to wait for and train each round), ``rounds``, ``arrays`` (a
safetensors file: caff's global model, so messages carry what caff's carry), ``packed`` (true:
those bytes as one array instead: Flower sends every array as an object of its own) and
``run-file`` (where the ServerApp appends one JSON line per round: its start and end, seconds
since the epoch)."""

import json
import time

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()


@client_app.train()
def echo(message: Message, context: Context) -> Message:
    """Reply with the received arrays and one example."""
    return Message(RecordDict({"arrays": message.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=message)


class TimedFedAvg(FedAvg):
    """FedAvg that appends each round's start and end to a file."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out, self.started = out, 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self.started = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        aggregated = super().aggregate_train(server_round, replies)
        with open(self.out, "a") as out:
            out.write(json.dumps({"round": server_round, "started": self.started, "finished": time.time()}) + "\n")
        return aggregated


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from trainer.flower import PromptGrid  # the ServerApp only: the ClientApp stays trivial

    nodes = int(context.run_config["nodes"])
    strategy = TimedFedAvg(str(context.run_config["run-file"]), fraction_train=1.0, fraction_evaluate=0.0,
                           min_available_nodes=nodes, min_train_nodes=nodes)
    from safetensors.numpy import load_file

    arrays = load_file(str(context.run_config["arrays"]))
    if context.run_config["packed"]:  # as caff packs its messages
        from profiles.packing import PACKED, pack

        arrays = {PACKED: pack(arrays)}
    strategy.start(grid=PromptGrid(grid), initial_arrays=ArrayRecord({k: Array.from_numpy_ndarray(v)
                                                                      for k, v in arrays.items()}),
                   num_rounds=int(context.run_config["rounds"]))
