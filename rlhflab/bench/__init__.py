"""`rlhflab bench`: fixed PPO workloads, timed, optionally side by side with TRL.

common.py    the workloads, their inputs, and what both sides report
main.py      the rlhflab side, the comparison, the report and the command line
trl_side.py  TRL's PPOTrainer on the same workload (optional extra `bench`)
"""
