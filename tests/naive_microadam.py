"""An independent, deliberately naive MicroAdam written from the spec: Python loops, float64.

It shares no code with the package. Where the spec fixes a working precision (the accumulator
a = g + dequant(e) is fp32, bucket statistics are fp32, window values are bf16) it rounds to
that precision with numpy, one operation at a time, so its discrete choices (top-k selection,
4-bit codes) can be compared bitwise. Moments, the update and the parameters are float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

f32 = np.float32


def bf16(x: float) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32).to(torch.bfloat16).float())


class NaiveMicroAdam:
    def __init__(self, shape, lr, betas, eps, weight_decay, window, density, block, bucket, alpha=0.0):
        self.shape = tuple(shape)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.alpha = alpha  # densification (spec section 5)
        self.m, self.block, self.bucket = window, block, bucket
        numel = math.prod(self.shape)
        rows = self.shape[0] if len(self.shape) >= 2 else 1
        row_len = numel // rows
        # blocks: consecutive runs of `block` elements inside each row, the last one shorter
        self.blocks = []
        for r in range(rows):
            for s in range(0, row_len, block):
                start = r * row_len + s
                n = min(block, row_len - s)
                k = min(n, max(1, math.ceil(round(density * n, 9))))
                self.blocks.append((start, n, k))
        self.t = 0
        # per block: codes (list of ints), stats (list of (lo, hi) fp32), window (list of m slots)
        self.codes = [[0] * n for _, n, _ in self.blocks]
        self.stats = [[(f32(0), f32(0))] * (-(-n // bucket)) for _, n, _ in self.blocks]
        self.window = [[None] * window for _ in self.blocks]  # slot -> list of (index, value)

    def _dequant(self, bi, i):
        lo, hi = self.stats[bi][i // self.bucket]
        u = f32(f32(hi - lo) / f32(15))
        return f32(lo + f32(f32(self.codes[bi][i]) * u))

    def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """param: float64 flat array (updated copy returned); grad: flat float32 array."""
        self.t += 1
        t, m = self.t, self.m
        slot = (t - 1) % m
        p = param.copy()
        for bi, (start, n, k) in enumerate(self.blocks):
            a = [f32(f32(grad[start + i]) + self._dequant(bi, i)) for i in range(n)]
            order = sorted(range(n), key=lambda i: (-abs(float(a[i])), i))
            chosen = sorted(order[:k])  # stored in increasing index order
            self.window[bi][slot] = [(i, bf16(a[i])) for i in chosen]
            for i in chosen:
                a[i] = f32(0)
            self._quantize(bi, a)
            # moments from the window, then the update
            M = [0.0] * n
            S = [0.0] * n
            for s in range(min(t, m)):
                age = (t - 1 - s) % m
                for i, v in self.window[bi][s]:
                    M[i] += self.b1**age * v
                    S[i] += self.b2**age * v * v
            c1 = (1 - self.b1) / (1 - self.b1**t)
            c2 = (1 - self.b2) / (1 - self.b2**t)
            for i in range(n):
                u_i = c1 * M[i] / (math.sqrt(c2 * S[i]) + self.eps)
                p[start + i] = p[start + i] * (1 - self.lr * self.wd) - self.lr * u_i
            if self.alpha:
                # densification: alpha of the error feedback joins the update and leaves e
                e = [self._dequant(bi, i) for i in range(n)]
                for i in range(n):
                    p[start + i] -= self.lr * self.alpha * float(e[i])
                self._quantize(bi, [f32(f32(1 - self.alpha) * e[i]) for i in range(n)])
        return p

    def _quantize(self, bi, a):
        """4-bit codes and (lo, hi) of block bi's values a (fp32), per bucket."""
        for q0 in range(0, len(a), self.bucket):
            vals = a[q0 : q0 + self.bucket]
            lo, hi = min(vals), max(vals)
            u = f32(f32(hi - lo) / f32(15))
            for j, x in enumerate(vals):
                if u > 0:
                    code = math.floor(f32(f32(f32(x - lo) / u) + f32(0.5)))
                    code = min(15, max(0, code))
                else:
                    code = 0
                self.codes[bi][q0 + j] = code
            self.stats[bi][q0 // self.bucket] = (lo, hi)

    # the package's flat state layout, built from the per-block state, for comparison
    def flat_state(self) -> dict[str, np.ndarray]:
        idx, val, codes, stats = [], [], [], []
        for bi, (_, n, k) in enumerate(self.blocks):
            idx.append([[i for i, _ in (s or [(0, 0.0)] * k)] for s in self.window[bi]])
            val.append([[v for _, v in (s or [(0, 0.0)] * k)] for s in self.window[bi]])
            c = self.codes[bi] + [0] * (n % 2)
            codes.extend(c[j] | (c[j + 1] << 4) for j in range(0, len(c), 2))
            stats.extend(self.stats[bi])
        return {
            "window_idx": np.concatenate([np.array(x) for x in idx], axis=1),
            "window_val": np.concatenate([np.array(x) for x in val], axis=1),
            "ef_codes": np.array(codes, dtype=np.uint8),
            "ef_stats": np.array(stats, dtype=np.float32).reshape(-1, 2),
        }
