"""Scale: the chunk plan at 10⁶ particles (jobs in the hundreds), the demo and test plans
unchanged, float16 preprocessed stacks (MRC mode 12) written and read back."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from deephemnma import preprocess as pp
from deephemnma.core.config import validate_config

REPO = Path(__file__).resolve().parents[1]


def plan_counts(n, cfg):
    plan = pp.plan_chunks(n, validate_config(cfg))
    return sum(c["set"] == "set1" for c in plan), sum(c["set"] == "set2" for c in plan), plan


def test_a_million_particles_make_hundreds_of_jobs_not_thousands():
    t0 = time.perf_counter()
    n1, n2, plan = plan_counts(1_000_000, {})
    assert (n1, n2) == (20, 196)
    assert sum(c["n"] for c in plan) == 1_000_000
    assert {c["n"] for c in plan if c["set"] == "set2"} == {5000}
    # set 2 never exceeds set2_max_chunks; its chunk size is a multiple of chunk_size
    for n in (25_000, 123_457, 3_000_000):
        _, k2, plan = plan_counts(n, {})
        assert k2 <= 200
        sizes = {c["n"] for c in plan if c["set"] == "set2"}
        assert max(sizes) % 1000 == 0


def test_demo_and_test_plans_are_unchanged():
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    test = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    assert plan_counts(1200, demo)[:2] == (2, 3)
    assert plan_counts(160, test)[:2] == (2, 2)


def test_explicit_set2_chunk_size_and_bad_values():
    _, n2, plan = plan_counts(10_000, {"preprocess": {"set1_size": 1000, "chunk_size": 500, "set2_chunk_size": 2000}})
    assert n2 == 5 and [c["n"] for c in plan if c["set"] == "set2"] == [2000] * 4 + [1000]
    _, n2, _ = plan_counts(10_000, {"preprocess": {"set1_size": 1000, "chunk_size": 500, "set2_max_chunks": 3}})
    assert n2 == 3  # 9,000 in chunks of 3,000 (a multiple of 500)
    from deephemnma.core.errors import ConfigError

    with pytest.raises(Exception):
        validate_config({"preprocess": {"set2_chunk_size": 0}})
    with pytest.raises(Exception):
        validate_config({"preprocess": {"dtype": "float64"}})
    s = pp.PreprocessSettings.from_config({})
    s.chunk_size = 0
    with pytest.raises(ConfigError):
        pp.chunk_sizes(10, s)


def test_float16_stacks_round_trip(tmp_path):
    from deephemnma.core.mrc import ParticleImages, StackWriter, read_header, write_stack

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16, 16)).astype(np.float32) * 3
    write_stack(tmp_path / "a.mrcs", x, 1.3, dtype="float16")
    write_stack(tmp_path / "b.mrcs", x, 1.3)
    h16, h32 = read_header(tmp_path / "a.mrcs"), read_header(tmp_path / "b.mrcs")
    assert h16.dtype == np.float16 and h32.dtype == np.float32 and h16.n == 5
    assert (tmp_path / "a.mrcs").stat().st_size - 1024 == x.size * 2
    import mrcfile

    with mrcfile.open(tmp_path / "a.mrcs", permissive=True) as m:
        assert int(m.header.mode) == 12 and m.voxel_size.x == pytest.approx(1.3)
        assert float(m.header.dmax) == pytest.approx(float(x.max()), rel=1e-3)
    imgs = ParticleImages([tmp_path / "a.mrcs"], np.zeros(5, int), np.arange(5))
    y = imgs.read([4, 0])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x[[4, 0]], rtol=1e-3, atol=1e-3)  # 11 significant bits
    with pytest.raises(ValueError):
        StackWriter(tmp_path / "c.mrcs", 1, 16, 1.0, dtype="float64")
    with pytest.raises(ValueError):  # beyond float16's range: refused, not written as inf
        write_stack(tmp_path / "d.mrcs", np.full((1, 4, 4), 1e6, np.float32), 1.0, dtype="float16")
    assert not (tmp_path / "d.mrcs").exists()


def test_preprocess_writes_float16_when_asked(tmp_path):
    from deephemnma.core.mrc import ParticleImages, read_header, write_stack
    from deephemnma.core.star import read_star, write_star
    import pandas as pd

    rng = np.random.default_rng(1)
    write_stack(tmp_path / "raw.mrcs", rng.standard_normal((12, 32, 32)).astype(np.float32), 1.0)
    p = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@raw.mrcs" for i in range(12)], "rlnOpticsGroup": 1,
                      "rlnDefocusU": 5000.0, "rlnDefocusV": 5000.0, "rlnDefocusAngle": 0.0})
    o = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [32], "rlnVoltage": [300.0],
                      "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(tmp_path / "p.star", p, o)
    out = {}
    for dtype in ("float32", "float16"):
        s = pp.PreprocessSettings.from_config({"preprocess": {"box": 16, "set1_size": 6, "chunk_size": 6,
                                                              "dtype": dtype}})
        m = pp.preprocess_dataset(tmp_path / "p.star", tmp_path / dtype, s, invert=False)
        assert m["complete"] and m["settings"]["dtype"] == dtype
        assert read_header(tmp_path / dtype / "set1" / "chunk_0000.mrcs").dtype == np.dtype(dtype)
        star = read_star(tmp_path / dtype / "set1.star")
        out[dtype] = ParticleImages.from_star(star).read(np.arange(len(star)))
    np.testing.assert_allclose(out["float16"], out["float32"], atol=2e-3 * np.abs(out["float32"]).max())


@pytest.mark.parametrize("body", [
    "1@a.mrcs 1\n2@a.mrcs 1\n3@a.mrcs 1\n",                     # plain
    "1@a.mrcs 1\n\n# a comment\n   \n2@a.mrcs 1\r\n3@a.mrcs 1",  # blank, comment, CRLF, no final newline
    "\n1@a.mrcs 1\n2@a.mrcs 1\n3@a.mrcs 1\n\n\n",               # blank lines around the rows
])
def test_count_particles_counts_rows_without_parsing(tmp_path, body):
    from deephemnma.core.star import count_particles, iter_particles

    f = tmp_path / "p.star"
    f.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n\n"
                 "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n" + body)
    assert count_particles(f) == 3 == sum(len(c) for c in iter_particles(f))
    g = tmp_path / "old.star"  # RELION 3.0: one block
    g.write_text("data_\nloop_\n_rlnImageName\n" + "".join(f"{i}@a.mrcs\n" for i in range(1, 8)))
    assert count_particles(g) == 7
