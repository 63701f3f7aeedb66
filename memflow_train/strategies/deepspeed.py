"""Lightning's DeepSpeedStrategy, made to fit memflow-train's methods.

- It runs on CPU too (gloo), so CI exercises ZeRO 1/2/3 for real; Lightning refuses non-CUDA.
- DeepSpeed wraps one optimizer. Ours (MultiNetworkAdamW) keeps the generator's and the critic's
  AdamW updates independent; under ZeRO it receives flat partitions of each network's parameters,
  so its per-network gradient norms are all-reduced over the data-parallel group. DeepSpeed's own
  global clipping stays off (leave trainer.gradient_clip_val unset): each network clips by its own norm.
- The frozen teacher and text encoder are part of the engine's module, so ZeRO-3 partitions them
  too, and they are never in the optimizer (no gradients, no states).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from memflow_train.methods.optim import MultiNetworkAdamW, find_multi_network_optimizer
from memflow_train.models.trust import check_folder


class MemflowDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "memflow_deepspeed"

    def __init__(
        self,
        *args: Any,
        exclude_frozen_parameters: bool = True,
        logging_batch_size_per_gpu: int | str = 1,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        """Arguments as lightning.pytorch.strategies.DeepSpeedStrategy (stage, offload_optimizer, ...).

        exclude_frozen_parameters defaults to True here: checkpoints leave out the frozen teacher.
        logging_batch_size_per_gpu defaults to 1: it only feeds DeepSpeed's throughput log, and our
        streaming loaders have no batch sampler for Lightning to read it from.
        trust_checkpoint: resume from checkpoint folders whose files hold objects outside the safe
        allow-list (DeepSpeed unpickles them fully; memflow_train.models.trust). Default: refuse them.
        """
        self.trust_checkpoint = trust_checkpoint
        super().__init__(
            *args,
            exclude_frozen_parameters=exclude_frozen_parameters,
            logging_batch_size_per_gpu=logging_batch_size_per_gpu,
            **kwargs,
        )

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            DDPStrategy.setup_environment(self)  # Lightning's DeepSpeedStrategy insists on CUDA; DeepSpeed does not
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):  # CPU processes have no device index to validate
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):  # noqa: ANN001 (Lightning signature)
        """Lightning's deepspeed.initialize call, with a device rank DeepSpeed accepts on CPU too."""
        import deepspeed

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        if isinstance(optimizer, MultiNetworkAdamW) and self.config.get("zero_optimization", {}).get("stage", 0) > 0:
            find_multi_network_optimizer(deepspeed_optimizer).grad_norm_group = dist.group.WORLD
        return engine, deepspeed_optimizer

    def load_checkpoint(self, checkpoint_path, weights_only=None):  # noqa: ANN001 (Lightning signature)
        """Resume from a checkpoint saved without the frozen parameters: those, and only those, may be absent.
        Every file of the folder is first proven safe to unpickle (DeepSpeed's loader is not guarded)."""
        check_folder(checkpoint_path, self.trust_checkpoint)
        if not self.exclude_frozen_parameters or (self.load_full_weights and self.zero_stage_3):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.deepspeed import _validate_checkpoint_directory
        from lightning.pytorch.trainer.states import TrainerFn

        _validate_checkpoint_directory(checkpoint_path)
        frozen = {name for name, p in self.lightning_module.named_parameters() if not p.requires_grad}

        def load_allowing_frozen(src: dict, dst: torch.nn.Module) -> None:
            result = dst.load_state_dict(src, strict=False)
            missing = set(result.missing_keys) - frozen
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"checkpoint {checkpoint_path} does not fit the model: missing {sorted(missing)}, "
                    f"unexpected {sorted(result.unexpected_keys)}"
                )

        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path,
            load_optimizer_states=self.lightning_module.trainer.state.fn == TrainerFn.FITTING,
            load_lr_scheduler_states=False,
            custom_load_fn=load_allowing_frozen,
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load {checkpoint_path}: not a DeepSpeed checkpoint directory")
        return client_state
