"""OpenDP-backed mechanisms: calibration, distribution, clamping, the grid, the low bits.

OpenDP's sampler draws from OpenSSL's CSPRNG and cannot be seeded, so distribution
checks are statistical with tolerances of several standard errors (the chance of a
false failure is far below 1e-6 per check).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from privacy.dp.mechanisms import CALIBRATION_MARGIN, GridMechanism, NoiseSpec, on_grid

LAPLACE = NoiseSpec("laplace", 0.0, 1.0, epsilon=0.5)  # the test profile: Δ = 1, ε 0.5 → b = 2
GAUSS = NoiseSpec("gaussian", 0.0, 1.0, epsilon=1.0, delta=1e-6)


def low_bit_fires(values: np.ndarray) -> float:
    """Catalogue DP-06's distinguisher: share of outputs with 0 < y < 0.5 and y·2^53 not an integer."""
    y = values[(values > 0) & (values < 0.5)]
    scaled = y * 2.0**53
    return float(np.count_nonzero(scaled != np.round(scaled))) / max(1, values.size)


class TestCalibration:
    def test_laplace_scale_is_sensitivity_over_epsilon(self) -> None:
        """b = Δ/ε = 2, raised just enough that OpenDP's map (which charges the rounding to
        the grid) stays below the charged ε."""
        m = GridMechanism(LAPLACE, width=1)
        assert m.scale == pytest.approx(2.0, rel=1e-4)
        assert m.actual_per_row <= 0.5 * (1 - CALIBRATION_MARGIN)
        assert m.actual_per_row >= 0.5 * (1 - 1e-5)

    @pytest.mark.parametrize("rows", [1, 7, 64])
    def test_batches_cost_rows_times_the_row(self, rows: int) -> None:
        """The measurement for a batch is calibrated for the batch: OpenDP's own map of the
        whole batch (every row moved by its sensitivity) is within rows x charged."""
        for spec in (LAPLACE, GAUSS):
            m = GridMechanism(spec, width=10)
            m.invoker(rows)
            scale, _ = m._invokers[rows]
            cost = float(m._measurement(rows * 10, scale).map(m._d_in(rows)))
            assert cost <= rows * m.charged_per_row * (1 - CALIBRATION_MARGIN)

    def test_gaussian_sigma_matches_rho(self) -> None:
        """σ = Δ₂ / sqrt(2ρ) for the ρ that converts to (ε, δ) per row."""
        m = GridMechanism(GAUSS, width=10)
        expected = math.sqrt(10) / math.sqrt(2 * GAUSS.rho_per_row())
        assert m.scale == pytest.approx(expected, rel=1e-4)


class TestDistribution:
    def test_laplace_mean_and_variance(self) -> None:
        """Catalogue DP-07: 100,000 samples at ε 0.5, Δ 1: variance within 5% of 2b² = 8,
        mean within 0.045 of the true value (5 standard errors of the mean; the catalogue's
        0.02 is 2.2 standard errors, a 3% false-failure rate)."""
        m = GridMechanism(LAPLACE, width=1)
        y = m.release(np.full(100_000, 0.5))
        assert abs(y.mean() - 0.5) < 0.045
        assert abs(y.var() - 8.0) < 0.05 * 8.0
        # Laplace, not Gaussian: mean absolute deviation b = 2 (Gaussian of the same variance: 2.26)
        assert abs(np.abs(y - 0.5).mean() - 2.0) < 0.05

    def test_gaussian_mean_and_variance(self) -> None:
        m = GridMechanism(GAUSS, width=10)
        y = m.release(np.full((2_000, 10), 0.25))
        assert abs(y.mean() - 0.25) < 5 * m.scale / math.sqrt(y.size)
        assert abs(y.std() / m.scale - 1.0) < 0.03
        kurtosis = float(np.mean(((y - y.mean()) / y.std()) ** 4))
        assert abs(kurtosis - 3.0) < 0.3

    def test_lean_and_public_opendp_paths_agree(self) -> None:
        """The low-overhead FFI path and OpenDP's public call give the same distribution."""
        fast = GridMechanism(LAPLACE, width=1, fast_ffi=True)
        slow = GridMechanism(LAPLACE, width=1, fast_ffi=False)
        a = np.sort(fast.release(np.full(10_000, 0.3)))
        b = np.sort(slow.release(np.full(10_000, 0.3)))
        grid = np.linspace(-10, 10, 81)
        ks = np.max(np.abs(np.searchsorted(a, grid) - np.searchsorted(b, grid))) / 10_000
        assert ks < 0.04  # two-sample KS critical value at alpha 1e-6 is ~0.037
        assert on_grid(a, fast.grid)
        assert on_grid(b, slow.grid)


    def test_lean_path_keeps_the_measurement_alive(self) -> None:
        """The lean path calls OpenDP by address: it must hold the Measurement itself, or a
        garbage collection frees the Rust object under it (a crash, or worse)."""
        import gc

        invoker = GridMechanism(LAPLACE, width=10).invoker(3)
        gc.collect()
        for _ in range(200):
            assert invoker(np.full(30, 0.5)).shape == (30,)

    def test_lean_path_refuses_a_wrong_size(self) -> None:
        invoker = GridMechanism(LAPLACE, width=10).invoker(1)
        with pytest.raises(ValueError, match="size"):
            invoker(np.zeros(11))


