"""Data: the embedded MNIST sample, full data sets, partitions over members, the datamodule."""

from lightning_colearn.data.datamodule import CohortDataModule, EpochShuffleSampler
from lightning_colearn.data.datasets import DATASETS, DatasetNotFoundError, ImageDataset, load_dataset
from lightning_colearn.data.partition import PARTITIONS, partition, split_member

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "CohortDataModule",
    "DatasetNotFoundError",
    "EpochShuffleSampler",
    "ImageDataset",
    "load_dataset",
    "partition",
    "split_member",
]
