"""LyCORIS files (LoCon, LoHa, LoKr, DoRA): what their keys mean, checked, and turned into deltas.

A kohya/LyCORIS file names one stem per target module (``lora_unet_<module>``) and the stem's
suffixes say the algorithm. The delta each algorithm adds to a layer's weight W (out, in, *kernel),
as LyCORIS trains it (``lycoris-lora``'s module ``forward``; tests compare against it):

- LoRA/LoCon: scale * up @ down; LoCon's Tucker form has a 1x1 down, a kernel-sized ``mid`` and a
  1x1 up, which fold into one kernel-sized down (a convolution of convolutions is one convolution).
- LoHa: scale * (w1a @ w1b) * (w2a @ w2b) (Hadamard product); Tucker: each half rebuilt from
  t (r, r, *kernel) with w_a (r, out) and w_b (r, in).
- LoKr: scale * kron(w1, w2), w1 full or w1a @ w1b, w2 full, w2a @ w2b or Tucker (t2, w2a, w2b).
- scale = alpha / rank (rank: w1b's for LoHa, the factorized half's for LoKr; 1 for a LoKr of
  two full factors, which LyCORIS trains at scale 1 whatever its alpha).
- DoRA (``dora_scale`` m): the adapted weight W + dW is renormalised per output channel (or per
  input channel when m has shape (1, in, ...)): W' = m * (W + dW) / ||W + dW||. cmlora's delta is
  D = W' - W; a strength s applies W + s * D (s = 1 is DoRA exactly; see README for merge).

Non-DoRA LoHa and LoKr deltas are products of low-rank factors too, of rank r1 * r2
((A1 B1) * (A2 B2) = (A1 x A2)(B1 x B2) row- and column-wise; kron(U1 V1, U2 V2) =
kron(U1, U2) kron(V1, V2)), so each layer keeps whichever of that factor pair and the dense delta
holds fewer numbers: the cost is bounded by the layer's weight size, and low-rank layers run
through the same machinery as LoRAs (fusing, per-row calls, stacked selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoRAFileError

KOHYA_SUFFIXES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "dora_scale": (None, "dora_scale"),
}
"""Suffix of a kohya/LyCORIS key -> (algorithm, role); ``alpha`` is read apart."""
_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
_SUFFIX_OF = {(kind, role): suffix for suffix, (kind, role) in KOHYA_SUFFIXES.items()}
MAX_FACTOR_RANK = 4096
_PARTNER = {"w1a": "w1b", "w1b": "w1a", "w2a": "w2b", "w2b": "w2a", "t1": "t2", "t2": "t1", "up": "down"}


def _suffixes(kind: str) -> str:
    return ", ".join(s for s, (k, _) in KOHYA_SUFFIXES.items() if k == kind)


def parse_kohya_stem(
    path: Path, stem: str, suffixes: dict[str, str], tensors: dict[str, torch.Tensor]
) -> tuple[str, dict[str, str], str | None] | None:
    """One stem's keys -> (algorithm, role -> key, alpha key), or None when the stem holds no
    factor key (its keys are then refused as left over). Every missing half names the key present."""
    roles: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for suffix, key in sorted(suffixes.items()):
        if suffix == "alpha":
            continue
        entry = KOHYA_SUFFIXES.get(suffix)
        if entry is None:
            if suffix.startswith(("hada_", "lokr_")):
                kind = "loha" if suffix.startswith("hada_") else "lokr"
                raise LoRAFileError(
                    path,
                    f"unknown LyCORIS {_NAMES[kind]} key suffix {suffix!r}; a {_NAMES[kind]} module has "
                    f"{_suffixes(kind)} (and alpha, dora_scale)",
                    key=key,
                )
            continue
        kind, role = entry
        if kind is not None:
            kinds.setdefault(kind, key)
        roles[role] = key
    if not kinds:
        return None
    if len(kinds) > 1:
        names = " and ".join(_NAMES[k] for k in sorted(kinds))
        raise LoRAFileError(
            path,
            f"one module mixes {names} keys: a module holds one algorithm",
            key=sorted(kinds.values())[-1],
        )
    (kind,) = kinds
    _check_halves(path, kind, roles)
    return kind, roles, suffixes.get("alpha")


def _check_halves(path: Path, kind: str, roles: dict[str, str]) -> None:
    def need(role: str, because: str, message: str | None = None) -> None:
        if role not in roles:
            suffix = _SUFFIX_OF[(kind, role)]
            partner = roles.get(_PARTNER.get(role, ""))  # name the other half of the pair
            raise LoRAFileError(
                path,
                message or f"LyCORIS {_NAMES[kind]} module without its {suffix}: {because}",
                key=partner or roles[_present(roles)],
            )

    if kind == "lora":
        if "down" not in roles:
            raise LoRAFileError(path, "lora_up without its lora_down", key=roles[_present(roles)])
        need("up", "", "lora_down without its lora_up")
        return
    if kind == "loha":
        for role in ("w1a", "w1b", "w2a", "w2b"):
            need(role, "every LoHa module needs hada_w1_a/hada_w1_b and hada_w2_a/hada_w2_b")
        if ("t1" in roles) != ("t2" in roles):
            need("t1", "a Tucker LoHa needs both hada_t1 and hada_t2")
            need("t2", "a Tucker LoHa needs both hada_t1 and hada_t2")
        return
    for half in ("1", "2"):
        full, a, b = f"w{half}", f"w{half}a", f"w{half}b"
        if full in roles and (a in roles or b in roles):
            raise LoRAFileError(
                path,
                f"LoKr module has both lokr_w{half} and lokr_w{half}_a/_b: one of the two forms",
                key=roles[a if a in roles else b],
            )
        if full not in roles:
            why = f"a LoKr half is lokr_w{half} or the pair lokr_w{half}_a/lokr_w{half}_b"
            need(a, why)
            need(b, why)
    if "t2" in roles and "w2a" not in roles:
        raise LoRAFileError(path, "lokr_t2 (Tucker) needs lokr_w2_a/lokr_w2_b, not lokr_w2", key=roles["t2"])


def _present(roles: dict[str, str]) -> str:
    return next(r for r in roles if r != "dora_scale") if len(roles) > 1 else next(iter(roles))


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Implied:
    """The delta shape a module's factors imply: out channels, inputs per output (in x kernel
    elements), and the kernel when the factors say it (flattened LoHa/LoKr factors do not)."""

    out: int
    fan_in: int
    kernel: tuple[int, ...] | None


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_factors(path: Path, kind: str, held: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
    """Shapes inside one module (ranks agree, Kronecker factors are matrices, Tucker cores square
    with their factors), from shapes alone: raises naming the key at fault."""

    def fail(role: str, message: str) -> None:
        raise LoRAFileError(path, message, key=roles[role])

    def dims(role: str, allowed: tuple[int, ...]) -> torch.Tensor:
        t = held[role]
        if t.dim() not in allowed:
            fail(role, f"{_SUFFIX_OF[(kind, role)]} has shape {_shape(t)}; expected {allowed} dimensions")
        if any(d == 0 for d in t.shape):
            fail(role, f"{_SUFFIX_OF[(kind, role)]} has an empty dimension: {_shape(t)}")
        return t

    def rank_ok(role: str, rank: int) -> None:
        if not 0 < rank <= MAX_FACTOR_RANK:
            fail(role, f"rank {rank} is outside 1..{MAX_FACTOR_RANK}")

    if kind == "lora":
        if "mid" in held:
            down, mid, up = held["down"], dims("mid", (4,)), held["up"]
            if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
                fail("down", f"with lora_mid (Tucker) lora_down must be 1x1, got {_shape(down)}")
            if tuple(mid.shape[:2]) != (up.shape[1], down.shape[0]):
                fail(
                    "mid",
                    f"lora_mid {_shape(mid)} does not chain lora_down {_shape(down)} to lora_up {_shape(up)}",
                )
    elif kind == "loha":
        tucker = "t1" in held
        for half in ("1", "2"):
            a, b = dims(f"w{half}a", (2,)), dims(f"w{half}b", (2,) if tucker else (2, 4))
            if tucker:
                t = dims(f"t{half}", (3, 4, 5))
                if tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
                    fail(
                        f"t{half}",
                        f"hada_t{half} {_shape(t)} does not match hada_w{half}_a {_shape(a)} and hada_w{half}_b {_shape(b)} (expects (r, r', *kernel) with w_a (r, out), w_b (r', in))",
                    )
            elif a.shape[1] != b.shape[0]:
                fail(
                    f"w{half}a",
                    f"ranks do not match: hada_w{half}_a {_shape(a)} vs hada_w{half}_b {_shape(b)}",
                )
            rank_ok(f"w{half}b", b.shape[0])
        one, two = implied_half_loha(held, "1"), implied_half_loha(held, "2")
        if one != two:
            fail("w2a", f"the two Hadamard halves imply different deltas: {one} vs {two}")
    else:
        w1 = held.get("w1")
        if w1 is not None:
            dims("w1", (2,))
        else:
            a, b = dims("w1a", (2,)), dims("w1b", (2,))
            if a.shape[1] != b.shape[0]:
                fail("w1a", f"ranks do not match: lokr_w1_a {_shape(a)} vs lokr_w1_b {_shape(b)}")
            rank_ok("w1b", b.shape[0])
        if "w2" in held:
            dims("w2", (2, 3, 4, 5))
        elif "t2" in held:
            a, b, t = dims("w2a", (2,)), dims("w2b", (2,)), dims("t2", (3, 4, 5))
            if tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
                fail(
                    "t2",
                    f"lokr_t2 {_shape(t)} does not match lokr_w2_a {_shape(a)} and lokr_w2_b {_shape(b)} (expects (r, r', *kernel) with w2_a (r, out), w2_b (r', in))",
                )
            rank_ok("w2b", b.shape[0])
        else:
            a, b = dims("w2a", (2,)), dims("w2b", (2, 4))
            if a.shape[1] != b.shape[0]:
                fail("w2a", f"ranks do not match: lokr_w2_a {_shape(a)} vs lokr_w2_b {_shape(b)}")
            rank_ok("w2b", b.shape[0])
        if "w1b" in held and "w2b" in held and held["w1b"].shape[0] != held["w2b"].shape[0]:
            fail(
                "w2b",
                f"lokr_w1_b and lokr_w2_b have ranks {held['w1b'].shape[0]} and {held['w2b'].shape[0]}: alpha's scale (alpha / rank) would be ambiguous",
            )
    if "dora_scale" in held:
        dims_ok = held["dora_scale"].dim() in (1, 2, 3, 4, 5)
        if not dims_ok:
            fail("dora_scale", f"dora_scale has shape {_shape(held['dora_scale'])}")


def implied_half_loha(held: dict[str, torch.Tensor], half: str) -> Implied:
    a, b = held[f"w{half}a"], held[f"w{half}b"]
    if f"t{half}" in held:
        t = held[f"t{half}"]
        kernel = tuple(t.shape[2:])
        return Implied(a.shape[1], b.shape[1] * math.prod(kernel), kernel)
    kernel = tuple(b.shape[2:]) if b.dim() == 4 else None
    return Implied(a.shape[0], b[0].numel(), kernel)


def implied(kind: str, held: dict[str, torch.Tensor]) -> Implied:
    """The (out, fan-in, kernel) of the delta a module's factors build."""
    if kind == "lora":
        down, up = held["down"], held["up"]
        if "mid" in held:
            kernel = tuple(held["mid"].shape[2:])
            return Implied(up.shape[0], down.shape[1] * math.prod(kernel), kernel)
        kernel = tuple(down.shape[2:]) if down.dim() == 4 else None
        return Implied(up.shape[0], down[0].numel(), kernel)
    if kind == "loha":
        return implied_half_loha(held, "1")
    w1 = held.get("w1")
    a, c = (w1.shape[0], w1.shape[1]) if w1 is not None else (held["w1a"].shape[0], held["w1b"].shape[1])
    if "w2" in held:
        w2 = held["w2"]
        b, fan, kernel = w2.shape[0], w2[0].numel(), (tuple(w2.shape[2:]) if w2.dim() > 2 else None)
    elif "t2" in held:
        kernel = tuple(held["t2"].shape[2:])
        b, fan = held["w2a"].shape[1], held["w2b"].shape[1] * math.prod(kernel)
    else:
        w2b = held["w2b"]
        b, fan, kernel = (
            held["w2a"].shape[0],
            w2b[0].numel(),
            (tuple(w2b.shape[2:]) if w2b.dim() == 4 else None),
        )
    return Implied(a * b, c * fan, kernel)


