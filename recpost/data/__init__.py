"""Data layer: sources -> canonical interactions -> cached sequences -> splits -> batches."""

from recpost.data.datamodule import RecDataModule
from recpost.data.simulator import Simulator
from recpost.data.sources import Amazon, MovieLens, Source
from recpost.data.table import Table

__all__ = ["Amazon", "MovieLens", "RecDataModule", "Simulator", "Source", "Table"]
