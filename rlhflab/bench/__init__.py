"""`rlhflab bench`: fixed PPO workloads, timed, optionally side by side with TRL.

common.py    the workloads, their inputs, and what both sides report
main.py      the rlhflab side, the comparison and the command line
report.py    the printed report
trl_side.py  TRL's PPOTrainer on the same workload (optional extra `bench`)
"""