def alpha_rank(kind: str, held: dict[str, torch.Tensor]) -> int | None:
    """The rank alpha divides by (see the module docstring)."""
    if kind == "lora":
        return int(held["down"].shape[0])
    if kind == "loha":
        return int(held["w1b"].shape[0])
    if "w1b" in held:
        return int(held["w1b"].shape[0])
    if "w2b" in held:
        return int(held["w2b"].shape[0])
    return None


def check_layer(path: Path, entry, layer: torch.nn.Module, name: str) -> None:
    """The module's delta (and its ``dora_scale``) fit ``layer``'s weight: raises naming the key."""
    weight_shape = tuple(layer.weight.shape)
    out, fan_in, kernel = weight_shape[0], math.prod(weight_shape[1:]), tuple(weight_shape[2:])
    conv = isinstance(layer, torch.nn.Conv2d)
    if entry.kind != "lora" or "mid" in entry.tensors:
        got = implied(entry.kind, entry.tensors)
        ok = got.out == out and got.fan_in == fan_in and (not conv or layer.groups == 1)
        if got.kernel is not None and got.kernel != kernel and not (not conv and set(got.kernel) <= {1}):
            ok = False
        if not ok:
            kernel_text = "" if got.kernel is None else f", kernel {list(got.kernel)}"
            raise LoRAFileError(
                path,
                f"the {_NAMES[entry.kind]} factors build a delta of {got.out} outputs x {got.fan_in} inputs"
                f"{kernel_text}, which does not fit layer {name} (weight {list(weight_shape)}"
                f"{', grouped' if conv and layer.groups != 1 else ''}): the file was made for another "
                "base model, or its Kronecker/Hadamard factors have wrong shapes",
                key=entry.source,
            )
    scale = entry.tensors.get("dora_scale")
    if scale is not None and dora_axis(tuple(scale.shape), weight_shape) is None:
        ones = ", 1" * (len(weight_shape) - 1)
        raise LoRAFileError(
            path,
            f"dora_scale has shape {list(scale.shape)} ({scale.numel()} values); layer {name} "
            f"(weight {list(weight_shape)}) needs one magnitude per output channel, shape "
            f"({out}{ones}), or per input channel, (1, {weight_shape[1]}{', 1' * (len(weight_shape) - 2)})",
            key=entry.sources["dora_scale"],
        )


