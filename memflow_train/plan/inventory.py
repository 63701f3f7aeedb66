"""What each network of a LightningModule holds: parameter counts and bytes, trainable or frozen, per block."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Network:
    """One network's parameters, in elements and bytes as the module holds them (before any trace cast).

    block_params: elements of the largest repeated block (`blocks`), the unit FSDP and ZeRO-3 gather; the
    whole network when it has no blocks."""

    name: str
    params: int
    trainable: int
    trainable_bytes: int
    frozen_bytes: int
    block_params: int
    block_trainable: int  # trainable elements of that block (LoRA: its adapters)
    rest_params: int  # elements outside the blocks (embeddings, head): FSDP2's root unit
    largest_leaf_params: int  # the biggest single module's own parameters (ZeRO-3 fetches per module)
    param_numels: tuple[int, ...]  # every parameter's elements (ZeRO-3 keeps the small ones whole)

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


def _largest_block(net: torch.nn.Module) -> tuple[int, int]:
    """(elements, trainable elements) of the largest block, the whole network when it has no blocks."""
    blocks = getattr(net, "blocks", None)
    units = list(blocks) if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else [net]
    sizes = [
        (sum(p.numel() for p in u.parameters()), sum(p.numel() for p in u.parameters() if p.requires_grad))
        for u in units
    ]
    return max(sizes)


def _rest(net: torch.nn.Module) -> int:
    blocks = getattr(net, "blocks", None)
    inside = {id(p) for p in blocks.parameters()} if isinstance(blocks, torch.nn.ModuleList) else set()
    return sum(p.numel() for p in net.parameters() if id(p) not in inside)


def _largest_leaf(net: torch.nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()), default=0)


def network_of(network: torch.nn.Module, name: str) -> Network:
    """The inventory of one network (a submodule of `module` or a frozen helper such as a text encoder)."""
    params = list({id(p): p for p in network.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    return Network(
        name=name,
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        frozen_bytes=sum(p.numel() * p.element_size() for p in frozen),
        block_params=_largest_block(network)[0],
        block_trainable=_largest_block(network)[1],
        rest_params=_rest(network),
        largest_leaf_params=_largest_leaf(network),
        param_numels=tuple(p.numel() for p in params),
    )


def networks(module: torch.nn.Module) -> dict[str, Network]:
    """The module's direct children that hold parameters (generator, teacher, critic, model), by name.
    Parameters shared between children count for the first that holds them."""
    out: dict[str, Network] = {}
    seen: set[int] = set()
    for name, child in module.named_children():
        own = [p for p in child.parameters() if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        out[name] = network_of(child, name)
    return out


def owner_map(module: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> the name of the network (direct child) holding it."""
    owners: dict[int, str] = {}
    for name, child in module.named_children():
        for p in child.parameters():
            owners.setdefault(id(p), name)
    return owners
