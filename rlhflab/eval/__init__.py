"""Measurement, never a training signal: the paper's evaluations of trained policies.

evaluate.py   `rlhflab eval`: every model on the held-out splits, summary.json
generic.py    `rlhflab eval` without the lab world: RM win rates and KL of your own policies
judging.py    win rates by held-out labelers, Wilson CIs, Likert
heldout.py    truthfulness, toxicity and bias on the held-out sets; closed-domain hallucination
capability.py the capability benchmarks (the alignment tax)
overopt.py    best-of-n and RL over-optimization curves and their fits
lab.py        gold quality of a policy's answers (PPO's periodic measurement)
rm_report.py  how well the reward model ranks held-out comparisons
"""