class TestClamping:
    @pytest.mark.parametrize(
        ("raw", "centre"),
        [
            (1e6, 1.0),  # far above: clamped to the upper bound
            (-1e6, 0.0),  # far below: the lower bound
            (math.inf, 1.0),
            (-math.inf, 0.0),
            (math.nan, 0.5),  # NaN: the midpoint (a fixed in-range value)
        ],
    )
    def test_values_outside_bounds_are_clamped_before_noise(self, raw: float, centre: float) -> None:
        m = GridMechanism(LAPLACE, width=1)
        y = m.release(np.full(5_000, raw))
        assert np.all(np.isfinite(y))
        assert abs(np.median(y) - centre) < 0.2  # sd of the median: 0.03

    def test_shape_is_kept_and_size_must_be_whole_rows(self) -> None:
        m = GridMechanism(GAUSS, width=10)
        assert m.release(np.zeros((3, 10))).shape == (3, 10)
        assert m.release(np.zeros((0, 10))).shape == (0, 10)
        with pytest.raises(ValueError, match="whole number of rows"):
            m.release(np.zeros(15))


class TestGridAndLowBits:
    @pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
    def test_outputs_are_exact_in_the_output_datatype(self, datatype: str) -> None:
        """Every output is m·2^k with |m| ≤ 2^p: casting, JSON and binary encoding are exact."""
        m = GridMechanism(LAPLACE, width=1, datatype=datatype)
        y = m.release(np.full(5_000, 0.7))
        assert on_grid(y, m.grid)
        assert np.all(np.abs(y) <= m.output_bound)
        dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[datatype]
        cast = y.astype(dtype)
        assert np.array_equal(cast.astype(np.float64), y)
        little = np.dtype(dtype).newbyteorder("<")
        wire = np.frombuffer(cast.astype(little).tobytes(), dtype=little)
        assert np.array_equal(wire.astype(np.float64), y)
        assert json.loads(json.dumps([float(v) for v in cast])) == list(y)

    def test_fp32_grid_for_the_test_profile(self) -> None:
        """b = 2 on [0, 1]: exact up to |y| ≤ 128 (≥ 1 + 40 b), grid 2^-17."""
        m = GridMechanism(LAPLACE, width=1)
        assert m.grid_exponent == -17
        assert m.output_bound == 128.0

    def test_low_bits_carry_no_information(self) -> None:
        """Catalogue DP-06 (Mironov 2012). True values 0.0 and 1.0, 50,000 answers each:
        - the low-bit distinguisher never fires (it fires on 11% of numpy's float Laplace);
        - the residues of y/2^k modulo 256 (the lowest 8 bits of the grid index, which carry
          the float's low mantissa bits) have the same, uniform distribution under both
          inputs: nothing below the noise's own resolution depends on the input."""
        m = GridMechanism(LAPLACE, width=1)
        answers = {x: m.release(np.full(50_000, x)) for x in (0.0, 1.0)}
        for y in answers.values():
            assert low_bit_fires(y) == 0.0
            assert on_grid(y, m.grid)
        counts = [np.bincount((np.round(y / m.grid).astype(np.int64) % 256), minlength=256) for y in answers.values()]
        table = np.array(counts, dtype=np.float64)
        expected = table.sum(axis=0, keepdims=True) * table.sum(axis=1, keepdims=True) / table.sum()
        chi2 = float(((table - expected) ** 2 / expected).sum())
        # chi-square with 255 degrees of freedom: p = 1e-6 at ~382
        assert chi2 < 382
        for row in table:
            uniform = row.sum() / 256
            assert float(((row - uniform) ** 2 / uniform).sum()) < 382

    def test_the_distinguisher_catches_a_naive_float_sampler(self) -> None:
        """Positive control: x + numpy's float Laplace (what the gateway must never do)
        leaks which input it came from through the low bits."""
        rng = np.random.default_rng(1)
        naive0 = 0.0 + rng.laplace(0.0, 2.0, 100_000)
        naive1 = 1.0 + rng.laplace(0.0, 2.0, 100_000)
        assert low_bit_fires(naive0) > 0.05
        assert low_bit_fires(naive1) == 0.0


