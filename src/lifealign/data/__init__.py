"""Preference data: records, loaders (files, hub, synthetic), tokenisation and batching."""

from lifealign.data.collate import collate_pairs
from lifealign.data.hub import HUB_DATASETS, HubSpec, load_hub_task
from lifealign.data.inspect import format_inspection, inspect_file
from lifealign.data.loaders import DataError, LoadResult, load_records
from lifealign.data.records import PreferencePair, Task, TaskStream
from lifealign.data.sources import load_stream, load_task
from lifealign.data.tokenize import TokenizedSet, tokenize_pairs, tokenize_prompts

__all__ = [
    "HUB_DATASETS",
    "DataError",
    "HubSpec",
    "LoadResult",
    "PreferencePair",
    "Task",
    "TaskStream",
    "TokenizedSet",
    "collate_pairs",
    "format_inspection",
    "inspect_file",
    "load_hub_task",
    "load_records",
    "load_stream",
    "load_task",
    "tokenize_pairs",
    "tokenize_prompts",
]