def dora_axis(scale: tuple[int, ...], weight: tuple[int, ...]) -> int | None:
    """0 when ``dora_scale`` holds one magnitude per output channel (LyCORIS' default,
    ``wd_on_out``), 1 per input channel, None when its shape fits neither."""
    if len(scale) > len(weight):
        return None
    padded = scale + (1,) * (len(weight) - len(scale))
    if padded == (weight[0],) + (1,) * (len(weight) - 1):
        return 0
    if len(scale) >= 2 and padded == (1, weight[1]) + (1,) * (len(weight) - 2):
        return 1
    return None


# --------------------------------------------------------------------------- deltas


@dataclass(frozen=True)
class Factors:
    """A delta as ``scale * up @ down`` (down carries the layer's kernel on a convolution)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Dense:
    """A delta materialised in the layer's weight shape (scale already applied)."""

    weight: torch.Tensor


def layer_delta(entry, layer: torch.nn.Module) -> Factors | Dense:
    """The delta ``entry`` adds to ``layer`` (checked by ``check_layer``), in the cheaper of its
    low-rank and dense forms; DoRA deltas are dense (they rescale the whole weight). Plain LoRA
    factors are passed through as read, so plain LoRAs behave exactly as before LyCORIS support."""
    held, kind = entry.tensors, entry.kind
    if kind == "lora" and "mid" not in held and "dora_scale" not in held:
        return Factors(held["down"], held["up"], entry.scale)
    weight = layer.weight
    dtype = torch.promote_types(
        torch.promote_types(weight.dtype, torch.float32), held[entry_role(entry)].dtype
    )
    shape = tuple(weight.shape)
    t = {role: tensor.to(device=weight.device, dtype=dtype) for role, tensor in held.items()}
    if "dora_scale" in held:
        delta = _dense(kind, t, shape) * entry.scale
        return Dense(dora_delta(weight.detach().to(dtype), delta, t["dora_scale"]))
    up, down = _low_rank(kind, t)
    fan_in = math.prod(shape[1:])
    if up.shape[1] * (shape[0] + fan_in) < shape[0] * fan_in:
        return Factors(down.reshape(down.shape[0], *shape[1:]), up, entry.scale)
    return Dense(_dense(kind, t, shape) * entry.scale)


