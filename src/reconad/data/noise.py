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

# The lattice vertices (offsets from the super-cell origin) that OpenSimplex's 3-D kernel always visits in each
# region of the super-cell: the tetrahedron at (0,0,0), the one at (1,1,1), and the octahedron between them.
_REGION_VERTICES = {
    "low": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "high": ((1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "middle": ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)),
}


def _bit(c: np.ndarray, mask: int) -> np.ndarray:
    return (c & mask) != 0


def _axis_vertex(c: np.ndarray) -> np.ndarray:
    """(N, 3) offsets (-1,1,1), (1,-1,1) or (1,1,-1): minus one on the first axis whose bit is clear in ``c``."""
    return np.where(~_bit(c, 1)[:, None], (-1, 1, 1), np.where(~_bit(c, 2)[:, None], (1, -1, 1), (1, 1, -1)))


def _two_on_axis(c: np.ndarray) -> np.ndarray:
    """(N, 3) offsets (2,0,0), (0,2,0) or (0,0,2): two on the first axis whose bit is set in ``c``."""
    return np.where(_bit(c, 1)[:, None], (2, 0, 0), np.where(_bit(c, 2)[:, None], (0, 2, 0), (0, 0, 2)))


def _low_extras(xi, yi, zi, in_sum):
    """The two extra vertices of the (0,0,0) tetrahedron, as ``_noise3`` chooses them (its branches, vectorised)."""
    a_pt, a_sc, b_pt, b_sc = np.full(xi.shape, 1), xi.copy(), np.full(xi.shape, 2), yi.copy()
    to_b = (a_sc >= b_sc) & (zi > b_sc)
    to_a = ~to_b & (a_sc < b_sc) & (zi > a_sc)
    b_sc, b_pt = np.where(to_b, zi, b_sc), np.where(to_b, 4, b_pt)
    a_sc, a_pt = np.where(to_a, zi, a_sc), np.where(to_a, 4, a_pt)
    wins = 1 - in_sum
    origin_close = (wins > a_sc) | (wins > b_sc)
    c = np.where(origin_close, np.where(b_sc > a_sc, b_pt, a_pt), a_pt | b_pt)
    bx, by, bz = _bit(c, 1), _bit(c, 2), _bit(c, 4)
    # (0,0,0) among the two closest: ext0/ext1 per axis
    x0, x1 = np.where(bx, 1, -1), np.where(bx, 1, 0)
    y0 = np.where(by, 1, np.where(bx, -1, 0))
    y1 = np.where(by, 1, np.where(bx, 0, -1))
    z0, z1 = np.where(bz, 1, 0), np.where(bz, 1, -1)
    # otherwise: set bits give (1, 1), clear bits (0, -1)
    o0 = [np.where(b, 1, 0) for b in (bx, by, bz)]
    o1 = [np.where(b, 1, -1) for b in (bx, by, bz)]
    ext0 = np.where(origin_close[:, None], np.stack([x0, y0, z0], 1), np.stack(o0, 1))
    ext1 = np.where(origin_close[:, None], np.stack([x1, y1, z1], 1), np.stack(o1, 1))
    return ext0, ext1


