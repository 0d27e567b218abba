"""Bad input through the CLI (`deephemnma check`): exit code 2, exactly one stderr line
naming the file (and row), nothing on stdout."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from deephemnma.core import star as S

OPTICS = "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n" \
         "_rlnImagePixelSize\n_rlnImageSize\n1 300 2.7 0.1 1.5 16\n\n"
CTF_HEADER = "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"


def stack(path, n, box=16, seed=0):
    data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 1.5
    return data


def rows(names):
    return "".join(f"{n} 1 10000 9000 30\n" for n in names)


@pytest.fixture
def dataset(tmp_path):
    """A valid RELION 3.1 data set: two stacks (4 and 3 images, 16²), 7 particles."""
    (tmp_path / "Extract").mkdir()
    stack(tmp_path / "Extract" / "a.mrcs", 4, seed=1)
    stack(tmp_path / "Extract" / "b.mrcs", 3, seed=2)
    names = [f"{i}@Extract/a.mrcs" for i in range(1, 5)] + [f"{i:06d}@Extract/b.mrcs" for i in range(1, 4)]
    star = tmp_path / "particles.star"
    star.write_text("# version 30001\n" + OPTICS + CTF_HEADER + rows(names))
    return star


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_check_ok(run_cli, dataset):
    proc = run_cli("check", "--particles", dataset, "--require-ctf")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RELION 3.1 particle file, 7 particles" in out
    assert "box: 16 px" in out and "image stacks: 2" in out and "images read: 7" in out
    assert "rlnDefocusU" in out and "pose columns: none" in out


@pytest.mark.peer
def test_check_ok_peer(run_cli, peer_dir):
    proc = run_cli("check", "--particles", peer_dir / "relion31.star", "--require-ctf")
    assert proc.returncode == 0, proc.stderr
    assert "5 particles" in proc.stdout and "box: 256 px" in proc.stdout and "2.806" in proc.stdout


def test_missing_star_file(run_cli, tmp_path):
    assert_one_line_error(run_cli("check", "--particles", tmp_path / "nope.star"), tmp_path / "nope.star", "not found")


def test_missing_stack(run_cli, dataset):
    (dataset.parent / "Extract" / "b.mrcs").unlink()
    assert_one_line_error(run_cli("check", "--particles", dataset), "b.mrcs", "not found", "row 5")


def test_truncated_mrc(run_cli, dataset):
    b = dataset.parent / "Extract" / "b.mrcs"
    b.write_bytes(b.read_bytes()[:-100])
    assert_one_line_error(run_cli("check", "--particles", dataset), b, "truncated")


def test_corrupt_mrc(run_cli, dataset):
    b = dataset.parent / "Extract" / "b.mrcs"
    raw = b.read_bytes()
    b.write_bytes(np.random.default_rng(7).bytes(1024) + raw[1024:])
    assert_one_line_error(run_cli("check", "--particles", dataset), b, "corrupt")


def test_not_an_mrc(run_cli, dataset):
    b = dataset.parent / "Extract" / "b.mrcs"
    b.write_text("this is not an image stack\n")
    assert_one_line_error(run_cli("check", "--particles", dataset), b, "not an MRC file")


def test_star_without_image_name(run_cli, tmp_path):
    p = tmp_path / "p.star"
    p.write_text(OPTICS + "data_particles\nloop_\n_rlnOpticsGroup\n_rlnDefocusU\n1 10000\n1 11000\n")
    assert_one_line_error(run_cli("check", "--particles", p), p, "_rlnImageName")


def test_not_a_star_file(run_cli, dataset):
    b = dataset.parent / "Extract" / "b.mrcs"
    assert_one_line_error(run_cli("check", "--particles", b), b, "not a STAR file")


def test_malformed_row(run_cli, dataset):
    text = dataset.read_text().replace("3@Extract/a.mrcs 1 10000 9000 30", "3@Extract/a.mrcs 1 10000 9000")
    dataset.write_text(text)
    assert_one_line_error(run_cli("check", "--particles", dataset), dataset, "row 3", "4 values")


def test_image_index_beyond_stack(run_cli, dataset):
    dataset.write_text(dataset.read_text().replace("000002@Extract/b.mrcs", "000009@Extract/b.mrcs"))
    line = assert_one_line_error(run_cli("check", "--particles", dataset), "b.mrcs", "image 9", "row 6",
                                 "has 3 images")
    assert str(dataset) in line


def test_different_box_sizes(run_cli, dataset):
    stack(dataset.parent / "Extract" / "b.mrcs", 3, box=20)
    assert_one_line_error(run_cli("check", "--particles", dataset), "b.mrcs", "box size 20 differs from 16")


def test_missing_ctf_columns(run_cli, tmp_path, dataset):
    p = tmp_path / "noctf.star"
    p.write_text(OPTICS + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n"
                 "1@Extract/a.mrcs 1 10000\n2@Extract/a.mrcs 1 11000\n")
    assert_one_line_error(run_cli("check", "--particles", p, "--require-ctf"), p,
                          "missing column(s) _rlnDefocusV, _rlnDefocusAngle needed for the CTF")
    ok = run_cli("check", "--particles", p)  # without --require-ctf: reported, not an error
    assert ok.returncode == 0 and "missing for a CTF: rlnDefocusV, rlnDefocusAngle" in ok.stdout


def test_require_columns_lists_only_absent(tmp_path, dataset):
    s = S.read_star(dataset)
    S.require_columns(s, S.CTF_COLUMNS, "the CTF")  # all present (optics + particles)
    with pytest.raises(Exception, match="_rlnPhaseShift"):
        S.require_columns(s, S.CTF_COLUMNS + (S.PHASE_SHIFT,), "the CTF with phase plate")


@pytest.mark.parametrize("value,image", [(np.nan, 2), (np.inf, 3), (-np.inf, 1)])
def test_nan_and_inf_pixels(run_cli, dataset, value, image):
    b = dataset.parent / "Extract" / "b.mrcs"
    with mrcfile.open(b, mode="r+") as m:
        m.data[image - 1, 5, 7] = value
    line = assert_one_line_error(run_cli("check", "--particles", dataset), b, f"image {image} ", "NaN or Inf",
                                 f"STAR row {4 + image}")
    assert "Extract/b.mrcs" in line


def test_relion30_without_pixel_size(run_cli, tmp_path):
    # a 3.0 file with no pixel size anywhere (stack header voxel size 0)
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(np.zeros((2, 8, 8), np.float32))
        m.voxel_size = 0.0
    p = tmp_path / "p.star"
    p.write_text("data_\nloop_\n_rlnImageName\n1@s.mrcs\n2@s.mrcs\n")
    assert_one_line_error(run_cli("check", "--particles", p), p, "--pixel-size")
    ok = run_cli("check", "--particles", p, "--pixel-size", "1.7")
    assert ok.returncode == 0 and "RELION 3.0" in ok.stdout and "pixel size: 1.7 A" in ok.stdout
