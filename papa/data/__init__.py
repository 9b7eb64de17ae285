"""Data: datasets by name, the validation split, per-member augmentation and population batch streams."""

from papa.data.augment import Policy, draw_policies
from papa.data.datasets import LOADERS, ArrayDataset, FolderDataset, Splits, load_dataset
from papa.data.splits import load_split, make_split, save_split
from papa.data.stream import FolderStream, MemberStream, PatchStream, eval_batches, make_stream
from papa.data.vaihingen import TileDataset

__all__ = ["LOADERS", "ArrayDataset", "FolderDataset", "FolderStream", "MemberStream", "PatchStream", "Policy",
           "Splits", "TileDataset", "draw_policies", "eval_batches", "load_dataset", "load_split", "make_split",
           "make_stream", "save_split"]
