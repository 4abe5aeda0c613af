"""``WdiffCallback`` for the ``pytorch_lightning`` package: the callback of
``wdiff.integrations.lightning`` on ``pytorch_lightning.Callback`` (a class of its own, which a
``pytorch_lightning.Trainer`` asks for)."""

from __future__ import annotations

from pytorch_lightning import Callback

from wdiff.integrations.background import BackgroundWatch, LightningHooks

__all__ = ["WdiffCallback"]


class WdiffCallback(LightningHooks, Callback):
    __doc__ = BackgroundWatch.__doc__
