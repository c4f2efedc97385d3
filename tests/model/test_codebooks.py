import pathlib
import re

import numpy as np
import pytest

from facepq_core.codes import STANDARD_BITS, CodeSpec, pack_codes, resolve_code_spec, score_codes, unpack_codes
from facepq_core.errors import ConfigError
from opqn_model.codebooks import dct_basis, orthonormal_codebooks

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("d", [4, 16, 64, 256])
def test_dct_basis_is_orthonormal(d):
    t = dct_basis(d)
    np.testing.assert_allclose(t.T @ t, np.eye(d), atol=1e-10)
    # first column is the constant vector, normalised
    np.testing.assert_allclose(t[:, 0], np.full(d, 1 / np.sqrt(d)), atol=1e-12)


def test_codebooks_follow_the_recurrence_and_are_orthonormal():
    M, K, d = 6, 64, 64
    books = orthonormal_codebooks(M, K, d).astype(np.float64)
    t = dct_basis(d)
    np.testing.assert_allclose(books[0], t[:, :K], atol=1e-6)
    for m in range(1, M):
        np.testing.assert_allclose(books[m], t @ books[m - 1], atol=1e-5)
        np.testing.assert_allclose(books[m].T @ books[m], np.eye(K), atol=1e-5)
    # different subspaces get different codebooks
    assert not np.allclose(books[0], books[1], atol=1e-3)


def test_codebooks_refuse_more_codewords_than_dims():
    with pytest.raises(ConfigError, match="at least 64 dims"):
        orthonormal_codebooks(2, 64, 32)


def _readme_code_shapes() -> tuple[dict[int, tuple[int, int]], tuple[int, int, int]]:
    """The README's "Code shapes" paragraph: ({bits: (M, K)} that `--bits` alone picks, and the `-K 16` example
    (bits, M, K) with its bytes per code)."""
    text = README.read_text()
    start = text.index("`--bits` alone")
    paragraph = text[start:text.index("\n\n", start)]
    picks, four_bit = paragraph.split("`-K 16`", 1)
    chosen = {int(b): (int(m), int(k)) for b, m, k in re.findall(r"(\d+)(?: bits)? → (\d+)×(\d+)", picks)}
    (b, m, k, nbytes), = re.findall(r"(\d+) bits → (\d+)×(\d+) in (\d+) bytes", four_bit)
    return chosen, (int(b), int(m), int(k), int(nbytes))


def test_the_readme_documents_the_code_shape_each_standard_length_resolves_to():
    chosen, (bits, M, K, nbytes) = _readme_code_shapes()
    assert sorted(chosen) == sorted(STANDARD_BITS), "document every standard length in the README, no other"
    assert {b: (s.M, s.K) for b in STANDARD_BITS for s in [resolve_code_spec(b)]} == chosen
    spec = resolve_code_spec(bits, K=K)
    assert (spec.M, spec.K, spec.code_bytes, spec.packed) == (M, K, nbytes, True)


def test_resolution_prefers_bytes_and_honours_overrides():
    assert resolve_code_spec(64) == CodeSpec(8, 256)
    assert resolve_code_spec(36) == CodeSpec(6, 64)
    assert resolve_code_spec(64, K=16) == CodeSpec(16, 16)
    assert resolve_code_spec(48, M=8) == CodeSpec(8, 64)


@pytest.mark.parametrize("kwargs", [dict(bits=64, K=64), dict(bits=30, K=256), dict(bits=64, K=256, sub_dim=128),
                                    dict(bits=0)])
def test_invalid_code_is_refused_naming_valid_ones(kwargs):
    with pytest.raises(ConfigError) as exc:
        resolve_code_spec(**kwargs)
    if kwargs["bits"] > 0:
        assert "Valid (M x K)" in str(exc.value) and "64 bits:" in str(exc.value)


@pytest.mark.parametrize("spec", [CodeSpec(8, 256), CodeSpec(8, 16), CodeSpec(9, 16), CodeSpec(5, 4)])
def test_pack_unpack_roundtrip_and_reference_score(spec):
    rng = np.random.default_rng(0)
    sub = rng.integers(0, spec.K, size=(50, spec.M), dtype=np.uint8)
    stored = pack_codes(sub, spec)
    assert stored.shape == (50, spec.code_bytes)
    np.testing.assert_array_equal(unpack_codes(stored, spec), sub)
    lut = rng.random((spec.M, spec.K), dtype=np.float32)
    expected = np.array([sum(lut[m, sub[i, m]] for m in range(spec.M)) for i in range(50)], np.float32)
    np.testing.assert_allclose(score_codes(lut, stored, spec), expected, rtol=1e-6)


def test_code_spec_rejects_bad_shapes():
    with pytest.raises(ConfigError):
        CodeSpec(4, 12)
    with pytest.raises(ConfigError):
        CodeSpec(0, 16)
    assert CodeSpec(9, 16).code_bytes == 5 and CodeSpec(9, 16).packed
