"""``WdiffCallback`` for Lightning (``lightning.pytorch``): wdiff results that follow the run as it trains.

    from lightning.pytorch.callbacks import ModelCheckpoint
    from wdiff.integrations.lightning import WdiffCallback

    checkpoints = ModelCheckpoint(every_n_train_steps=500, save_top_k=-1)
    trainer = Trainer(max_steps=10_000, callbacks=[checkpoints, WdiffCallback()])

The global-zero process starts one ``wdiff watch`` process when training starts
(``wdiff.integrations.background``); it follows the ``dirpath`` of the trainer's (first)
ModelCheckpoint (``epoch=E-step=S.ckpt``, ``last.ckpt`` counted once) into ``DIRPATH/wdiff``. At the end
of training, or when it fails, the watch adds every complete checkpoint and exits (``wait=True``:
``fit()`` returns after that); if the training process dies, the watch does the same on its own.
``wdiff.integrations.pytorch_lightning`` has the same callback for the ``pytorch_lightning`` package.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from wdiff.integrations.background import BackgroundWatch, LightningHooks

__all__ = ["WdiffCallback"]


class WdiffCallback(LightningHooks, Callback):
    __doc__ = BackgroundWatch.__doc__
