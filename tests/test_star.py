"""STAR conventions: reading RELION 3.0/3.1/5 files written by other software, writing
RELION 3.1+, the fast particle-block path against starfile, image-name resolution."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from deephemnma.core import star as S
from deephemnma.core.errors import InputError

PEER_STARS = [
    "FinalRefinement-OriginalParticles-PfCRT.star", "empiar_10076_7.star", "relion31.6opticsgroups.star",
    "relion31.star", "relion31.v2.star", "relion5.star", "toy_projections.star", "toy_projections_poses.star",
]


# ---------------------------------------------------------------------------------------
# A deliberately trivial, independent STAR reader (line by line, shlex) for cross-checks.

def tiny_read(path: Path) -> dict[str, list[dict[str, str]]]:
    blocks: dict[str, list[dict[str, str]]] = {}
    name = None
    cols: list[str] = []
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            name, cols = line[5:], []
            blocks[name] = []
        elif line.startswith("loop_"):
            continue
        elif line.startswith("_"):
            cols.append(line.split()[0][1:])
        else:
            vals = shlex.split(line)
            assert len(vals) == len(cols), (path, line)
            blocks[name].append(dict(zip(cols, vals)))
    return blocks


def tiny_particles_and_optics(path: Path):
    b = tiny_read(path)
    optics = {int(r["rlnOpticsGroup"]): r for r in b.get("optics", [])}
    parts = b["particles"] if "particles" in b else next(v for k, v in b.items() if k != "optics")
    return parts, optics


def tiny_value(row: dict, optics: dict, col: str) -> float:
    if col in row:
        return float(row[col])
    if optics:
        return float(optics[int(row["rlnOpticsGroup"])][col])
    raise KeyError(col)


def tiny_pixel_size(row: dict, optics: dict) -> float:
    try:
        return tiny_value(row, optics, "rlnImagePixelSize")
    except KeyError:
        return tiny_value(row, optics, "rlnDetectorPixelSize") * 1e4 / tiny_value(row, optics, "rlnMagnification")


# ---------------------------------------------------------------------------------------
# Peer files

@pytest.mark.peer
@pytest.mark.parametrize("name", PEER_STARS)
def test_peer_star_values_match_the_file(peer_dir, name):
    path = peer_dir / name
    star = S.read_star(path)
    rows, optics = tiny_particles_and_optics(path)
    assert len(star.particles) == len(rows) > 0
    m = S.merged(star)
    px = S.pixel_sizes(star)
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnDefocusU", "rlnDefocusV"):
        try:
            want = np.array([tiny_value(r, optics, col) for r in rows])
        except KeyError:
            assert col not in m.columns
            continue
        np.testing.assert_array_equal(m[col].to_numpy(dtype=float), want, err_msg=f"{name} {col}")
    try:
        want_px = np.array([tiny_pixel_size(r, optics) for r in rows])
    except KeyError:  # toy_projections.star gives none: it comes from the stack header
        want_px = np.full(len(rows), 1.0)
    np.testing.assert_allclose(px, want_px, rtol=1e-15)
    assert list(star.particles[S.IMAGE_NAME]) == [r["rlnImageName"] for r in rows]


@pytest.mark.peer
def test_peer_values_read_by_eye(peer_dir):
    """A few numbers copied from the files by hand."""
    s = S.read_star(peer_dir / "relion31.star")
    assert s.version == "3.1" and len(s.particles) == 5
    m = S.merged(s)
    assert m["rlnVoltage"].iloc[0] == 300.0 and m["rlnSphericalAberration"].iloc[0] == 0.01
    assert m["rlnAmplitudeContrast"].iloc[0] == 0.1 and m["rlnImagePixelSize"].iloc[0] == 2.806
    assert m["rlnDefocusU"].iloc[0] == 13108.082418 and m["rlnDefocusV"].iloc[0] == 12845.582418
    assert m["rlnImageSize"].iloc[0] == 256

    s = S.read_star(peer_dir / "relion5.star")
    assert s.version == "5" and len(s.particles) == 17
    m = S.merged(s)
    assert m["rlnVoltage"].iloc[0] == 100.0 and m["rlnSphericalAberration"].iloc[0] == 1.6
    assert m["rlnImagePixelSize"].iloc[0] == 0.89 and m["rlnImageSize"].iloc[0] == 448
    assert m["rlnDefocusU"].iloc[1] == 11963.504884 and m["rlnOriginXAngst"].iloc[1] == 1.259694
    assert m["rlnMagMat00"].iloc[0] == pytest.approx(1.0, abs=0.05)  # optics extras carried
    assert s.optics["rlnOddZernike"].iloc[0].startswith("[0.0680480107376,")

    s = S.read_star(peer_dir / "empiar_10076_7.star")
    assert s.version == "3.0" and len(s.particles) == 7
    assert S.pixel_sizes(s)[0] == 5 * 1e4 / 38168
    m = S.merged(s)
    assert m["rlnDefocusU"].iloc[0] == 15301.1 and m["rlnAmplitudeContrast"].iloc[6] == 0.07
    assert m["rlnSphericalAberration"].iloc[0] == 2.7 and m["rlnImageSize"].iloc[0] == 320  # from the stack


@pytest.mark.peer
def test_relion30_normalised_to_31(peer_dir):
    s = S.read_star(peer_dir / "FinalRefinement-OriginalParticles-PfCRT.star")
    assert s.version == "3.0" and len(s.particles) == 5
    # per-particle optics columns moved into a synthesised optics table
    for c in ("rlnVoltage", "rlnSphericalAberration", "rlnMagnification", "rlnDetectorPixelSize"):
        assert c not in s.particles.columns and c in s.optics.columns
    assert list(s.optics["rlnOpticsGroup"]) == [1] and s.optics["rlnOpticsGroupName"].iloc[0] == "opticsGroup1"
    assert s.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.035)
    assert (s.particles["rlnOpticsGroup"] == 1).all()
    # pixel origins -> Angstrom, in place of the pixel columns
    cols = list(s.particles.columns)
    assert "rlnOriginX" not in cols and cols.index("rlnOriginXAngst") == cols.index("rlnOriginYAngst") - 1
    np.testing.assert_allclose(s.particles["rlnOriginXAngst"].to_numpy()[:2], [-0.14063 * 1.035, -0.14062 * 1.035])
    np.testing.assert_allclose(s.particles["rlnOriginYAngst"].to_numpy()[:2], [-0.04688 * 1.035, 0.046875 * 1.035])
    # untouched columns keep their order
    raw = starfile.read(peer_dir / "FinalRefinement-OriginalParticles-PfCRT.star")
    kept = [c for c in raw.columns if c in s.particles.columns]
    assert kept == [c for c in s.particles.columns if c in raw.columns]


def test_relion30_optics_groups_from_distinct_values(tmp_path):
    p = tmp_path / "p.star"
    p.write_text("data_\nloop_\n_rlnImageName\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
                 "_rlnImagePixelSize\n_rlnDefocusU\n"
                 "1@a.mrcs 300 2.7 0.1 1.0 10000\n2@a.mrcs 200 2.7 0.1 1.0 11000\n"
                 "3@a.mrcs 300 2.7 0.1 1.0 12000\n4@a.mrcs 300 2.7 0.1 1.5 13000\n")
    s = S.read_star(p)
    assert list(s.particles["rlnOpticsGroup"]) == [1, 2, 1, 3]
    assert list(s.optics["rlnVoltage"]) == [300, 200, 300]
    assert list(s.optics["rlnImagePixelSize"]) == [1.0, 1.0, 1.5]
    np.testing.assert_array_equal(S.pixel_sizes(s), [1.0, 1.0, 1.0, 1.5])
    m = S.merged(s)
    assert list(m["rlnVoltage"]) == [300, 200, 300, 300]


def test_relion30_pixel_size_argument_and_error(tmp_path):
    p = tmp_path / "p.star"
    p.write_text("data_images\nloop_\n_rlnImageName\n_rlnOriginX\n1@missing.mrcs 2.0\n")
    with pytest.raises(InputError, match="--pixel-size") as e:
        S.read_star(p)
    assert str(p) in str(e.value)
    s = S.read_star(p, pixel_size=1.5)
    assert s.particles["rlnOriginXAngst"].iloc[0] == 3.0
    assert S.pixel_sizes(s)[0] == 1.5


@pytest.mark.peer
def test_pixel_size_from_stack_header(peer_dir):
    s = S.read_star(peer_dir / "toy_projections.star")  # no pixel size in the file
    assert S.pixel_sizes(s)[0] == 1.0 and s.optics["rlnImageSize"].iloc[0] == 30
    assert S.pixel_sizes(S.read_star(peer_dir / "toy_projections.star", pixel_size=2.5))[0] == 2.5


@pytest.mark.peer
def test_cryodrgn_pixel_origins_converted(peer_dir):
    s = S.read_star(peer_dir / "toy_projections_poses.star")
    raw = starfile.read(peer_dir / "toy_projections_poses.star")["particles"]
    assert s.version == "3.1"
    np.testing.assert_array_equal(s.particles["rlnOriginXAngst"], raw["rlnOriginX"] * 1.0)
    assert list(s.particles.columns).index("rlnOriginXAngst") == list(raw.columns).index("rlnOriginX")
    np.testing.assert_array_equal(s.particles["rlnAngleRot"], raw["rlnAngleRot"])


@pytest.mark.peer
def test_six_optics_groups_map_to_the_right_particles(peer_dir):
    path = peer_dir / "relion31.6opticsgroups.star"
    s = S.read_star(path)
    assert len(s.optics) == 6 and len(s.particles) == 139
    rows, optics = tiny_particles_and_optics(path)
    m = S.merged(s)
    for col in ("rlnImagePixelSize", "rlnSphericalAberration", "rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00"):
        want = [float(optics[int(r["rlnOpticsGroup"])][col]) for r in rows]
        np.testing.assert_array_equal(m[col].to_numpy(), want, err_msg=col)
    assert list(m["rlnOpticsGroupName"]) == [optics[int(r["rlnOpticsGroup"])]["rlnOpticsGroupName"] for r in rows]
    assert m["rlnOpticsGroup"].value_counts().to_dict() == {1: 48, 2: 29, 3: 5, 4: 7, 5: 26, 6: 24}
    # group 4 is the one with Cs 2.6
    assert set(m.loc[m["rlnOpticsGroup"] == 4, "rlnSphericalAberration"]) == {2.6}
    assert set(m.loc[m["rlnOpticsGroup"] != 4, "rlnSphericalAberration"]) == {2.7}


@pytest.mark.peer
def test_optics_before_or_after_particles_same_table(peer_dir):
    a = S.read_star(peer_dir / "relion31.star")
    b = S.read_star(peer_dir / "relion31.v2.star")
    pd.testing.assert_frame_equal(S.merged(a), S.merged(b), check_exact=True)
    pd.testing.assert_frame_equal(a.optics, b.optics, check_exact=True)


def test_merged_particle_values_win():
    opt = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0], "rlnImagePixelSize": [1.0, 2.0]})
    par = pd.DataFrame({"rlnImageName": ["1@a", "2@a", "3@a"], "rlnOpticsGroup": [2, 1, 2],
                        "rlnImagePixelSize": [5.0, 6.0, 7.0]})
    m = S.merged(S.StarData(par, opt, Path("x.star"), "3.1"))
    assert list(m["rlnVoltage"]) == [200.0, 300.0, 200.0]
    assert list(m["rlnImagePixelSize"]) == [5.0, 6.0, 7.0]
    assert list(m.columns) == ["rlnImageName", "rlnOpticsGroup", "rlnImagePixelSize", "rlnVoltage"]


@pytest.mark.peer
@pytest.mark.parametrize("name", PEER_STARS)
def test_read_write_read_keeps_everything(peer_dir, tmp_path, name):
    a = S.read_star(peer_dir / name, data_dir=peer_dir)
    out = tmp_path / "out.star"
    S.write_star(out, a.particles, a.optics)
    b = S.read_star(out)
    pd.testing.assert_frame_equal(a.particles, b.particles, check_exact=True)
    pd.testing.assert_frame_equal(a.optics, b.optics, check_exact=True)
    assert b.version == "3.1"
    # other software reads what we write the same way
    ref = starfile.read(out)
    pd.testing.assert_frame_equal(ref["particles"], b.particles, check_exact=True)
    pd.testing.assert_frame_equal(ref["optics"], b.optics, check_exact=True)
    text = out.read_text()
    assert text.lstrip().startswith("# version 30001")
    assert text.index("data_optics") < text.index("data_particles")


@pytest.mark.peer
def test_every_input_column_survives_with_raw_values(peer_dir, tmp_path):
    """Columns of a 3.1 file are carried through unchanged (values as starfile reads them)."""
    raw = starfile.read(peer_dir / "relion31.6opticsgroups.star")
    s = S.read_star(peer_dir / "relion31.6opticsgroups.star")
    S.write_star(tmp_path / "o.star", s.particles, s.optics)
    back = starfile.read(tmp_path / "o.star")
    for block in ("optics", "particles"):
        pd.testing.assert_frame_equal(raw[block], back[block], check_exact=True)


# ---------------------------------------------------------------------------------------
# Fast path vs starfile, writing, streaming

def _mixed_table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n) * 10.0 ** rng.integers(-8, 9, size=n)
    x[::97] = np.nan
    return pd.DataFrame({
        "rlnImageName": [f"{i % 50 + 1:06d}@Extract/job1/stack_{i // 50}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mic {i // 50}.mrc" if i % 7 == 0 else f"mic_{i // 50}.mrc" for i in range(n)],
        "rlnDefocusU": rng.uniform(5000, 30000, n),
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnClassNumber": rng.integers(1, 5, n),
        "weird": x,
        "rlnCtfBfactor": np.zeros(n),                    # integral floats must stay float
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "big": rng.integers(-2**62, 2**62, n),
        "listy": ["[1.5,2,-3.25e-05]"] * n,
        "tiny": rng.normal(size=n) * 1e-300,
    })


def _optics() -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                         "rlnImagePixelSize": [1.06], "rlnImageSize": [128],
                         "rlnOddZernike": ["[0.0680480107376,0.0982451014894,-1.79877045848,0,0,-1.36]"]})


def test_fast_path_equals_starfile_on_generated_file(tmp_path):
    df = _mixed_table(3000)
    # written by starfile (its own text format: tabs, quoted strings, '%.6f' floats)
    p = tmp_path / "sf.star"
    starfile.write({"optics": _optics(), "particles": df}, p, float_format="%.15g")
    ref = starfile.read(p)
    ours = S.read_star(p)
    pd.testing.assert_frame_equal(ours.particles, ref["particles"], check_exact=True)
    pd.testing.assert_frame_equal(ours.optics, ref["optics"], check_exact=True)
    assert ours.particles["rlnMicrographName"].iloc[0] == "mic 0.mrc"  # quoted value with a space
    assert ours.particles["rlnClassNumber"].dtype == np.int64 and ours.particles["big"].dtype == np.int64
    # streaming gives the same rows
    chunks = list(S.iter_particles(p, chunksize=700))
    assert [len(c) for c in chunks] == [700] * 4 + [200]
    pd.testing.assert_frame_equal(pd.concat(chunks), ref["particles"], check_exact=True)


def test_write_read_exact_floats_ints_strings(tmp_path):
    df = _mixed_table(2000, seed=1)
    df["flag"] = np.arange(2000) % 2 == 0
    df["empty"] = ["" if i % 3 else "a\tb" for i in range(2000)]
    df[S.amplitude_column(7)] = np.linspace(-200, 200, 2000)
    df[S.FLAG] = np.arange(2000, dtype=np.int64) % 4
    p = tmp_path / "w.star"
    S.write_star(p, df, _optics())
    back = S.read_star(p)
    b = back.particles
    for col in df.columns:
        if col == "flag":
            np.testing.assert_array_equal(b[col].to_numpy(), df[col].astype(int).to_numpy())
            continue
        if df[col].dtype.kind == "f":
            assert b[col].dtype == np.float64, col
            np.testing.assert_array_equal(b[col].to_numpy(), df[col].to_numpy(), err_msg=col)  # bit-exact, NaN too
        elif df[col].dtype.kind == "i":
            assert b[col].dtype == np.int64, col
            np.testing.assert_array_equal(b[col].to_numpy(), df[col].to_numpy(), err_msg=col)
        else:
            assert list(b[col]) == list(df[col]), col
    assert list(b.columns) == list(df.columns)
    assert S.amplitude_modes(b) == [7]
    pd.testing.assert_frame_equal(back.optics, _optics(), check_exact=True)
    # starfile agrees on our output
    pd.testing.assert_frame_equal(starfile.read(p)["particles"], b, check_exact=True)


def test_write_is_atomic(tmp_path):
    p = tmp_path / "keep.star"
    S.write_star(p, pd.DataFrame({"rlnImageName": ["1@a.mrcs"]}), _optics())
    before = p.read_bytes()

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    bad = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "x": [Boom(), Boom()]})
    with pytest.raises(RuntimeError, match="boom"):
        S.write_star(p, bad, _optics())
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.star"]


def test_iter_particles_bounded_chunks_and_optics_after(tmp_path):
    df = _mixed_table(1000, seed=2)
    part = tmp_path / "part.star"
    S.write_star(part, df, None, version_comment=False)  # particles block only
    p = tmp_path / "v2.star"  # particles first, optics after (like relion31.v2.star)
    p.write_text("# version 30001\n\n" + part.read_text() + "\n# version 30001\n\ndata_optics\n\nloop_\n"
                 "_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.06\n")
    chunks = list(S.iter_particles(p, chunksize=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    whole = pd.concat(chunks)
    s = S.read_star(p)
    pd.testing.assert_frame_equal(whole, s.particles, check_exact=True)
    pd.testing.assert_frame_equal(whole, df, check_exact=True, check_dtype=False)
    assert list(s.optics["rlnImagePixelSize"]) == [1.06]


def test_column_names():
    assert S.amplitude_column(7) == "dhnmaAmplitude007"
    assert S.amplitude_column(123) == "dhnmaAmplitude123"
    with pytest.raises(ValueError):
        S.amplitude_column(0)
    cols = ["rlnImageName", "dhnmaAmplitude009", "dhnmaAmplitude007", "dhnmaAmplitudeX", "dhnmaPC2", "dhnmaPC1"]
    assert S.amplitude_modes(cols) == [7, 9]
    assert S.amplitude_columns(cols) == ["dhnmaAmplitude007", "dhnmaAmplitude009"]
    assert S.pc_column(1) == "dhnmaPC1" and S.pc_columns(cols) == ["dhnmaPC1", "dhnmaPC2"]
    assert S.POSE_COLUMNS == ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


# ---------------------------------------------------------------------------------------
# Image locations

@pytest.mark.peer
def test_image_locations_peer(peer_dir):
    s = S.read_star(peer_dir / "relion31.star")
    files, fidx, iidx = S.image_locations(s)
    assert files == [peer_dir / "relion31.mrcs"]
    assert list(fidx) == [0] * 5 and list(iidx) == [0, 1, 2, 3, 4]
    files2, _, _ = S.image_locations(s, data_dir=peer_dir)
    assert [f.resolve() for f in files2] == [(peer_dir / "relion31.mrcs").resolve()]


def test_image_locations_relion_project_layout(tmp_path):
    proj = tmp_path / "project"
    (proj / "Extract" / "job007").mkdir(parents=True)
    (proj / "Refine3D" / "job010").mkdir(parents=True)
    for name in ("a.mrcs", "b.mrcs"):
        (proj / "Extract" / "job007" / name).write_bytes(b"")
    (proj / "Refine3D" / "job010" / "local.mrcs").write_bytes(b"")
    star = proj / "Refine3D" / "job010" / "run_data.star"
    star.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n"
                    "000003@Extract/job007/b.mrcs 1\n1@Extract/job007/a.mrcs 1\n000002@Extract/job007/b.mrcs 1\n"
                    f"5@{proj / 'Extract' / 'job007' / 'a.mrcs'} 1\nlocal.mrcs 1\n")
    s = S.read_star(star)
    files, fidx, iidx = S.image_locations(s)
    assert [f.name for f in files] == ["b.mrcs", "a.mrcs", "a.mrcs", "local.mrcs"]
    assert files[0] == proj / "Extract" / "job007" / "b.mrcs"  # found two levels up
    assert list(fidx) == [0, 1, 0, 2, 3] and list(iidx) == [2, 0, 1, 4, 0]
    # data_dir given: only there
    with pytest.raises(InputError) as e:
        S.image_locations(s, data_dir=tmp_path)
    assert "Extract/job007/b.mrcs" in str(e.value) and "row 1" in str(e.value)


def test_image_locations_missing_stack_names_stack_and_first_row(tmp_path):
    (tmp_path / "ok.mrcs").write_bytes(b"")
    p = tmp_path / "p.star"
    p.write_text("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@ok.mrcs 1\n2@ok.mrcs 1\n"
                 "1@gone.mrcs 1\n2@gone.mrcs 1\n")
    with pytest.raises(InputError) as e:
        S.image_locations(S.read_star(p))
    msg = str(e.value)
    assert "gone.mrcs" in msg and "row 3" in msg and "not found" in msg
    files, _, _ = S.image_locations(S.read_star(p), check_exists=False)
    assert [f.name for f in files] == ["ok.mrcs", "gone.mrcs"]


def test_image_locations_bad_image_number(tmp_path):
    p = tmp_path / "p.star"
    p.write_text("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@a.mrcs 1\nx@a.mrcs 1\n")
    with pytest.raises(InputError) as e:
        S.image_locations(S.read_star(p), check_exists=False)
    assert e.value.row == 2


def test_image_locations_vectorised_large():
    n = 200_000
    names = pd.Series([f"{i % 1000 + 1:06d}@s{i // 1000}.mrcs" for i in range(n)], dtype="str")
    s = S.StarData(pd.DataFrame({"rlnImageName": names}), pd.DataFrame(), Path("/nowhere/x.star"), "3.1")
    files, fidx, iidx = S.image_locations(s, check_exists=False)
    assert len(files) == 200 and files[3] == Path("/nowhere/s3.mrcs")
    np.testing.assert_array_equal(fidx, np.arange(n) // 1000)
    np.testing.assert_array_equal(iidx, np.arange(n) % 1000)


# ---------------------------------------------------------------------------------------
# Bad STAR input (the CLI versions are in test_bad_input.py)

def test_missing_star_file(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        S.read_star(tmp_path / "nope.star")
    assert "nope.star" in str(e.value)


def test_not_a_star_file(tmp_path):
    p = tmp_path / "x.star"
    p.write_text("hello world\n1 2 3\n")
    with pytest.raises(InputError, match="not a STAR file"):
        S.read_star(p)
    p.write_bytes(b"\x00\x01MRC")
    with pytest.raises(InputError, match="not a STAR file"):
        S.read_star(p)


def test_no_particle_block(tmp_path):
    p = tmp_path / "x.star"
    p.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n")
    with pytest.raises(InputError, match="no particle block"):
        S.read_star(p)


def test_no_image_name(tmp_path):
    p = tmp_path / "x.star"
    p.write_text("data_particles\nloop_\n_rlnDefocusU\n_rlnDefocusV\n1 2\n")
    with pytest.raises(InputError, match="_rlnImageName"):
        S.read_star(p)


@pytest.mark.parametrize("row,expect", [
    ("3@a.mrcs 1.0", "2 values where the header has 3"),          # short row
    ("3@a.mrcs 1.0 2.0 9.0", "4 values where the header has 3"),  # long row
    ("3@a.mrcs abc 2.0", "_rlnDefocusU = 'abc' is not a number"),  # text in a numeric column
])
def test_malformed_rows(tmp_path, row, expect):
    p = tmp_path / "x.star"
    p.write_text("data_\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"
                 f"1@a.mrcs 1.0 2.0\n# a comment\n\n2@a.mrcs 1.0 2.0\n{row}\n4@a.mrcs 1.0 2.0\n")
    with pytest.raises(InputError) as e:
        S.read_star(p, pixel_size=1.0)
    msg = str(e.value)
    assert expect in msg and str(p) in msg
    assert "row 3" in msg or "line 11" in msg


def test_unknown_optics_group(tmp_path):
    p = tmp_path / "x.star"
    p.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n\n"
                 "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n2@a.mrcs 3\n")
    with pytest.raises(InputError, match="optics group 3") as e:
        S.read_star(p)
    assert e.value.row == 2


def test_require_columns(tmp_path):
    s = S.StarData(pd.DataFrame({"rlnImageName": ["1@a"], "rlnDefocusU": [1.0], "rlnOpticsGroup": [1]}),
                   pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0]}), tmp_path / "x.star", "3.1")
    S.require_columns(s, ["rlnDefocusU", "rlnVoltage"], "the CTF")
    with pytest.raises(InputError) as e:
        S.require_columns(s, S.CTF_COLUMNS, "the CTF")
    assert str(e.value) == (f"{tmp_path / 'x.star'}: missing column(s) _rlnDefocusV, _rlnDefocusAngle, "
                            "_rlnSphericalAberration, _rlnAmplitudeContrast needed for the CTF")


@pytest.mark.parametrize("first", ["1@a.mrcs 1.0 2.0 5", "1@a.mrcs 1.0 2.0 5 6"])
def test_first_row_too_long_is_an_error_not_an_index(tmp_path, first):
    """pandas would silently turn the first column into an index; starfile fails obscurely."""
    p = tmp_path / "x.star"
    p.write_text(f"data_\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n{first}\n2@a.mrcs 1.0 2.0\n")
    with pytest.raises(InputError) as e:
        S.read_star(p, pixel_size=1.0)
    assert e.value.row == 1 and "line 6" in str(e.value) and "where the header has 3 columns" in str(e.value)


def test_empty_particle_block(tmp_path):
    p = tmp_path / "e.star"
    p.write_text("# version 30001\ndata_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n\n"
                 "# version 30001\ndata_particles\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n\n# end\n")
    s = S.read_star(p)
    assert len(s) == 0 and list(s.particles.columns) == ["rlnImageName", "rlnOpticsGroup"]
    chunks = list(S.iter_particles(p, 10))
    assert sum(len(c) for c in chunks) == 0
    S.write_star(tmp_path / "o.star", s.particles, s.optics)
    assert len(S.read_star(tmp_path / "o.star")) == 0


def test_short_row_in_a_text_column_is_detected(tmp_path):
    """pandas fills absent trailing values with "" when NaN parsing is restricted; not silently."""
    p = tmp_path / "x.star"
    p.write_text('data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_myNote\n1@a.mrcs 1.0 hello\n'
                 '2@a.mrcs 1.0 ""\n3@a.mrcs 1.0\n')
    with pytest.raises(InputError) as e:
        S.read_star(p)
    assert e.value.row == 3 and "2 values where the header has 3" in str(e.value)
    p.write_text('data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_myNote\n1@a.mrcs 1.0 hello\n2@a.mrcs 1.0 ""\n')
    assert list(S.read_star(p).particles["myNote"]) == ["hello", ""]


def test_writer_without_pyarrow_writes_the_same_values(tmp_path, monkeypatch):
    df = _mixed_table(500, seed=4)
    df["empty"] = ["", "a b"] * 250
    S.write_star(tmp_path / "arrow.star", df, _optics())
    monkeypatch.setattr(S, "_arrow", lambda: (None, None))
    S.write_star(tmp_path / "plain.star", df, _optics())
    a, b = S.read_star(tmp_path / "arrow.star"), S.read_star(tmp_path / "plain.star")
    pd.testing.assert_frame_equal(a.particles, b.particles, check_exact=True)
    pd.testing.assert_frame_equal(b.particles, df, check_exact=True)


def test_write_elsewhere_rebases_image_paths(tmp_path):
    """A STAR written into another directory with ``source=`` still finds its images."""
    from deephemnma.core.mrc import ParticleImages, write_stack
    from deephemnma.core.star import concat_stars, count_particles, read_star, write_star

    (tmp_path / "a" / "stacks").mkdir(parents=True)
    imgs = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    write_stack(tmp_path / "a" / "stacks" / "s.mrcs", imgs, 1.5)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [1.5],
                           "rlnImageSize": [4], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnImageName": [f"{i:06d}@stacks/s.mrcs" for i in (1, 2, 3)], "rlnOpticsGroup": 1,
                          "rlnAngleRot": [1.0, 2.0, 3.0]})
    src = write_star(tmp_path / "a" / "in.star", parts, optics)
    star = read_star(src)
    out = write_star(tmp_path / "b" / "deep" / "out.star", star.particles.iloc[[2, 0]], star.optics, source=src)
    back = read_star(out)
    assert back.particles["rlnImageName"].tolist() == ["000003@../../a/stacks/s.mrcs", "000001@../../a/stacks/s.mrcs"]
    np.testing.assert_array_equal(ParticleImages.from_star(back).read([0, 1]), imgs[[2, 0]])
    # concatenation of two chunk files written in different directories
    write_star(tmp_path / "a" / "part2.star", star.particles.iloc[[1]], star.optics)
    merged_star = concat_stars([out, tmp_path / "a" / "part2.star"], tmp_path / "c" / "all.star")
    assert count_particles(tmp_path / "c" / "all.star") == 3
    np.testing.assert_array_equal(ParticleImages.from_star(read_star(merged_star.path)).read([0, 1, 2]), imgs[[2, 0, 1]])
    # differing optics tables are refused, naming the file
    other = optics.copy()
    other["rlnVoltage"] = 200.0
    write_star(tmp_path / "a" / "other.star", star.particles.iloc[[1]], other)
    with pytest.raises(InputError, match="other.star: optics table differs"):
        concat_stars([out, tmp_path / "a" / "other.star"], tmp_path / "c" / "bad.star")
    assert not (tmp_path / "c" / "bad.star").exists()
