"""Logical axis -> mesh axis rules: the one place that decides how parameters and activations are
split over the mesh axes `data`, `fsdp`, `tensor` and `seq` (see helios_jax/parallel.py).

Each logical axis lists mesh axes in order of preference; for a given array a mesh axis is used at
most once and only where its size divides the dimension, otherwise that dimension stays
replicated on it. The values live in helios_jax/parallel_rules.py so the package works without
the repository's configs/; this file is what a user copies to change them.
"""
from helios_jax.parallel_rules import ACTIVATION_RULES, PARAMETER_RULES  # noqa: F401


def get_config(arg=None):
    return {"parameters": PARAMETER_RULES, "activations": ACTIVATION_RULES}