def _high_extras(xi, yi, zi, in_sum):
    """The two extra vertices of the (1,1,1) tetrahedron, as ``_noise3`` chooses them."""
    a_pt, a_sc, b_pt, b_sc = np.full(xi.shape, 6), xi.copy(), np.full(xi.shape, 5), yi.copy()
    to_b = (a_sc <= b_sc) & (zi < b_sc)
    to_a = ~to_b & (a_sc > b_sc) & (zi < a_sc)
    b_sc, b_pt = np.where(to_b, zi, b_sc), np.where(to_b, 3, b_pt)
    a_sc, a_pt = np.where(to_a, zi, a_sc), np.where(to_a, 3, a_pt)
    wins = 3 - in_sum
    corner_close = (wins < a_sc) | (wins < b_sc)
    c = np.where(corner_close, np.where(b_sc < a_sc, b_pt, a_pt), a_pt & b_pt)
    bx, by, bz = _bit(c, 1), _bit(c, 2), _bit(c, 4)
    x0, x1 = np.where(bx, 2, 0), np.where(bx, 1, 0)
    y0 = np.where(by, np.where(bx, 1, 2), 0)
    y1 = np.where(by, np.where(bx, 2, 1), 0)
    z0, z1 = np.where(bz, 1, 0), np.where(bz, 2, 0)
    o0 = [np.where(b, 1, 0) for b in (bx, by, bz)]
    o1 = [np.where(b, 2, 0) for b in (bx, by, bz)]
    ext0 = np.where(corner_close[:, None], np.stack([x0, y0, z0], 1), np.stack(o0, 1))
    ext1 = np.where(corner_close[:, None], np.stack([x1, y1, z1], 1), np.stack(o1, 1))
    return ext0, ext1


def _middle_extras(xi, yi, zi):
    """The two extra vertices of the octahedron, as ``_noise3`` chooses them."""
    p1, p2, p3 = xi + yi, xi + zi, yi + zi
    a_far, b_far = p1 > 1, p2 > 1
    a_sc, a_pt = np.where(a_far, p1 - 1, 1 - p1), np.where(a_far, 3, 4)
    b_sc, b_pt = np.where(b_far, p2 - 1, 1 - p2), np.where(b_far, 5, 2)
    far3 = p3 > 1
    score = np.where(far3, p3 - 1, 1 - p3)
    to_a = (a_sc <= b_sc) & (a_sc < score)
    to_b = ~to_a & (a_sc > b_sc) & (b_sc < score)
    a_pt, a_far = np.where(to_a, np.where(far3, 6, 1), a_pt), np.where(to_a, far3, a_far)
    b_pt, b_far = np.where(to_b, np.where(far3, 6, 1), b_pt), np.where(to_b, far3, b_far)
    same = (a_far == b_far)[:, None]
    both_far = a_far[:, None]
    ext0_same = np.where(both_far, (1, 1, 1), (0, 0, 0))
    ext1_same = np.where(both_far, _two_on_axis(a_pt & b_pt), _axis_vertex(a_pt | b_pt))
    c1, c2 = np.where(a_far, a_pt, b_pt), np.where(a_far, b_pt, a_pt)
    ext0 = np.where(same, ext0_same, _axis_vertex(c1))
    ext1 = np.where(same, ext1_same, _two_on_axis(c2))
    return ext0, ext1


def noise3_vectorised(x: np.ndarray, y: np.ndarray, z: np.ndarray, perm: np.ndarray,
                      perm_grad_index3: np.ndarray) -> np.ndarray:
    """OpenSimplex ``noise3`` at points (``x``, ``y``, ``z`` of one shape), all at once in numpy, float64.

    The scalar kernel (``opensimplex``'s ``_noise3``, the official numba port's algorithm) visits, per point, the
    4 or 6 vertices of its region of the super-cell plus two extra vertices chosen by branches, and sums
    ``max(0, 2 - |d|²)⁴ · (g · d)`` over them. The same vertices are chosen here with array masks, so the values
    equal the scalar kernel's up to float64 rounding (~1e-16).
    """
    from opensimplex.constants import GRADIENTS3, NORM_CONSTANT3, SQUISH_CONSTANT3, STRETCH_CONSTANT3

    shape = np.shape(x)
    x, y, z = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (x, y, z))
    stretch = (x + y + z) * STRETCH_CONSTANT3
    xs, ys, zs = x + stretch, y + stretch, z + stretch
    base = np.stack([np.floor(xs), np.floor(ys), np.floor(zs)], 1).astype(np.int64)  # super-cell origin
    xi, yi, zi = xs - base[:, 0], ys - base[:, 1], zs - base[:, 2]
    in_sum = xi + yi + zi
    points = np.stack([x, y, z], 1)
    gradients = GRADIENTS3.astype(np.float64)

    def contribution(offset: np.ndarray) -> np.ndarray:
        vertex = base + offset  # (N, 3) lattice vertex
        d = points - (vertex + vertex.sum(1, keepdims=True) * SQUISH_CONSTANT3)
        attn = np.maximum(2 - (d * d).sum(1), 0.0)
        vx, vy, vz = (vertex[:, i] for i in range(3))
        index = perm_grad_index3[(perm[(perm[vx & 0xFF] + vy) & 0xFF] + vz) & 0xFF]
        dot = gradients[index] * d[:, 0] + gradients[index + 1] * d[:, 1] + gradients[index + 2] * d[:, 2]
        return attn ** 2 * attn ** 2 * dot

    low, high = in_sum <= 1, ~(in_sum <= 1) & (in_sum >= 2)
    middle = ~low & ~high
    regions = {"low": low, "high": high, "middle": middle}
    value = np.zeros_like(x)
    for name, vertices in _REGION_VERTICES.items():
        for vertex in vertices:
            value += np.where(regions[name], contribution(np.asarray(vertex)), 0.0)
    extras = [_low_extras(xi, yi, zi, in_sum), _high_extras(xi, yi, zi, in_sum), _middle_extras(xi, yi, zi)]
    for k in range(2):
        offset = np.where(low[:, None], extras[0][k], np.where(high[:, None], extras[1][k], extras[2][k]))
        value += contribution(offset)
    return (value / NORM_CONSTANT3).reshape(shape)