class TestSpecValidation:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"mechanism": "laplace", "lower": 1.0, "upper": 0.0, "epsilon": 1.0},
            {"mechanism": "laplace", "lower": 0.0, "upper": math.inf, "epsilon": 1.0},
            {"mechanism": "laplace", "lower": 0.0, "upper": 1.0, "epsilon": 0.0},
            {"mechanism": "laplace", "lower": 0.0, "upper": 1.0, "epsilon": 1.0, "delta": 1e-6},
            {"mechanism": "gaussian", "lower": 0.0, "upper": 1.0, "epsilon": 1.0},
        ],
    )
    def test_bad_specs_are_refused(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError, match="."):
            NoiseSpec(**kwargs)  # type: ignore[arg-type]

    def test_integer_outputs_are_refused(self) -> None:
        with pytest.raises(ValueError, match="float output"):
            GridMechanism(LAPLACE, width=1, datatype="INT64")


# -- s8 probe: policy values no float grid can carry ----------------------------------------------


@pytest.mark.parametrize(("epsilon", "width"), [(0.001, 1), (0.001, 10), (1.0, 1000)])
def test_fp16_releases_stay_finite_and_exact(epsilon: float, width: int) -> None:
    """FP16 tops out at 65504: the clamp at 2**(k+11) let noisy values past it, and the cast
    turned them into ±inf (≈ every answer of a 10-wide output at ε 0.001)."""
    mech = GridMechanism(NoiseSpec("laplace", 0.0, 1.0, epsilon), width, "FP16")
    released = mech.release(np.full(200 * width, 0.5))
    cast = released.astype(np.float16)
    assert np.isfinite(cast).all()
    assert np.array_equal(cast.astype(np.float64), released)
    assert on_grid(released, mech.grid)


@pytest.mark.parametrize(("bounds", "epsilon"), [
    ((0.0, 1.0), 1e-290),          # a noise scale OpenDP refused ("scale (inf) must be finite")
    ((0.0, 1.0), 1e-300),
    ((-1e300, 1e300), 0.5),        # servable by nobody: outputs of ±1e301
    ((0.0, 5e-324), 0.5),          # a grid below the smallest subnormal (OpenDP: "k must not be smaller")
])
def test_unservable_noise_is_a_value_error_not_an_opendp_failure(bounds: tuple[float, float],
                                                                 epsilon: float) -> None:
    with pytest.raises(ValueError, match="overflows|too narrow|cannot calibrate"):
        GridMechanism(NoiseSpec("laplace", bounds[0], bounds[1], epsilon), 1, "FP64")


def test_a_datatype_too_narrow_for_the_noise_is_refused() -> None:
    """Bounds fine in FP32 but beyond FP16's range: refused for FP16 (the stage answers 502)."""
    spec = NoiseSpec("laplace", 0.0, 1e6, 0.5)
    GridMechanism(spec, 1, "FP32")
    with pytest.raises(ValueError, match="range of FP16"):
        GridMechanism(spec, 1, "FP16")
