"""Data: any map-style data set partitioned over a cohort's members; presets; sources, loaders, partitions."""

from lightning_colearn.data.datamodule import CohortDataModule
from lightning_colearn.data.datasets import DATASETS, DatasetNotFoundError, ImageDataset, load_dataset, preset
from lightning_colearn.data.loaders import Batches, EpochShuffleSampler
from lightning_colearn.data.partition import LABEL_SCHEMES, PARTITIONS, partition, split_member
from lightning_colearn.data.sources import SampleSource, Source, TensorSource, as_source
from lightning_colearn.data.table import PartitionTable

__all__ = [
    "DATASETS",
    "LABEL_SCHEMES",
    "PARTITIONS",
    "Batches",
    "CohortDataModule",
    "DatasetNotFoundError",
    "EpochShuffleSampler",
    "ImageDataset",
    "PartitionTable",
    "SampleSource",
    "Source",
    "TensorSource",
    "as_source",
    "load_dataset",
    "partition",
    "preset",
    "split_member",
]
