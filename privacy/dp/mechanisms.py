"""Laplace and Gaussian noise on a power-of-two grid, sampled by OpenDP.

Why OpenDP and never ``x + numpy.random.laplace(...)``: a float sampler leaks the true
value through the low bits of its output (Mironov, CCS 2012): for a released z, whole
sets of floats are reachable from one input and impossible from another, an unbounded
privacy loss on a single answer (reproduced in ``notes/PRIVACY.md`` §7: 80% of outputs
identify the input with certainty). OpenDP samples the *discrete* Laplace / Gaussian
exactly (CKS20), with OpenSSL's CSPRNG, on the grid of multiples of ``2**k``; the input
is first rounded to that grid and OpenDP's privacy map charges the rounding.

The release pipeline for one output tensor of ``rows x width`` elements:

1. **clamp** each element to the policy's ``[lower, upper]`` (NaN becomes the midpoint:
   any fixed in-range value keeps the guarantee). This is what fixes the sensitivity:
   a row may change arbitrarily (a different model, a training record more or less)
   and still moves by at most L1 ``width*(upper-lower)`` / L2 ``sqrt(width)*(upper-lower)``.
2. **noise** with an OpenDP measurement built once per (mechanism, scale, grid, size) and
   reused; its scale is calibrated so that OpenDP's own privacy map of one row is at
   most the per-row cost the ledger charges, minus :data:`CALIBRATION_MARGIN`.
3. **clamp** the result to ``±2**(k+p)``, where ``p`` is the significand width of the
   output datatype. Every released value is then ``m * 2**k`` with ``|m| <= 2**p``: it
   is exactly representable in FP16/FP32/FP64, so casting, JSON and binary encoding
   are all exact and the low bits carry nothing but the mechanism's own grid. The
   grid exponent ``k`` is picked so that this clamp is only reached beyond 40 noise
   scales (probability ~e^-40), and clamping is post-processing anyway. The clamp never
   exceeds the datatype's largest finite value (FP16: 65504), or the cast would release
   ±inf; bounds and ε that no grid of the datatype can carry raise ValueError (a policy
   error at load for FP64, a refused answer for a narrower output).

Cost: OpenDP's exact sampler takes ~10 µs per element in Rust (Laplace; ~2x for the
Gaussian) plus ~100 µs of Python marshalling per call through ``Measurement.__call__``.
A lean path drives the same OpenDP C entry points (``slice_as_object`` →
``measurement_invoke`` → ``object_as_slice``) with a numpy buffer and cuts the
marshalling to a few µs; it is self-tested once per process and falls back to the
public call if OpenDP's internals differ from the pinned version (0.16.0). Either way
every noise bit comes from OpenDP. Its run time grows with the noise's magnitude
(~3 µs per noise scale): the stage can add timing jitter (``timing_jitter_ms``).

OpenDP is imported lazily (1 s, 130 MB) so that a gateway without a DP policy does not
pay for it.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from privacy.dp.accounting import RDP_ORDERS, gaussian_rho_for_epsilon

Mechanism = Literal["laplace", "gaussian"]
Float64Array = npt.NDArray[np.float64]

# True cost per row <= charged cost * (1 - margin); must exceed the ledger's tolerance.
CALIBRATION_MARGIN: Final = 1e-6
# Significand bits (including the implicit one) of each float datatype.
SIGNIFICAND_BITS: Final[dict[str, int]] = {"FP16": 11, "FP32": 24, "FP64": 53}
# The grid is chosen so that values up to |bound| + TAIL_SCALES * scale stay exact.
TAIL_SCALES: Final = 40.0
# The largest |value| + 40 noise scales a grid may cover (float64 headroom for the sampler).
MAX_REACH: Final = 2.0**1000
# OpenDP's smallest grid exponent: 2**-1074 is the smallest subnormal double.
MIN_GRID_EXPONENT: Final = -1074
FLOAT_DTYPES: Final[dict[str, type[np.floating[Any]]]] = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
# Measurements kept per mechanism (one per batch size seen).
MAX_MEASUREMENTS: Final = 128

Invoker = Callable[[Float64Array], Float64Array]


@cache
def _opendp() -> Any:
    """``opendp.prelude`` with the ``contrib`` features this module uses, imported once."""
    import opendp.prelude as dp  # lazy: 1 s and 130 MB, only when DP is configured

    dp.enable_features("contrib")
    return dp


def round_up(value: float) -> float:
    """The next float above ``value``: sensitivities computed in floats must never round down."""
    return math.nextafter(value, math.inf)


def l1_sensitivity(lower: float, upper: float, width: int) -> float:
    return round_up(width * (upper - lower))


def l2_sensitivity(lower: float, upper: float, width: int) -> float:
    return round_up(math.sqrt(width) * (upper - lower))


@dataclass(frozen=True, slots=True)
class NoiseSpec:
    """What the policy asks for one output: mechanism, clamp range and per-row cost.

    ``epsilon`` is the cost of one row of this output. For the Gaussian it is met at
    ``delta`` through the RDP conversion, i.e. a row is charged ρ such that the RDP
    accountant converts one row to exactly (epsilon, delta).
    """

    mechanism: Mechanism
    lower: float
    upper: float
    epsilon: float
    delta: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise ValueError("bounds must be finite with lower < upper")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError("epsilon must be a positive finite number")
        if self.mechanism == "gaussian":
            if self.delta is None or not 0.0 < self.delta < 1.0:
                raise ValueError("the Gaussian mechanism needs delta in (0, 1)")
        elif self.delta is not None:
            raise ValueError("the Laplace mechanism takes no delta")

    def rho_per_row(self) -> float:
        """zCDP ρ charged per row (Gaussian only)."""
        if self.mechanism != "gaussian" or self.delta is None:
            raise ValueError("rho is defined for the Gaussian mechanism only")
        return gaussian_rho_for_epsilon(self.epsilon, self.delta, RDP_ORDERS)


class GridMechanism:
    """Clamp, noise and grid one output of ``width`` elements per row (see module doc).

    Built once per policy revision and output; ``release`` is called per response.
    Not a place for per-request state: the only mutable part is the cache of OpenDP
    measurements per batch size.
    """

    def __init__(self, spec: NoiseSpec, width: int, datatype: str = "FP32", *, fast_ffi: bool = True) -> None:
        if width < 1:
            raise ValueError("width must be >= 1")
        if datatype not in SIGNIFICAND_BITS:
            raise ValueError(f"DP noise needs a float output, not {datatype}")
        self.spec = spec
        self.width = width
        self.datatype = datatype
        self.fast_ffi = fast_ffi
        self.midpoint = (spec.lower + spec.upper) / 2.0
        if spec.mechanism == "laplace":
            self.sensitivity = l1_sensitivity(spec.lower, spec.upper, width)
            self.charged_per_row = spec.epsilon  # ε per row, basic composition
            nominal_scale = self.sensitivity / spec.epsilon
        else:
            self.sensitivity = l2_sensitivity(spec.lower, spec.upper, width)
            self.charged_per_row = spec.rho_per_row()  # ρ per row, RDP = α·ρ
            nominal_scale = self.sensitivity / math.sqrt(2.0 * self.charged_per_row)
        reach = max(abs(spec.lower), abs(spec.upper)) + TAIL_SCALES * nominal_scale
        # SECURITY: bounds and ε that no float grid can carry (a range or a noise scale that
        # overflows, a grid finer than the smallest subnormal) are a policy error here, at
        # load time, never an OpenDP failure (a traceback, a 500) on a request.
        if not (math.isfinite(self.sensitivity) and math.isfinite(nominal_scale) and math.isfinite(reach)
                and reach <= MAX_REACH):
            raise ValueError(f"noise for bounds [{spec.lower:g}, {spec.upper:g}], width {width} and epsilon "
                             f"{spec.epsilon:g} overflows a float (scale {nominal_scale:g}); narrow the bounds or "
                             "raise epsilon")
        bits = SIGNIFICAND_BITS[datatype]
        self.grid_exponent = math.ceil(math.log2(reach)) - bits
        tiniest = float(np.finfo(FLOAT_DTYPES[datatype]).smallest_subnormal)
        if self.grid_exponent < MIN_GRID_EXPONENT or math.ldexp(1.0, self.grid_exponent) < tiniest:
            raise ValueError(f"bounds [{spec.lower:g}, {spec.upper:g}] are too narrow for a {datatype} grid "
                             f"(noise scale {nominal_scale:g}); widen them")
        self.grid = math.ldexp(1.0, self.grid_exponent)
        # SECURITY: every released value m * 2**k with |m| <= 2**bits is exact in `datatype`,
        # and no larger than its largest finite value (FP16 tops out at 65504: a wider clamp
        # would cast the tail to inf); a multiple of the grid below that is exact as well.
        largest = float(np.finfo(FLOAT_DTYPES[datatype]).max)
        self.output_bound = math.ldexp(1.0, self.grid_exponent + bits)
        if self.output_bound > largest:
            self.output_bound = math.floor(largest / self.grid) * self.grid
        if self.output_bound < max(abs(spec.lower), abs(spec.upper)) + nominal_scale:
            raise ValueError(f"bounds [{spec.lower:g}, {spec.upper:g}] plus noise (scale {nominal_scale:g}) exceed "
                             f"the range of {datatype}")
        self._invokers: dict[int, tuple[float, Invoker]] = {}
        # One row's measurement: its scale and OpenDP's own map of one row's sensitivity.
        try:
            self.scale, self.actual_per_row = self._calibrate(1)
        except ValueError:
            raise
        except Exception as exc:  # OpenDP's own refusal (OpenDPException), reported as a policy error
            raise ValueError(f"OpenDP cannot calibrate noise for bounds [{spec.lower:g}, {spec.upper:g}] and "
                             f"epsilon {spec.epsilon:g}: {str(exc).strip()[:200]}") from exc

    # ------------------------------------------------------------------ calibration

    def _d_in(self, rows: int) -> float:
        """Input distance of a batch: every row may change by the per-row sensitivity."""
        if self.spec.mechanism == "laplace":
            return round_up(rows * self.sensitivity)
        return round_up(math.sqrt(rows) * self.sensitivity)

    def _measurement(self, size: int, scale: float) -> Any:
        dp = _opendp()
        atom = dp.atom_domain(T=float, nan=False)
        domain = dp.vector_domain(atom, size=size)
        if self.spec.mechanism == "laplace":
            return dp.m.make_laplace(domain, dp.l1_distance(T=float), scale=scale, k=self.grid_exponent)
        return dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale, k=self.grid_exponent)

    def _calibrate(self, rows: int) -> tuple[float, float]:
        """(scale, OpenDP's cost of the batch) with cost <= rows * charged * (1 - margin)."""
        target = rows * self.charged_per_row * (1.0 - CALIBRATION_MARGIN)
        d_in = self._d_in(rows)
        size = rows * self.width
        power = 1.0 if self.spec.mechanism == "laplace" else 2.0  # cost ∝ scale**-power
        scale = self.sensitivity / self.charged_per_row if power == 1.0 else (
            self.sensitivity / math.sqrt(2.0 * self.charged_per_row))
        for _ in range(64):
            cost = float(self._measurement(size, scale).map(d_in))
            if cost <= target:
                return scale, cost
            scale *= (cost / target) ** (1.0 / power) * (1.0 + 1e-12)
        raise RuntimeError("could not calibrate the noise scale")  # pragma: no cover

    def invoker(self, rows: int) -> Invoker:
        """The noise function for a batch of ``rows`` rows, built once and cached."""
        cached = self._invokers.get(rows)
        if cached is not None:
            return cached[1]
        scale, _ = self._calibrate(rows) if rows > 1 else (self.scale, self.actual_per_row)
        measurement = self._measurement(rows * self.width, scale)
        call = _lean_invoker(measurement, rows * self.width) if self.fast_ffi else None
        if call is None:
            call = _public_invoker(measurement)
        if len(self._invokers) >= MAX_MEASUREMENTS:
            self._invokers.pop(next(iter(self._invokers)))
        self._invokers[rows] = (scale, call)
        return call

    # ------------------------------------------------------------------ release

    def release(self, values: npt.ArrayLike) -> Float64Array:
        """Clamp, noise and grid ``values`` (any shape whose size is rows x width)."""
        data = np.asarray(values, dtype=np.float64)
        flat = data.reshape(-1)
        if flat.size % self.width:
            raise ValueError("output size is not a whole number of rows")
        rows = flat.size // self.width
        if rows == 0:
            return np.zeros(data.shape, dtype=np.float64)
        # SECURITY: the sensitivity holds only for values inside the bounds. OpenDP does
        # not check its input domain on invoke (NaN and wrong sizes pass), so we do.
        nan = np.isnan(flat)
        if nan.any():
            flat = np.where(nan, self.midpoint, flat)
        clean = np.minimum(np.maximum(flat, self.spec.lower), self.spec.upper)  # ufuncs: cheaper than np.clip
        noisy = self.invoker(rows)(clean)
        if noisy.shape != clean.shape:
            raise RuntimeError("OpenDP returned a vector of the wrong size")
        bound = self.output_bound
        np.minimum(np.maximum(noisy, -bound, out=noisy), bound, out=noisy)
        return noisy.reshape(data.shape)


def on_grid(values: npt.ArrayLike, grid: float) -> bool:
    """True when every value is an exact multiple of ``grid`` (a power of two)."""
    scaled = np.asarray(values, dtype=np.float64) / grid  # exact: division by a power of two
    return bool(np.all(scaled == np.round(scaled)))


def _public_invoker(measurement: Any) -> Invoker:
    def call(values: Float64Array) -> Float64Array:
        return np.asarray(measurement(values.tolist()), dtype=np.float64)

    return call


def _lean_invoker(measurement: Any, size: int) -> Invoker | None:
    """The same OpenDP call with less Python marshalling, or None if unavailable.

    Uses the FFI entry points OpenDP's own ``measurement_invoke`` uses (pinned
    opendp 0.16.0). Self-tested once per process (size and grid of the output), else
    the caller falls back to the public API.
    """
    call = _lean_invoker_unchecked(measurement, size)
    return call if call is not None and _lean_path_works() else None


def _lean_invoker_unchecked(measurement: Any, size: int) -> Invoker | None:
    fns = _lean_functions()
    if fns is None:  # pragma: no cover - another OpenDP version
        return None
    return _LeanInvoker(measurement, size, fns)


class _LeanInvoker:
    """Calls one OpenDP measurement through its C entry points.

    SECURITY/memory: holds a reference to the ``Measurement`` object for as long as it
    lives, so OpenDP cannot free the measurement whose address it calls; every object
    and slice OpenDP hands back is freed exactly once, in ``finally`` blocks.
    """

    __slots__ = ("_address", "_fns", "_measurement", "_size")

    def __init__(self, measurement: Any, size: int, fns: tuple[Any, Any, Any, Any, Any, Any]) -> None:
        self._measurement = measurement  # keeps the Rust object alive (see class docstring)
        self._address = ctypes.cast(measurement, ctypes.c_void_p).value
        self._size = size
        self._fns = fns

    def __call__(self, values: Float64Array) -> Float64Array:
        to_object, invoke, to_slice, free_slice, free_object, slice_type = self._fns
        size = self._size
        buffer = np.ascontiguousarray(values, dtype=np.float64)
        if buffer.size != size:
            raise ValueError("input size does not match the measurement")
        ffi_slice = slice_type(buffer.ctypes.data, buffer.size)
        # OpenDP copies the buffer into its own object here; `buffer` outlives the call.
        arg = _ok(to_object(ctypes.byref(ffi_slice), b"Vec<f64>"))
        try:
            out = _ok(invoke(self._address, arg))
            try:
                raw = _ok(to_slice(out))
                try:
                    view = slice_type.from_address(raw)
                    if view.len != size:
                        raise RuntimeError("OpenDP returned a vector of the wrong size")
                    result = np.empty(size, dtype=np.float64)
                    ctypes.memmove(result.ctypes.data, view.ptr, size * 8)
                    return result
                finally:
                    _ok(free_slice(raw))
            finally:
                _ok(free_object(out))
        finally:
            _ok(free_object(arg))


def _ok(result: Any) -> int:
    """The payload of an OpenDP ``FfiResult``, or OpenDP's own exception (error freed)."""
    if result.tag != 0:
        from opendp import _lib

        _lib.unwrap(result, ctypes.c_void_p)  # raises OpenDPException and frees the error
        raise RuntimeError("OpenDP call failed")  # pragma: no cover - unwrap always raises
    return int(result.payload.Ok or 0)  # NULL for the free functions


@cache
def _lean_functions() -> tuple[Any, Any, Any, Any, Any, Any] | None:
    """Private handles on OpenDP's C entry points (``lib[name]`` makes new function objects,
    so setting their signatures cannot disturb OpenDP's own wrappers)."""
    try:
        from opendp import _lib
    except ImportError:  # pragma: no cover
        return None
    lib = _lib.lib
    signatures: tuple[tuple[str, list[Any]], ...] = (
        ("opendp_data__slice_as_object", [ctypes.c_void_p, ctypes.c_char_p]),
        ("opendp_core__measurement_invoke", [ctypes.c_void_p, ctypes.c_void_p]),
        ("opendp_data__object_as_slice", [ctypes.c_void_p]),
        ("opendp_data__slice_free", [ctypes.c_void_p]),
        ("opendp_data__object_free", [ctypes.c_void_p]),
    )
    fns = []
    for name, argtypes in signatures:
        try:
            fn = lib[name]
        except AttributeError:  # pragma: no cover - another OpenDP version
            return None
        fn.argtypes = argtypes
        fn.restype = _lib.FfiResult
        fns.append(fn)
    return fns[0], fns[1], fns[2], fns[3], fns[4], _lib.FfiSlice


@cache
def _lean_path_works() -> bool:
    """Self-test of the lean path, once per process, on a small measurement of its own."""
    dp = _opendp()
    grid_exponent = -10
    measurement = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=float, nan=False), size=4),
                                    dp.l1_distance(T=float), scale=1.0, k=grid_exponent)
    call = _lean_invoker_unchecked(measurement, 4)
    if call is None:  # pragma: no cover - another OpenDP version
        return False
    try:
        probe = call(np.array([0.0, 1.0, -1.0, 0.5]))
    except Exception:  # noqa: BLE001 - any failure means: use the public API instead
        return False
    return probe.shape == (4,) and bool(np.all(np.isfinite(probe))) and on_grid(probe, 2.0**grid_exponent)
