"""Expert memory queue: bounded FIFO rings of detached vectors, each with a label.

The label contrast keeps one ring of past records' routing representations (with their labels),
its negatives and positives across steps. Vectors, labels, write pointers and fill counts are
registered buffers, so DeepSpeed checkpoints save and restore them with the model. The queue is
only written by the training step after the optimizer step, with vectors already gathered from
every data-parallel rank, so all ranks hold identical queues; ``forward`` never writes it, so
activation recomputation and gradient accumulation cannot enqueue twice.
Memory is ``groups x size x dim`` floats, fixed at construction.
"""

from __future__ import annotations

import torch
from torch import nn


class MemoryQueue(nn.Module):
    def __init__(self, groups: int, size: int, dim: int):
        super().__init__()
        self.groups, self.size, self.dim = groups, size, dim
        self.register_buffer("vectors", torch.zeros(groups, size, dim))
        self.register_buffer("labels", torch.full((groups, size), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(groups, dtype=torch.long))
        self.register_buffer("count", torch.zeros(groups, dtype=torch.long))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def enqueue(self, group: int, vecs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append ``vecs`` (n, dim) to ring ``group`` in order, overwriting the oldest entries."""
        if vecs.numel() == 0:
            return
        if vecs.shape[-1] != self.dim:
            raise ValueError(f"queue dim is {self.dim}, got vectors of dim {vecs.shape[-1]}")
        vecs = vecs.detach().float()
        labels = labels if labels is not None else torch.full((len(vecs),), -1)
        if len(vecs) > self.size:  # only the newest `size` survive anyway
            vecs, labels = vecs[-self.size:], labels[-self.size:]
        n = len(vecs)
        start = int(self.ptr[group])
        slots = (torch.arange(n) + start) % self.size
        self.vectors[group, slots.to(self.vectors.device)] = vecs.to(self.vectors.device)
        self.labels[group, slots.to(self.labels.device)] = labels.to(self.labels.device)
        self.ptr[group] = (start + n) % self.size
        self.count[group] = min(int(self.count[group]) + n, self.size)

    def get(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid entries of ring ``group``, oldest first: ``(vectors (m, dim), labels (m,))``."""
        n = int(self.count[group])
        if n < self.size:
            idx = torch.arange(n)
        else:
            idx = (torch.arange(self.size) + int(self.ptr[group])) % self.size
        idx = idx.to(self.vectors.device)
        return self.vectors[group, idx], self.labels[group, idx]

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid entry of every ring: ``(vectors (m, dim), group ids (m,))``."""
        vecs, groups = [], []
        for g in range(self.groups):
            v, _ = self.get(g)
            vecs.append(v)
            groups.append(torch.full((len(v),), g, dtype=torch.long, device=v.device))
        return torch.cat(vecs), torch.cat(groups)
