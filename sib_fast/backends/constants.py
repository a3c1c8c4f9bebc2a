"""The constants of the S-IB head that every backend shares, in one place.

``csrc/sib_head.h`` holds the C++ copies (the compiled kernels cannot import Python);
``tests/test_layout.py`` checks that the two agree.
"""

# Quantile levels (docs/loss.md section 3): lo, the mask's level, hi.
Q_LOW, Q_MASK, Q_HIGH = 0.05, 0.80, 0.95
RANGE_EPS = 1e-8  # added to hi - lo
NORM_EPS = 1e-12  # floor of the vector norms in the HSIC term

# The fused backends read the ranks floor(t) - RANKS_BELOW .. floor(t) + RANK_WINDOW - RANKS_BELOW - 1
# around each soft quantile's position t (docs/loss.md section 2).
RANK_WINDOW = 18
RANKS_BELOW = 8

# Layout of what the fused forward op saves for its backward (csrc/sib_head.h): the columns of
# image_stats (lo, q80, hi, t2, background sum, background sum of squares) and the rows of
# rank_index (Q(a, 0.05), Q(a, 0.80), Q(a, 0.95), Q(d, 0.80)).
IMAGE_STATS = 6
QUANTILES = 4
