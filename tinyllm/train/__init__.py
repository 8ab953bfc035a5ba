"""Training (notes ch.04/05/07): one loop (loop.py) that pretraining, SFT, reward, DPO, PPO and GRPO reuse.

A training run supplies a `Task` (batches, a loss and the trainable parameters); `train(model, task, cfg)`
owns everything else: accumulation, precision, clipping, schedule, eval, logging, progress and checkpoints.
"""

from tinyllm.train.loop import Task, TrainConfig, TrainResult, train

__all__ = ["Task", "TrainConfig", "TrainResult", "train"]
