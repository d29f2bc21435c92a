"""The study's statistics (docs/STUDY.md states which test answers which question, before any report seed ran).

    summary(values)            mean and 95% t-interval over seeds
    paired(a, b)               a - b paired by seed: mean, 95% t-interval, paired t-test p, sign-test p, the MDD
    tost(a, b, margin)         equivalence within +-margin: two one-sided paired t-tests (p = the larger)
    holm(p)                    Holm's step-down adjustment of a family of p-values
    time_to(times, horizon)    time-to-threshold with censoring: Kaplan-Meier median and the fraction that reached it

scipy computes every test it has (t distributions, ttest_rel / ttest_1samp, binomtest, the Kaplan-Meier estimate
`stats.ecdf` of `CensoredData`); only Holm's adjustment, which scipy does not offer, is written out.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def summary(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds, of the finite values (an infinite one, a run that never reached a
    threshold, belongs to `time_to`)."""
    x = np.array([v for v in values if math.isfinite(v)])
    n = len(x)
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    mean = float(x.mean()) if n else math.nan
    return dict(mean=mean, lo=mean - half, hi=mean + half, n=n, of=len(values), values=list(values))


def paired(a: list[float], b: list[float]) -> dict:
    """a - b paired by seed: mean, 95% t-interval, p of the paired t-test, p of the sign test (exact binomial on the
    seeds with a nonzero difference), and the minimum detectable difference of this design (two-sided 5%, power
    80%, the observed spread of the differences)."""
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    se = sd / math.sqrt(n) if n > 1 else math.nan
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan
    p = float(stats.ttest_rel(a, b).pvalue) if n > 1 and sd > 0 else math.nan
    wins, nonzero = int((d > 0).sum()), int((d != 0).sum())
    sign_p = float(stats.binomtest(wins, nonzero).pvalue) if nonzero else math.nan
    return dict(diff=float(d.mean()), lo=float(d.mean() - t * se), hi=float(d.mean() + t * se), p=p, sign_p=sign_p,
                wins=wins, n=n, sd=sd, mdd=float((t + stats.t.ppf(0.8, n - 1)) * se) if n > 1 else math.nan,
                diffs=d.tolist())


def tost(a: list[float], b: list[float], margin: float) -> dict:
    """Are a and b equivalent within +-margin (paired by seed)? Two one-sided t-tests, H0: mean(a - b) <= -margin
    and H0: mean(a - b) >= +margin; p is the larger of the two, and equivalence at level 5% is p < 0.05 (the same as
    the 90% t-interval lying inside +-margin)."""
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return dict(margin=margin, p=math.nan)
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return dict(margin=margin, p=float(max(lower, upper)))


def holm(p: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: sort the m p-values, multiply the k-th smallest (k from 0) by m - k, carry the
    running maximum, cap at 1. Rejecting where the adjusted p < alpha controls the family-wise error at alpha.
    NaN p-values (a test that could not run) stay NaN and do not count in m."""
    finite = sorted((v, k) for k, v in p.items() if math.isfinite(v))
    m, out, running = len(finite), {k: math.nan for k in p}, 0.0
    for rank, (v, k) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * v))
        out[k] = running
    return out


def time_to(times: list[float], horizon: float) -> dict:
    """Iterations to reach a threshold over seeds, runs that never reached it right-censored at the horizon (the
    last evaluation): the Kaplan-Meier median (inf when fewer than half reached it), the fraction that reached it,
    and the mean over the runs that did (for reference only: it ignores the others)."""
    t = np.array(times, dtype=float)
    reached = np.isfinite(t)
    median = math.inf
    if reached.any():
        data = stats.CensoredData(uncensored=t[reached], right=np.full((~reached).sum(), float(horizon)))
        sf = stats.ecdf(data).sf
        below = sf.quantiles[sf.probabilities <= 0.5]
        median = float(below[0]) if len(below) else math.inf
    return dict(median=median, reached=int(reached.sum()), of=len(t), fraction=float(reached.mean()) if len(t) else
                math.nan, mean_reached=float(t[reached].mean()) if reached.any() else math.nan, values=t.tolist())
