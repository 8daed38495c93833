"""rlhflab: the InstructGPT recipe (Ouyang et al. 2022) as a working system."""

__version__ = "0.1.0"
