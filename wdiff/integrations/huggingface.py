"""``WdiffCallback`` for the Hugging Face ``Trainer``: wdiff results that follow the run as it trains.

    from wdiff.integrations.huggingface import WdiffCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[WdiffCallback()])
    trainer.train()  # OUTPUT_DIR/wdiff holds the results of every checkpoint when this returns

The main process (``state.is_world_process_zero``) starts one ``wdiff watch`` process when training
begins (``wdiff.integrations.background``); it adds each ``checkpoint-N/`` of ``args.output_dir`` once
its files are complete, keeping copies of what it needs, so ``save_total_limit`` deleting old
checkpoints changes nothing. At the end of training the watch adds every complete checkpoint and
exits (``wait=True``: ``train()`` returns after that); if the training process dies, the watch does
the same on its own.
"""

from __future__ import annotations

from transformers import TrainerCallback

from wdiff.integrations.background import BackgroundWatch, logger

__all__ = ["WdiffCallback"]


class WdiffCallback(BackgroundWatch, TrainerCallback):
    __doc__ = BackgroundWatch.__doc__

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if args.save_strategy == "no" and self._folder is None:
            logger.warning("wdiff: save_strategy='no' writes no checkpoints: no watch started")
            return
        self.begin(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        self.check()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.stop()
