"""`rlhflab run`: the whole recipe on the lab world, one run directory, resumable.

    world -> pretrain (small, large) -> sft -> comparisons -> rm -> [rlinit] -> ppo / ppo-ptx -> eval -> report

Each stage writes its own directory under the run directory and hands off through it
only. A stage whose `summary.json` exists is finished and is not redone, so running
the same command again after an interruption carries on where it stopped (and a stage
that was interrupted mid-way resumes from its own checkpoint).

config.py: the recipe and RunConfig; schedule.py: the stage scheduler; run.py: the stages
wired to their inputs, the run, the CLI.
"""

from rlhflab.pipeline.config import (
    FIGURE1_BASELINE,
    HEADLINE_RIVALS,
    LAB_KL_COEF,
    LAB_PTX_COEF,
    LAB_RM,
    LAB_SFT,
    PRESETS,
    RERUN_FREE,
    SIZES,
    RunConfig,
    _base,
    head_to_head,
)
from rlhflab.pipeline.run import Pipeline, add_arguments, run_cli
from rlhflab.pipeline.schedule import Job, Scheduler

__all__ = [
    "FIGURE1_BASELINE",
    "HEADLINE_RIVALS",
    "LAB_KL_COEF",
    "LAB_PTX_COEF",
    "LAB_RM",
    "LAB_SFT",
    "PRESETS",
    "RERUN_FREE",
    "SIZES",
    "Job",
    "Pipeline",
    "RunConfig",
    "Scheduler",
    "_base",
    "add_arguments",
    "head_to_head",
    "run_cli",
]
