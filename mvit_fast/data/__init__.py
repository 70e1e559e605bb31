"""Video data for MViTv2: lists, sampling protocols, transforms, DALI (GPU) and PyAV (CPU)
loaders with one output contract, a synthetic motion dataset and a pre-flight scan.

PyAV (`video` extra) and DALI (`dali` extra) are imported only when a backend runs.
See `build_loader` for the batch contract.
"""

from .lists import ListFormatError, VideoRecord, read_label_map, read_list
from .loader import Batch, build_loader, check_installed, choose_backend, shard_indices
from .mixup import MixupCutmix
from .report import DataError, DataReport
from .sampling import ClipSampling, k400_test_indices, k400_train_indices, ssv2_indices
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SyntheticDataset, make_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, K400_MEAN, K400_STD, TestAugment, TrainAugment

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "K400_MEAN",
    "K400_STD",
    "SYNTHETIC_CLASSES",
    "Batch",
    "ClipSampling",
    "DataError",
    "DataReport",
    "ListFormatError",
    "MixupCutmix",
    "SyntheticDataset",
    "TestAugment",
    "TrainAugment",
    "VideoRecord",
    "build_loader",
    "check_installed",
    "choose_backend",
    "k400_test_indices",
    "k400_train_indices",
    "make_synthetic",
    "read_label_map",
    "read_list",
    "shard_indices",
    "ssv2_indices",
]
