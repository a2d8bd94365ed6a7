"""caff: plan, validate and run federated fine-tuning of tiny Transformers on constrained devices.

The command line is ``caff`` (caff/cli.py); the library's main entry points are re-exported here.
"""

from costmodel import ModelSpec, TrainMode, estimate, load_spec, measure
from planner import PlanSettings, plan, read_plan_file, write_plan_file
from profiles import DeviceSpec, FleetSpec, load_device, load_fleet
from trainer.engine import TrainConfig, run
from trainer.local import local_train
from trainer.server import aggregate

__all__ = ["DeviceSpec", "FleetSpec", "ModelSpec", "PlanSettings", "TrainConfig", "TrainMode", "aggregate",
           "estimate", "load_device", "load_fleet", "load_spec", "local_train", "measure", "plan", "read_plan_file",
           "run", "write_plan_file"]