def entry_role(entry) -> str:
    return next(role for role in entry.tensors if role != "dora_scale")


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: t (r, r', *k), wa (r, out), wb (r', in) -> (out, in, *k)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def _dense(kind: str, t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The unscaled delta, computed as LyCORIS computes it, in the layer's weight shape."""
    if kind == "lora":
        down = _folded_down(t)
        return (t["up"].reshape(t["up"].shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
    if kind == "loha":
        halves = []
        for half in ("1", "2"):
            a, b = t[f"w{half}a"], t[f"w{half}b"]
            if f"t{half}" in t:
                halves.append(_tucker(t[f"t{half}"], a, b).reshape(shape))
            else:
                halves.append((a @ b.reshape(b.shape[0], -1)).reshape(shape))
        return halves[0] * halves[1]
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    return torch.kron(w1.contiguous(), _lokr_w2(t).contiguous()).reshape(shape)


def _lokr_w2(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "w2" in t:
        return t["w2"].reshape(t["w2"].shape[0], -1)
    if "t2" in t:
        rebuilt = _tucker(t["t2"], t["w2a"], t["w2b"])
        return rebuilt.reshape(rebuilt.shape[0], -1)
    return t["w2a"] @ t["w2b"].reshape(t["w2b"].shape[0], -1)


def _folded_down(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoCon Tucker: the 1x1 down, then the kernel-sized mid, as one kernel-sized down."""
    if "mid" not in t:
        return t["down"]
    down = t["down"].reshape(t["down"].shape[0], -1)
    return torch.einsum("ij...,jc->ic...", t["mid"], down)


def _pair(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as U @ V of the smaller inner size (one of the two is an identity)."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype, device=matrix.device)


def _low_rank(kind: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with the delta = up @ down (down flattened to (rank, fan-in))."""
    if kind == "lora":
        down = _folded_down(t)
        return t["up"].reshape(t["up"].shape[0], -1), down.reshape(down.shape[0], -1)
    if kind == "loha":
        ups, downs = [], []
        for half in ("1", "2"):
            a, b = t[f"w{half}a"], t[f"w{half}b"]
            if f"t{half}" in t:  # up (out, r), down (r, in * k): the core folded into down
                core = t[f"t{half}"]
                ups.append(a.T)
                downs.append(torch.einsum("ij...,jc->ic...", core, b).reshape(core.shape[0], -1))
            else:
                ups.append(a)
                downs.append(b.reshape(b.shape[0], -1))
        # (A1 B1) * (A2 B2) = (row-wise A1 x A2) @ (column-wise B1 x B2): rank r1 * r2
        up = (ups[0][:, :, None] * ups[1][:, None, :]).flatten(1)
        down = (downs[0][:, None, :] * downs[1][None, :, :]).flatten(0, 1)
        return up, down
    if "w1" in t:
        u1, v1 = _pair(t["w1"])
    else:
        u1, v1 = t["w1a"], t["w1b"]
    if "w2" in t:
        u2, v2 = _pair(t["w2"].reshape(t["w2"].shape[0], -1))
    elif "t2" in t:
        core = t["t2"]
        u2 = t["w2a"].T
        v2 = torch.einsum("ij...,jc->ic...", core, t["w2b"]).reshape(core.shape[0], -1)
    else:
        u2, v2 = t["w2a"], t["w2b"].reshape(t["w2b"].shape[0], -1)
    # torch.kron refuses some non-contiguous operands (a transposed w2_a)
    return torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(v1.contiguous(), v2.contiguous())


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """D = m * (W + dW) / ||W + dW|| - W, the norm per output channel (or per input channel, as
    ``magnitude``'s shape says), with LyCORIS' epsilon, so W + D is LyCORIS' merged DoRA weight."""
    adapted = weight + delta
    axis = dora_axis(tuple(magnitude.shape), tuple(weight.shape))
    moved = adapted.transpose(0, 1) if axis == 1 else adapted
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1) + torch.finfo(adapted.dtype).eps
    shape = [1] * adapted.dim()
    shape[axis] = -1
    m = magnitude.reshape(shape)
    return adapted * (m / norm.reshape(shape)) - weight
