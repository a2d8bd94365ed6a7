"""Analytic and measured costs of one training step of a tiny Transformer."""

from costmodel.build import apply_mode, build_model, make_batch, make_optimizer
from costmodel.estimate import CostReport, estimate, layer_cost, layer_graph, layer_names
from costmodel.measure import Measured, measure, measure_step
from costmodel.mode import TrainMode
from costmodel.spec import ZOO, ModelSpec, load_spec

__all__ = ["ZOO", "CostReport", "Measured", "ModelSpec", "TrainMode", "apply_mode", "build_model", "estimate",
           "layer_cost", "layer_graph", "layer_names", "load_spec", "make_batch", "make_optimizer", "measure",
           "measure_step"]
