"""Orthogonal matrices for rotations: Hadamard matrices by construction and seeded random rotations.

Pure tensor math (float64, CPU), kept apart from ``rotation`` (which fuses them into models): the choice of
matrix is what QuIP / QuaRot / SpinQuant vary, the fusion is not. Hadamard orders built here: 2^k (Sylvester),
12·2^k and 144·2^k (Kronecker products with Paley's order-12 matrix; SmolLM2's 576 = 144·4).
"""

from __future__ import annotations

import torch


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _paley12() -> torch.Tensor:
    """Hadamard matrix of order 12 by Paley's first construction over GF(11) (11 ≡ 3 mod 4)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return skew + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 matrix H with H·Hᵀ = n·I for n = 2^k, 12·2^k or 144·2^k (Kronecker products), else None."""
    for base, paley_factors in ((1, 0), (12, 1), (144, 2)):
        power = n // base
        if n % base == 0 and power & (power - 1) == 0:
            matrix = _sylvester(power)
            for _ in range(paley_factors):
                matrix = torch.kron(_paley12(), matrix)
            return matrix
    return None


def random_rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """An n×n orthogonal matrix (float64): random-signed Hadamard where ``kind`` is ``hadamard`` and a
    construction exists, otherwise the Q of a Gaussian matrix's QR (signs fixed so the draw is uniform)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = hadamard(n) if kind == "hadamard" else None
    if matrix is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return matrix * signs / n**0.5
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))
