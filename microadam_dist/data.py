"""A real text corpus with no download: the documentation topics that ship with CPython.

``pydoc_data.topics`` holds the text of the language reference behind ``help()`` (about 0.8 MB
of English prose and code). Bytes are the tokens (vocabulary 256), so no tokenizer is needed.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def load_corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_corpus(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_corpus()
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def get_batch(data: torch.Tensor, batch_size: int, context: int, gen: torch.Generator):
    """Random windows of ``context`` tokens and their next-token targets."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + 1 + context] for s in starts.tolist()])
    return x, y
