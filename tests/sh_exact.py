"""Exact references for spherical harmonics, in mpmath (arbitrary precision and exponent).

`column_exact` runs the orthonormal Legendre recurrence of one order m in 60-digit
arithmetic: no rounding that matters and no underflow, so it is exact where float kernels
need scaled seeds. `legenp_exact` evaluates a single value from the hypergeometric (2F1)
form of the Legendre function, an independent formula, for spot checks at moderate degree.
"""
from __future__ import annotations

import mpmath as mp

DPS = 60


def _unit(xyz):
    x, y, z = (mp.mpf(float(v)) for v in xyz)  # exactly the float input as given
    r = mp.sqrt(x * x + y * y + z * z)
    return x / r, y / r, z / r


def column_exact(xyz, m: int, degree: int) -> dict[tuple[int, int], float]:
    """{(l, +-m): Y_l,+-m} for l = m..degree at the point, to ~1e-50 relative."""
    with mp.workdps(DPS):
        x, y, z = _unit(xyz)
        s = mp.sqrt(x * x + y * y)
        phi = mp.atan2(y, x) if s != 0 else mp.mpf(0)
        p_mm = 1 / mp.sqrt(4 * mp.pi)
        for k in range(1, m + 1):
            p_mm *= mp.sqrt(mp.mpf(2 * k + 1) / (2 * k)) * s
        out = {}
        prev2, prev = mp.mpf(0), p_mm
        for l in range(m, degree + 1):
            if l == m + 1:
                cur = mp.sqrt(2 * m + 3) * z * prev
            elif l >= m + 2:
                a = mp.sqrt(mp.mpf(4 * l * l - 1) / (l * l - m * m))
                b = mp.sqrt(mp.mpf((l - 1) ** 2 - m * m) * (2 * l + 1) / ((l * l - m * m) * (2 * l - 3)))
                cur = a * z * prev - b * prev2
            else:
                cur = prev
            if l > m:
                prev2, prev = prev, cur
            if m == 0:
                out[(l, 0)] = float(cur)
            else:
                out[(l, m)] = float(mp.sqrt(2) * cur * mp.cos(m * phi))
                out[(l, -m)] = float(mp.sqrt(2) * cur * mp.sin(m * phi))
        return out


def legenp_exact(xyz, l: int, m: int) -> float:
    """Y_lm from the hypergeometric form of the Legendre function (no recurrence):
    P_l^|m|(z) = (l+|m|)! / (2^|m| |m|! (l-|m|)!) (1-z^2)^(|m|/2) 2F1(|m|-l, |m|+l+1; |m|+1; (1-z)/2)
    without Condon-Shortley phase; a terminating series that mpmath sums adaptively.
    (mpmath's legenp takes the form with 1-|m| in the denominator, a pole for integer m, and
    fails to converge at some points.)"""
    with mp.workdps(30):
        x, y, z = _unit(xyz)
        am = abs(m)
        norm = mp.sqrt((2 * l + 1) / (4 * mp.pi) * mp.factorial(l - am) / mp.factorial(l + am))
        p = (mp.factorial(l + am) / (2 ** am * mp.factorial(am) * mp.factorial(l - am))
             * (1 - z * z) ** (mp.mpf(am) / 2) * mp.hyp2f1(am - l, am + l + 1, am + 1, (1 - z) / 2))
        if m == 0:
            return float(norm * p)
        phi = mp.atan2(y, x)
        return float(mp.sqrt(2) * norm * p * (mp.cos(am * phi) if m > 0 else mp.sin(am * phi)))
