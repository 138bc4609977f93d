"""okdpipe.datasets: dataset specs, loaders for the supported datasets, and the training/evaluation loader.

Importing this package registers every loader in DATASETS.
"""

from okdpipe.datasets import cifar, fashion_mnist, folders, synthetic  # noqa: F401 - registers the loaders
from okdpipe.datasets.load import load_dataset
from okdpipe.datasets.loader import Batch, Loader, make_loader
from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import DataBundle, FileSplit, TensorSplit

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "Batch",
    "DataBundle",
    "DatasetSpec",
    "FileSplit",
    "Loader",
    "TensorSplit",
    "load_dataset",
    "make_loader",
]
