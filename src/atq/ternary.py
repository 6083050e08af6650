"""The two representations of a ternary weight (DESIGN rule 2): ``TernaryTensor`` for math (int8 codes and
float scales, what quantizers, solvers and exports compute with) and ``PackedTernary`` for storage (packed codes
and fp16 scales, what layers hold, kernels read and artifacts store).

Every granularity is stored the same way, as groups along the input dimension: a per-tensor scale is one group
spanning a whole (flattened) tensor, a per-row scale is one group per row, and group scales split each row into
``ceil(in_features / group_size)`` groups whose last one may be shorter. A single layout keeps dequantize,
packing, kernels and export free of per-granularity branches.

Several trit-planes (W ≈ Σ_k α_k·T_k, PTQTP) add a leading plane dimension to codes and scales; one plane is
stored without it, so the common case stays a plain (out, in) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import check_packed, pack, packed_bytes, unpack

SCALE_DTYPE = torch.float16  # scales are stored (and used by the kernels) in fp16: what the artifact holds


@dataclass
class TernaryTensor:
    """codes: int8 ([planes,] out, in) in {-1, 0, 1}; scales: float ([planes,] 1 or out, n_groups).

    ``scales.shape[-2] == 1`` means one scale row shared by all output rows (per-tensor scale). Only what every
    algorithm needs lives here: a quantizer's thresholds and GPTQ's pre-rounding values are returned beside
    the tensor by the code that makes them.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        if self.codes.dim() not in (2, 3):
            raise ValueError(
                f"TernaryTensor codes must be (out, in) or (planes, out, in), got shape {tuple(self.codes.shape)}"
            )
        if self.codes.dtype != torch.int8:
            raise ValueError(f"TernaryTensor codes must be int8, got {self.codes.dtype}")
        out_features, in_features = self.codes.shape[-2:]
        expected_groups = -(-in_features // self.group_size)
        if self.scales.dim() != self.codes.dim() or self.scales.shape[:-2] != self.codes.shape[:-2] or (
            self.scales.shape[-2] not in (1, out_features) or self.scales.shape[-1] != expected_groups
        ):
            raise ValueError(
                f"TernaryTensor scales shape {tuple(self.scales.shape)} does not fit codes {tuple(self.codes.shape)}"
                f" with group_size {self.group_size} (expected (1 or {out_features}, {expected_groups})"
                " with the same leading plane dimension)"
            )

    @property
    def shape(self) -> torch.Size:
        """The weight's (out, in) shape, whatever the number of planes."""
        return self.codes.shape[-2:]

    @property
    def planes(self) -> int:
        return self.codes.shape[0] if self.codes.dim() == 3 else 1

    @property
    def n_groups(self) -> int:
        return self.scales.shape[-1]

    def expanded_scales(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scales broadcast to (1 or out, in): each input column gets its group's scale."""
        scales = self.scales if dtype is None else self.scales.to(dtype)
        return expand_group_scales(scales, self.group_size, self.codes.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(self.codes, self.scales, self.group_size, dtype)

    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero (all planes zero)."""
        codes = self.codes if self.codes.dim() == 2 else self.codes.abs().sum(0)
        return float((codes == 0).float().mean())


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ_planes codes · scales (each column its group's scale) as a dense (out, in) weight in ``dtype``."""
    dense = codes.to(dtype) * expand_group_scales(scales.to(dtype), group_size, codes.shape[-1])
    return dense.sum(0) if dense.dim() == 3 else dense


def expand_group_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat each group's scale over its columns (a short last group only over the columns it has).

    Built from expanded views joined by ``cat`` rather than a cut ``repeat_interleave`` or a gather: those
    compiled to wrong values or failed in the backward under torch.compile on the CPU (tests/test_qat.py's
    compiled-blocks test guards this form)."""
    full, rest = divmod(in_features, group_size)
    lead = scales.shape[:-1]
    parts = [scales[..., :full, None].expand(*lead, full, group_size).flatten(-2)] if full else []
    if rest:
        parts.append(scales[..., full : full + 1].expand(*lead, rest))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


@dataclass
class PackedTernary:
    """The storage-side weight: packed codes + fp16 scales and everything needed to read them back.

    One type flows from the layer to the kernels, the artifact (``metadata``) and the exports (``ternary``),
    so no caller handles raw buffers. ``packed``: uint8 ([planes,] out, bytes) in ``packing`` (packing.py);
    ``scales``: fp16 ([planes,] 1 or out, groups).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int
    packing: str = "2bit"

    def __post_init__(self) -> None:
        expected = packed_bytes(self.in_features, self.packing)
        if self.packed.dtype != torch.uint8 or self.packed.dim() not in (2, 3) or self.packed.shape[-1] != expected:
            raise ValueError(f"PackedTernary: packed {self.packed.dtype} {tuple(self.packed.shape)} does not hold "
                             f"{self.in_features} trits a row in {self.packing!r} packing ({expected} bytes)")
        groups = -(-self.in_features // self.group_size)
        if (self.scales.dim() != self.packed.dim() or self.scales.shape[:-2] != self.packed.shape[:-2]
                or self.scales.shape[-2] not in (1, self.packed.shape[-2]) or self.scales.shape[-1] != groups):
            raise ValueError(f"PackedTernary: scales {tuple(self.scales.shape)} do not fit packed "
                             f"{tuple(self.packed.shape)} with group_size {self.group_size} ({groups} groups)")

    @classmethod
    def pack(cls, tensor: TernaryTensor, packing: str = "2bit") -> PackedTernary:
        return cls(pack(tensor.codes, packing), tensor.scales.to(SCALE_DTYPE), tensor.group_size,
                   tensor.shape[1], packing)

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, scale_rows: int, planes: int = 1,
              packing: str = "2bit", device: torch.device | str | None = None) -> PackedTernary:
        """All-zero codes and scales of the given shape: the frame an artifact's tensors are loaded into."""
        lead = (planes,) if planes > 1 else ()
        # every byte of all-zero codes is the same (each digit stores 0 + 1); built without reading a tensor, so
        # it also works on the meta device transformers builds skeletons on
        zero_byte = {"2bit": 0b01010101, "base3": 1 + 3 + 9 + 27 + 81}[packing]
        packed = torch.full((*lead, out_features, packed_bytes(in_features, packing)), zero_byte, dtype=torch.uint8,
                            device=device)
        scales = torch.zeros(*lead, scale_rows, -(-in_features // group_size), dtype=SCALE_DTYPE, device=device)
        return cls(packed, scales, group_size, in_features, packing)

    @property
    def shape(self) -> torch.Size:
        """The weight's (out, in) shape."""
        return torch.Size((self.packed.shape[-2], self.in_features))

    @property
    def planes(self) -> int:
        return self.packed.shape[0] if self.packed.dim() == 3 else 1

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def ternary(self) -> TernaryTensor:
        return TernaryTensor(unpack(self.packed, self.in_features, self.packing), self.scales.float(),
                             self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(unpack(self.packed, self.in_features, self.packing), self.scales, self.group_size, dtype)

    def nbytes(self) -> int:
        """Bytes the weight occupies in an artifact: packed codes plus scales."""
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()

    def metadata(self) -> dict[str, int | str]:
        """Everything but the tensors, JSON-safe: with ``from_metadata`` it rebuilds the frame to load into."""
        out_features, in_features = self.shape
        return {"out_features": out_features, "in_features": in_features, "group_size": self.group_size,
                "scale_rows": self.scales.shape[-2], "planes": self.planes, "packing": self.packing}

    @classmethod
    def from_metadata(cls, meta: dict[str, int | str], device: torch.device | str | None = None) -> PackedTernary:
        return cls.empty(int(meta["out_features"]), int(meta["in_features"]), int(meta["group_size"]),
                         int(meta["scale_rows"]), int(meta["planes"]), str(meta["packing"]), device)

    def check(self, name: str = "packed") -> None:
        """Raise if the codes hold values no packing produces (signs of a corrupted file)."""
        check_packed(self.packed, self.in_features, name=name, packing=self.packing)
