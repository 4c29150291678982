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

__all__ = ["main"]


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-peft`` console script (offline: no model hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning_peft.tasks  # noqa: F401  (registers the task classes for short class_path names)

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
