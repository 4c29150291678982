"""The ``lightning-peft`` command: LightningCLI over the ready task modules and the PEFT callbacks.

Examples::

    lightning-peft fit --config configs/quickstart.yaml
    lightning-peft fit --config configs/quickstart.yaml --trainer.callbacks.init_args.r=16
    lightning-peft fit --config configs/quickstart.yaml --print_config > my.yaml
"""

from __future__ import annotations

import os
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch.optim import Optimizer

__all__ = ["PEFTCLI", "main"]


class PEFTCLI(LightningCLI):
    """``LightningCLI`` whose top-level ``optimizer:`` (e.g. ``bitsandbytes.optim.PagedAdamW8bit``) trains the adapters.

    LightningCLI instantiates that optimizer over ``model.parameters()`` while it parses the config, before a PEFT
    callback has injected the adapters and frozen the base: as is, it would hold only frozen base weights and
    train nothing. Here its (single, still stateless) parameter group is pointed at the parameters that train
    when Lightning calls ``configure_optimizers``; the class and its settings stay as configured.
    """

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler=None):
        if len(optimizer.param_groups) == 1 and not optimizer.state:
            optimizer.param_groups[0]["params"] = [p for p in lightning_module.parameters() if p.requires_grad]
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-peft`` console script (offline: no model hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning_peft.tasks  # noqa: F401  (registers the task classes for short class_path names)

    PEFTCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
