"""Causal knowledge networks over skills, and learning paths recommended on them.

Pipeline: item responses -> skill mastery (DINA by EM) -> Bayesian-network
structure over skills (pgmpy, bootstrapped) -> conditional probability tables
-> interventional edge effects -> learning paths with explanations.
"""
