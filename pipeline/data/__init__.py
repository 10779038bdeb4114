"""Training data: shard sets written by data_prep, read as (images, labels) batches by `build_loader`."""

from pipeline.data.faults import DataFaultError
from pipeline.data.loader import BACKENDS, ShardLoader, build_loader, pick_backend, read_manifest
from pipeline.data.schedule import EpochPlan

__all__ = ["BACKENDS", "DataFaultError", "EpochPlan", "ShardLoader", "build_loader", "pick_backend", "read_manifest"]
