"""Stage 3, PPO / PPO-ptx (§3.5, App. C.4): config, pure maths, run setup, the step, the run.

config.py  PPOConfig, one documented field per knob
core.py    the arithmetic: KL-shaped rewards, GAE, whitening, losses, KL controllers
run.py     open_run: check every input, load the four models, resume state
step.py    ppo_step: one PPO iteration as a list of named calls
parallel.py  under torchrun: which episodes a rank samples, global statistics, FSDP's gathers
loop.py    train(config): the loop, measurement, outputs, and `rlhflab ppo`
"""

from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.ppo.loop import train
from rlhflab.stages.ppo.run import Run, open_run
from rlhflab.stages.ppo.step import ppo_step

__all__ = ["PPOConfig", "Run", "open_run", "ppo_step", "train"]
