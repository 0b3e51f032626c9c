"""Simplex-noise patches: RD++'s training corruption (official_code.md §3.2).

The noise is OpenSimplex 3-D noise from the ``opensimplex`` package — the same algorithm (permutation from the
seed by the same LCG, same gradients, ``noise3`` already divided by ``NORM_CONSTANT3 = 103``) as the numba port
the official code copied from AnoDDPM, so no extra normalisation is applied here. Octaves: coordinates are the
integer indices (channel z, row y, col x) divided by the frequency, which starts at 32 and halves every octave;
the amplitude starts at 1 and is multiplied by the persistence (0.6) each octave. The sum is not rescaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def octave_noise3(shape: Sequence[int], seed: int, octaves: int = 6, persistence: float = 0.6,
                  frequency: float = 32.0) -> np.ndarray:
    """Fractal OpenSimplex noise of ``shape`` = (C, H, W) as float64, as AnoDDPM's ``rand_3d_octaves``.

    Args:
        shape: (channels, rows, cols); channel, row and column indices are the z, y and x coordinates.
        seed: OpenSimplex seed (any Python int; it is wrapped to 64 bits as in the official port).
        octaves: number of octaves summed.
        persistence: amplitude factor per octave.
        frequency: divisor of the coordinates in the first octave; halved every octave.
    """
    from opensimplex import OpenSimplex

    generator = OpenSimplex(int(seed))
    z, y, x = (np.arange(n, dtype=np.float64) for n in shape)
    noise = np.zeros(tuple(shape), dtype=np.float64)
    amplitude = 1.0
    for _ in range(octaves):
        noise += amplitude * generator.noise3array(x / frequency, y / frequency, z / frequency)  # (C, H, W)
        frequency /= 2
        amplitude *= persistence
    return noise


class SimplexNoisePatch:
    """Adds ``scale`` × a simplex-noise patch of random size and position to a [0, 1] image (no clipping).

    Per call (numpy's global RNG, which the dataset seeds per sample, as the official code uses it):
    ``h, w ~ randint(min_size, max_size + 1)``, then ``y0 ~ randint(1, H - h)``, ``x0 ~ randint(1, W - w)``.
    On images smaller than ``max_size + 2`` the size range is clipped to ``H - 2`` / ``W - 2`` (no effect at
    the official 256 px).

    Args:
        seed: seed of the noise permutation (one per run).
        fixed_field: the official quirk (default): every patch is the top-left ``h×w`` crop of ONE noise field
            of ``C×max_size×max_size`` built once from ``seed`` (the official ``Simplex_CLASS`` is seeded once
            and its coordinates always start at 0). ``False``: a fresh permutation seed per patch, drawn from
            numpy's global RNG (``randint(-1e10, 1e10)``, AnoDDPM's ``newSeed``).
    """

    def __init__(self, seed: int, scale: float = 0.2, min_size: int = 10, max_size: int = 31, octaves: int = 6,
                 persistence: float = 0.6, frequency: float = 32.0, fixed_field: bool = True):
        if not 1 <= min_size <= max_size:
            raise ValueError(f"noise patch sizes need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.seed, self.scale, self.min_size, self.max_size = int(seed), scale, min_size, max_size
        self.octaves, self.persistence, self.frequency = octaves, persistence, frequency
        self.fixed_field = fixed_field
        self._field: np.ndarray | None = None

    def field(self, channels: int = 3) -> np.ndarray:
        """The fixed noise field (channels, max_size, max_size), built on first use from ``seed``."""
        if self._field is None or self._field.shape[0] != channels:
            self._field = octave_noise3((channels, self.max_size, self.max_size), self.seed, self.octaves,
                                        self.persistence, self.frequency)
        return self._field

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) of the next patch, drawn from numpy's global RNG in the official order."""
        if min(height, width) < 3:
            raise ValueError(f"image of {height}×{width} px is too small for a noise patch")
        hi_h, hi_w = min(self.max_size, height - 2), min(self.max_size, width - 2)
        # parity: official_code.md §3.2 — h, w ~ randint(10, 32); y0 ~ randint(1, 256 - h); x0 ~ randint(1, 256 - w)
        h = np.random.randint(min(self.min_size, hi_h), hi_h + 1)
        w = np.random.randint(min(self.min_size, hi_w), hi_w + 1)
        y0 = np.random.randint(1, height - h)
        x0 = np.random.randint(1, width - w)
        return int(y0), int(x0), int(h), int(w)

    def patch(self, channels: int, h: int, w: int) -> np.ndarray:
        """Noise of shape (channels, h, w) before scaling."""
        if self.fixed_field:
            # parity: official_code.md §3.2 — one fixed field per run; a patch is its top-left crop
            return self.field(channels)[:, :h, :w]
        seed = int(np.random.randint(-10_000_000_000, 10_000_000_000, dtype=np.int64))
        return octave_noise3((channels, h, w), seed, self.octaves, self.persistence, self.frequency)

    def __call__(self, image: Tensor) -> Tensor:
        """(C, H, W) image in [0, 1] → a noisy copy; values may leave [0, 1] (official: no clipping)."""
        channels, height, width = image.shape
        y0, x0, h, w = self.box(height, width)
        noise = torch.from_numpy(self.scale * self.patch(channels, h, w)).to(image.dtype)  # (C, h, w)
        noisy = image.clone()
        noisy[:, y0:y0 + h, x0:x0 + w] += noise
        return noisy
