"""Checks of the research against known truths, each runnable as ``python -m recpost.diagnostics.<name>``:
``bandit_check`` (exp-weighted SFT against Theorems 4.3 and 4.4 in a bandit world), ``reward_check`` (a
reward model's reliability against the simulator's r*), ``ope_check`` (off-policy estimates against the
true value of a policy)."""