def octave_noise3(shape: Sequence[int], seed: int, octaves: int = 6, persistence: float = 0.6,
                  frequency: float = 32.0) -> np.ndarray:
    """Fractal OpenSimplex noise of ``shape`` = (C, H, W) as float64, as AnoDDPM's ``rand_3d_octaves``.

    All octaves are evaluated in one vectorised call (:func:`noise3_vectorised`); :func:`octave_noise3_scalar` is
    the same sum point by point through ``opensimplex`` (pure Python without numba: ~100× slower).

    Args:
        shape: (channels, rows, cols); channel, row and column indices are the z, y and x coordinates.
        seed: OpenSimplex seed (any Python int; it is wrapped to 64 bits as in the official port).
        octaves: number of octaves summed.
        persistence: amplitude factor per octave.
        frequency: divisor of the coordinates in the first octave; halved every octave.
    """
    from opensimplex import OpenSimplex

    generator = OpenSimplex(int(seed))
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")  # each (C, H, W)
    divisors = frequency / 2.0 ** np.arange(octaves)  # frequency halves every octave
    amplitudes = persistence ** np.arange(octaves, dtype=np.float64)
    d = divisors.reshape(-1, 1, 1, 1)
    per_octave = noise3_vectorised(x / d, y / d, z / d, generator._perm, generator._perm_grad_index3)
    # the same left-to-right accumulation as the scalar loop
    noise = np.zeros(tuple(shape), dtype=np.float64)
    for amplitude, layer in zip(amplitudes, per_octave):
        noise += amplitude * layer
    return noise


def octave_noise3_scalar(shape: Sequence[int], seed: int, octaves: int = 6, persistence: float = 0.6,
                         frequency: float = 32.0) -> np.ndarray:
    """:func:`octave_noise3` point by point through ``opensimplex.noise3array`` (the reference it is tested on)."""
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
        return self.batch(image.unsqueeze(0))[0]

    def batch(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images → noisy copies on their device, equal to calling this object image by image.

        The random draws stay per image in the official order (box, then the fresh seed), so the numpy stream is
        the same; only the noise itself is computed vectorised and added to the batch in one copy.
        """
        _, channels, height, width = images.shape
        noisy = images.clone()
        for i in range(images.shape[0]):
            y0, x0, h, w = self.box(height, width)
            noise = torch.from_numpy(self.scale * self.patch(channels, h, w)).to(images.dtype)  # (C, h, w)
            noisy[i, :, y0:y0 + h, x0:x0 + w] += noise.to(images.device, non_blocking=True)
        return noisy
