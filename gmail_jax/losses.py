"""Losses as pure jnp functions on (global) embedding batches.

GMAIL (Mo & Yun, ICML 2025, Eq. 1) and TPC-CMA (Liu et al., arXiv 2604.00279; our reconstruction,
see DESIGN.md §1). Computed inside jit on globally sharded arrays: XLA inserts the all-gather, so
the negatives are the whole global batch and the gradient flows through the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# GMAIL: gen->real InfoNCE, symmetric variant, CLIP text term, false-negative masking.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# TPC-CMA: centroid and distribution alignment terms.
# ---------------------------------------------------------------------------------------------
