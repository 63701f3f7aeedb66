"""FSDP2 (torch's `fully_shard`) for memflow-train's methods, through Lightning's ModelParallelStrategy.

Lightning's ModelParallelStrategy leaves the sharding to a `configure_model` hook in every LightningModule;
here the strategy shards by itself, so the methods stay unaware of it. Every network of the module (each
submodule that names its blocks in diffusers' `_no_split_modules`: generator, critic, frozen teacher, the
flow-matching model) becomes one FSDP unit per block plus one for the rest, over all ranks (pure data
parallelism: parameters, gradients and optimizer states sharded 1/world_size). Methods a network calls
outside `forward` (text encoding runs once per prompt, before the chunks) gather their parameters through
`register_fsdp_forward_method`: a network lists them in `_sharded_entry_points`.

- The optimizer is the methods' own (MultiNetworkAdamW: one AdamW per network, each clipped by its own norm,
  each with its own schedule). Its parameters are the sharded DTensors; gradient norms are taken over the
  full (DTensor) gradients, so clipping sees the whole network.
- mixed_precision=True: bf16 parameters in forward and backward, fp32 sharded master parameters, gradients
  reduced in fp32 (torch's MixedPrecisionPolicy). Activation checkpointing per block is the methods'
  `gradient_checkpointing` option, as without FSDP.
- Checkpoints: one Lightning .ckpt file with the full (gathered) trainable weights and optimizer states,
  written by rank 0, so resume (with any number of ranks), export and `load_trained_network` read it as any
  other checkpoint. Frozen networks (the teacher) stay out of it and come back from their configured weights.
  Rank 0 holds the whole state in CPU memory while saving: about 12 bytes per trainable parameter.

Source: torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); torchtitan's per-block wrapping.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def sharded_networks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks of a LightningModule that FSDP2 shards: submodules naming their blocks in
    `_no_split_modules` (outermost only)."""
    found: list[torch.nn.Module] = []
    for sub in module.modules():
        if getattr(sub, "_no_split_modules", None) and not any(sub in set(n.modules()) for n in found):
            found.append(sub)
    return found


def shard_network(network: torch.nn.Module, mesh: Any, policy: MixedPrecisionPolicy) -> None:
    """One FSDP unit per block (each class named in network._no_split_modules), one for the rest; the methods
    each unit lists in `_sharded_entry_points` gather its parameters like forward does."""
    block_names = set(network._no_split_modules)
    units = [sub for sub in network.modules() if sub is not network and type(sub).__name__ in block_names]
    for unit in [*units, network]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        for method in getattr(unit, "_sharded_entry_points", ()):
            register_fsdp_forward_method(unit, method)


class MemflowFSDP2Strategy(ModelParallelStrategy):
    strategy_name = "memflow_fsdp2"

    def __init__(
        self,
        mixed_precision: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        """mixed_precision: bf16 compute parameters, fp32 master parameters and gradient reduction.
        process_group_backend: default nccl on GPUs, gloo on CPU."""
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.mixed_precision = mixed_precision

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards: pure FSDP
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        """ModelParallelStrategy.setup with the sharding done here instead of in a configure_model hook."""
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision
            else MixedPrecisionPolicy()
        )
        networks = sharded_networks(self.lightning_module)
        if not networks:
            raise TypeError(
                f"{type(self.lightning_module).__name__} has no network to shard (no submodule with _no_split_modules)"
            )
        # The backbone returns views (heads-first K/V, unpatchified latents) and nothing modifies them in place:
        # the 2-rank equivalence test (tests/test_sharded_training.py) checks the gradients FSDP2 warns about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCausalWan\w+\) returned a view tensor")
        mesh = self.device_mesh["data_parallel"]
        for network in networks:
            shard_network(network, mesh, policy)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a full checkpoint file: frozen parameters, and only those, may be absent from it."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise ValueError(f"{path}: {type(self).__name__} resumes from a .ckpt file it wrote, not a folder")
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        if "state_dict" not in saved:
            raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
        module = self.lightning_module
        expected = set(module.state_dict())
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        missing, unexpected = expected - set(saved["state_dict"]) - frozen, set(saved["state_dict"]) - expected
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        del saved
        strict, module.strict_loading = module.strict_loading, False  # frozen keys are absent (checked above)
        try:
            return super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict
