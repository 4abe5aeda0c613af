"""wdiff started from a training script: callbacks that keep ``wdiff watch`` results up to date while
the run trains (docs/integrations.md, "In the training script").

- ``wdiff.integrations.huggingface.WdiffCallback``: a ``transformers.TrainerCallback``;
- ``wdiff.integrations.lightning.WdiffCallback``: a ``lightning.pytorch.Callback``
  (``wdiff.integrations.pytorch_lightning.WdiffCallback`` for the ``pytorch_lightning`` package).

Each imports its framework at module top and is imported only by the user: ``import wdiff`` imports
none of them. The work happens in a separate ``wdiff watch`` process (``wdiff.integrations.background``)
that imports neither torch nor the framework.
"""
