"""Test-only Lightning strategies that run the sharded code paths on CPU (2 processes, gloo).

Lightning 2.6.6 refuses DeepSpeed and FSDP1 off CUDA in a few places; everything else in those strategies runs on
CPU unchanged. Each override below names the Lightning line it steps around (paths relative to
``site-packages/lightning``). Nothing here is for production: on a GPU use Lightning's own classes.

- :class:`CPUDeepSpeedStrategy` (ZeRO-1/2/3):
  * ``pytorch/strategies/deepspeed.py:341-347`` ``setup_environment`` raises unless the accelerator is
    ``CUDAAccelerator`` -> skip to ``DDPStrategy.setup_environment``.
  * ``pytorch/strategies/deepspeed.py:350-356`` ``setup_distributed`` calls
    ``fabric/strategies/deepspeed.py:877-885`` ``_validate_device_index_selection`` (CPU devices have index None,
    so ``[None, None] != [0, 1]``) -> same method without that check.
  * ``pytorch/strategies/deepspeed.py:448`` and ``:587`` pass ``device_rank=self.root_device.index`` (None on CPU)
    to ``deepspeed.initialize``; DeepSpeed's ``engine.py:1941-1942`` then evaluates ``None >= 0`` -> TypeError.
    -> ``device_rank=self.local_rank`` (DeepSpeed's CPU accelerator ignores the index).
- :class:`CPUFSDPStrategy` (FSDP1, ``FullyShardedDataParallel``):
  * ``pytorch/trainer/connectors/accelerator_connector.py:431-438`` refuses ``accelerator="cpu"`` only when
    ``type(strategy) is FSDPStrategy``: any subclass passes, nothing to override.
  * ``pytorch/strategies/fsdp.py:315`` (``_setup_model``) and ``:409`` (``model_sharded_context``) pass
    ``device_id=self.root_device.index`` (None on CPU) -> ``device_id=torch.device("cpu")`` (an extra
    ``device_id`` in ``self.kwargs`` would be a duplicate keyword, so both methods are overridden).
  * ``fabric/strategies/fsdp.py:821-822`` ``_get_full_state_dict_context`` uses ``offload_to_cpu=True``, which on a
    CPU model segfaults in torch ``distributed/_state_dict_utils.py`` (the issue's observation; reproduce with
    ``LP_FSDP1_KEEP_OFFLOAD=1``) -> the three methods that enter that context (``lightning_module_state_dict``
    ``:505``, ``optimizer_state`` ``:522``, ``load_checkpoint`` ``:586`` incl. ``_load_raw_module_state`` in
    ``fabric/strategies/model_parallel.py:574``) run with :func:`full_state_dict_without_offload`, a scoped patch of
    the two module globals that hold that function (Lightning offers no hook for the config).
- FSDP2: Lightning's ``ModelParallelStrategy`` needs nothing: :func:`fsdp2_strategy` only sets
  ``data_parallel_size=2, tensor_parallel_size=1`` (the default puts both processes on the tensor-parallel axis).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Generator, Iterator
from typing import Any, Optional, Union

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.seed import reset_seed
from torch.nn import Module
from torch.optim import Optimizer

__all__ = ["CPUDeepSpeedStrategy", "CPUFSDPStrategy", "fsdp2_strategy", "full_state_dict_without_offload"]


# -- DeepSpeed -----------------------------------------------------------------------------------------------------
class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` minus its three CUDA-only checks. Use e.g. ``CPUDeepSpeedStrategy(stage=3,
    accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * 2)`` or pass it to
    ``Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=2))``."""

    strategy_name = "deepspeed_cpu_test"

    def setup_environment(self) -> None:
        # deepspeed.py:341-347: the CUDAAccelerator check; the rest is DDPStrategy.setup_environment
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # deepspeed.py:350-356 without _validate_device_index_selection (fabric deepspeed.py:877-885)
        assert self.parallel_devices is not None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Module, optimizer: Optional[Optimizer], lr_scheduler: Any = None):
        # deepspeed.py:433-455 with device_rank=self.local_rank instead of root_device.index (None on CPU)
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config, model=model, model_parameters=model_parameters, optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        # deepspeed.py:566-595 (validate/test/predict outside fit) with the same device_rank fix
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config.update({
                "zero_allow_untested_optimizer": self.config["zero_allow_untested_optimizer"],
                "zero_optimization": self.config["zero_optimization"],
            })
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=inference_config, model=model,
            optimizer=None, lr_scheduler=None, model_parameters=[], dist_init_required=False,
        )
        self.model = engine


# -- FSDP1 ---------------------------------------------------------------------------------------------------------
def _full_state_dict_context_no_offload(module: Module, world_size: int, rank0_only: bool = True):
    """``fabric/strategies/fsdp.py:814-830`` with ``offload_to_cpu=False`` (the tensors already are on the CPU)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


@contextlib.contextmanager
def full_state_dict_without_offload() -> Iterator[None]:
    """Within the block, Lightning's FSDP1 full-state-dict context does not offload to CPU.

    Patches the two module globals that hold ``_get_full_state_dict_context`` (``lightning.pytorch.strategies.fsdp``,
    imported at its line 46, and ``lightning.fabric.strategies.model_parallel``, line 34, used by
    ``_load_raw_module_state``), and restores them on exit. Also usable as a pytest fixture body.
    """
    import lightning.fabric.strategies.model_parallel as fabric_mp
    import lightning.pytorch.strategies.fsdp as pl_fsdp

    if os.environ.get("LP_FSDP1_KEEP_OFFLOAD") == "1":  # to reproduce the segfault
        yield
        return
    saved = pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context
    pl_fsdp._get_full_state_dict_context = fabric_mp._get_full_state_dict_context = _full_state_dict_context_no_offload
    try:
        yield
    finally:
        pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context = saved


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) on CPU: ``device_id=cpu`` and full state dicts without CPU offload.

    Being a subclass already gets it past ``accelerator_connector.py:431-438`` (``type(strategy) is FSDPStrategy``).
    """

    strategy_name = "fsdp_cpu_test"

    def _setup_model(self, model: Module) -> Module:
        # fsdp.py:292-325 with device_id=torch.device("cpu") instead of root_device.index (None on CPU)
        from lightning.pytorch.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
            _has_meta_device_parameters_or_buffers,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(mod, FullyShardedDataParallel) for mod in model.modules()):
            if _has_meta_device_parameters_or_buffers(model):
                rank_zero_warn("The model is already wrapped in `FSDP` but there are still parameters on the meta device.")
            if "auto_wrap_policy" in self.kwargs:
                rank_zero_warn("A FSDP `auto_wrap_policy` is set, but the model is already wrapped. The policy will be ignored.")
                del self.kwargs["auto_wrap_policy"]
        else:
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # fsdp.py:397-413 with the same device_id fix
        from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        ):
            yield

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with full_state_dict_without_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        with full_state_dict_without_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Union[str, os.PathLike], weights_only: Optional[bool] = None) -> dict[str, Any]:
        with full_state_dict_without_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
def fsdp2_strategy(**kwargs: Any) -> ModelParallelStrategy:
    """Lightning's ``ModelParallelStrategy`` as pure data-parallel FSDP2 over 2 processes (runs on CPU as is)."""
    kwargs.setdefault("data_parallel_size", 2)
    kwargs.setdefault("tensor_parallel_size", 1)
    return ModelParallelStrategy(**kwargs)
