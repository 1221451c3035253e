"""The lm-eval task's dataset: the course's local item file, never the hub."""
from __future__ import annotations

import dataclasses

from pretrain_lib.benchmark.items import ITEM_FILE, read_items


def load_items(items_file: str | None = None, **_metadata):
    """A ``DatasetDict`` with one ``test`` split: the items of ``items_file`` (default: the shipped file, items.ITEM_FILE)."""
    import datasets

    items = read_items(items_file or ITEM_FILE)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([dataclasses.asdict(it) for it in items])})
