"""The training stages, one module (or package) each, handing off through output directories.

pretrain -> sft -> sample + comparisons -> rm -> ppo. Each exposes `train(config)` (sample:
`run(config)`, comparisons: `build(...)`) and, where it has a command, `add_arguments`
and `run_cli` for `rlhflab <stage>`.
"""
