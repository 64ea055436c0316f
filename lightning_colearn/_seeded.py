"""A mixin for objects that keep a seeded ``torch.Generator`` as ``self.generator`` and must pickle.

``ddp_spawn`` pickles the Trainer's callbacks into the new processes, and this
torch cannot send a ``torch.Generator`` there (the child dies unpickling its
shared state). The mixin pickles the generator as its state bytes and rebuilds
it, so the child continues the exact random stream.

Examples:
    >>> import copy
    >>> class Seeded(PicklableGenerator):
    ...     def __init__(self): self.generator = torch.Generator().manual_seed(0)
    >>> a = Seeded(); _ = torch.rand(2, generator=a.generator)
    >>> b = copy.deepcopy(a)  # (goes through __getstate__ and __setstate__, as pickle does)
    >>> torch.equal(torch.rand(3, generator=a.generator), torch.rand(3, generator=b.generator))
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PicklableGenerator"]


class PicklableGenerator:
    """Pickles ``self.generator`` (a CPU ``torch.Generator``) as bytes of its state."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["generator"] = bytes(self.generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)
