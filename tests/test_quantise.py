import numpy as np
import pytest

from sarkit.raster.quantise import LogPercentile, Passthrough, SigmaClip, to_amplitude
from sarkit.raster.scene import valid_mask


def speckle(n=200_000, seed=0):
    return np.sqrt(np.random.default_rng(seed).exponential(0.1, n)).astype(np.float32)


def test_radiometry_conversions():
    amp = np.array([0.5, 2.0], np.float32)
    assert np.allclose(to_amplitude(amp**2, "power"), amp)
    assert np.allclose(to_amplitude(20 * np.log10(amp), "db"), amp, rtol=1e-5)
    assert np.allclose(to_amplitude(np.array([3 + 4j], np.complex64), "amplitude"), [5.0])


@pytest.mark.parametrize("quantiser", [LogPercentile(), SigmaClip()])
def test_monotonic_full_range_and_nodata(quantiser):
    sample = speckle()
    params = quantiser.fit(sample)
    values = np.sort(speckle(10_000, seed=1))
    valid = np.ones_like(values, bool)
    valid[:10] = False
    out = quantiser.apply(values.copy(), params, valid)
    assert out.dtype == np.uint8
    assert (out[:10] == 0).all() and out[10:].min() >= 1
    assert (np.diff(out[10:].astype(int)) >= 0).all(), "order of backscatter is kept"
    assert out[10:].max() >= 250 and out[10:].min() <= 5, "the scene's range is used"


def test_log_percentile_clips_at_scene_percentiles():
    sample = speckle()
    q = LogPercentile(low=1, high=99)
    params = q.fit(sample)
    out = q.apply(sample.copy(), params, np.ones(sample.shape, bool))
    assert np.mean(out == 255) == pytest.approx(0.01, abs=0.003)
    assert np.mean(out == 1) == pytest.approx(0.01, abs=0.003)


def test_tiles_of_one_scene_agree():
    """Parameters are fitted once per scene: the same value maps to the same byte anywhere."""
    q = LogPercentile()
    params = q.fit(speckle())
    a = q.apply(np.array([0.3, 0.1], np.float32), params, None)
    b = q.apply(np.array([0.1, 0.3], np.float32), params, None)
    assert a[0] == b[1] and a[1] == b[0]


def test_passthrough_keeps_bytes_and_reserves_zero():
    values = np.array([0, 1, 7, 255], np.uint8)
    valid = np.array([True, True, True, False])
    assert Passthrough().apply(values, {}, valid).tolist() == [1, 1, 7, 0]


def test_zero_runs_are_nodata_but_speckle_zeros_are_not():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4, (64, 64)).astype(np.uint8)  # dark 8-bit speckle: 1 in 4 is 0
    img[:, :20] = 0  # a fill border
    valid = valid_mask(img, 0.0, zero_runs=True)
    assert not valid[:, :20].any()
    inner_zeros = img[:, 25:] == 0
    assert inner_zeros.sum() > 100 and valid[:, 25:][inner_zeros].all()


@pytest.mark.parametrize("radiometry", ["amplitude", "power", "db"])
@pytest.mark.parametrize("quantiser", [LogPercentile(), SigmaClip()])
def test_lookup_table_matches_the_formula(quantiser, radiometry):
    from sarkit.raster.quantise import apply_lut, build_lut

    raw = speckle(100_000, seed=3)
    if radiometry == "power":
        raw = raw**2
    elif radiometry == "db":
        raw = 20 * np.log10(raw + 1e-6)
    raw = raw.astype(np.float32)
    raw[:5] = [np.nan, 0.0, -1.0, np.inf, 1e-30]
    valid = np.isfinite(raw)
    params = quantiser.fit(to_amplitude(raw[valid], radiometry))
    direct = quantiser.apply(to_amplitude(raw, radiometry), params, valid)
    lut = build_lut(quantiser, params, "float32", radiometry)
    fast = apply_lut(raw, lut, valid)
    diff = np.abs(direct.astype(int) - fast.astype(int))
    # at most one level (1/254 of the range) off, for the few values near a level edge
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.03
    assert fast[0] == 0 and direct[0] == 0


def test_lookup_table_is_exact_for_16_bit_integers():
    from sarkit.raster.quantise import apply_lut, build_lut

    raw = (speckle(50_000) * 3000).astype(np.int16)
    raw[:3] = [-5, 0, 32767]
    valid = raw != 0
    q = LogPercentile()
    params = q.fit(to_amplitude(raw[valid], "amplitude"))
    direct = q.apply(to_amplitude(raw, "amplitude"), params, valid)
    fast = apply_lut(raw, build_lut(q, params, "int16", "amplitude"), valid)
    assert np.array_equal(direct, fast)


def test_screening_table_zeroes_exactly_the_possible_nodata():
    from sarkit.raster.quantise import build_lut, lut_index, screening_lut

    q = LogPercentile()
    raw = speckle(10_000, seed=4)
    lut = build_lut(q, q.fit(raw), "float32", "amplitude")
    screen = screening_lut(lut, "float32", [0.0])
    clean = np.take(screen, lut_index(raw))
    assert clean.all() and np.array_equal(clean, np.take(lut, lut_index(raw)))
    odd = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5], np.float32)
    assert np.take(screen, lut_index(odd)).tolist()[:5] == [0, 0, 0, 0, 0]
    assert np.take(screen, lut_index(odd))[5] > 0
    # a tagged nodata value is screened; 0 then is a (dark) valid pixel
    tagged = screening_lut(lut, "float32", [-9999.0])
    assert np.take(tagged, lut_index(np.array([-9999.0, 0.0], np.float32))).tolist() == [0, 1]
    ints = build_lut(q, q.fit(raw * 100), "int16", "amplitude")
    screened = screening_lut(ints, "int16", [-9999.0, 0.5])  # 0.5 no int16 can hold
    values = np.array([-9999, 0, 7], np.int16)
    assert np.take(screened, lut_index(values)).tolist() == [
        0,
        *np.take(ints, lut_index(values))[1:],
    ]


@pytest.mark.parametrize("dtype", ["float32", "uint16", "int16", "uint8", "int8"])
def test_compiled_gather_matches_numpy(dtype, monkeypatch):
    from sarkit.raster import quantise

    if quantise._lut is None:
        pytest.skip("the C kernel was not built here (no compiler at install)")
    rng = np.random.default_rng(7)
    kind = np.dtype(dtype)
    if kind.kind == "f":
        values = speckle((123, 77), seed=8)
        values.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, -3.5]
    else:
        info = np.iinfo(kind)
        values = rng.integers(info.min, info.max, (123, 77), endpoint=True).astype(kind)
        values.flat[:2] = [info.min, info.max]
    q = LogPercentile()
    lut = quantise.build_lut(
        q, q.fit(np.abs(values[np.isfinite(values)]).astype(np.float32)), dtype, "amplitude"
    )
    lut[::7] = 0  # some zeros to count
    fast, zeros = quantise.gather(values, lut)
    monkeypatch.setattr(quantise, "_lut", None)
    slow, slow_zeros = quantise.gather(values, lut)
    assert np.array_equal(fast, slow) and zeros == slow_zeros > 0
    # a view that is not contiguous takes numpy's path, with the same answer
    monkeypatch.undo()
    assert np.array_equal(quantise.gather(values[:, ::2], lut)[0], slow[:, ::2])


def test_compiled_gather_refuses_what_would_read_or_write_outside():
    from sarkit.raster import quantise

    if quantise._lut is None:
        pytest.skip("the C kernel was not built here (no compiler at install)")
    src, out = np.ones(10, np.uint32), np.empty(10, np.uint8)
    kernel = quantise._lut
    with pytest.raises(ValueError, match="table needs"):
        kernel.rect32(src, 0, 1, 10, 40, np.ones(100, np.uint8), 13, out, 0, 10)
    with pytest.raises(ValueError, match="out of range"):
        kernel.rect32(src, 0, 1, 10, 40, np.ones(1 << 20, np.uint8), 40, out, 0, 10)
    big = np.ones(65536, np.uint8)
    for args in [(0, 1, 21, 42), (2, 1, 20, 40), (0, 2, 10, 21), (0, -1, 10, 20)]:
        offset, rows, cols, stride = args  # past the source's end, or a negative count
        with pytest.raises(ValueError, match="outside"):
            kernel.rect16(src.view(np.uint16), offset, rows, cols, stride, big, 0, out, 0, cols)
    with pytest.raises(ValueError, match="outside"):  # past the output's end
        kernel.rect16(src.view(np.uint16), 0, 2, 10, 20, big, 0, out, 0, 10)


def test_percentiles_are_numpys_to_the_bit():
    """The fit's own percentiles (no numpy.ma import) equal np.percentile's, dtype too."""
    from sarkit.raster.quantise import percentiles

    rng = np.random.default_rng(4)
    for n, dtype in ((1, np.float32), (2, np.float64), (999, np.float32), (100_000, np.float32)):
        values = (rng.standard_exponential(n) * 3).astype(dtype)
        qs = [0.0, 1.0, 37.3, 99.5, 100.0]
        want = np.percentile(values, qs)
        got = percentiles(values, qs)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    values = np.array([0.5, np.inf, 2.0, 1.0], np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf in both lerps
        want, got = np.percentile(values, [10.0, 90.0]), percentiles(values, [10.0, 90.0])
    assert np.array_equal(got, want, equal_nan=True)
