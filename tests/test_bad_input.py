"""Bad input through the CLI: exit code 2, exactly one stderr line naming the file (and row),
nothing on stdout, no traceback, no output left behind. First `deephemnma check` in detail,
then a table of realistic bad inputs for every command (test_command_bad_input)."""
from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
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


# ============================================================================ every command
# One table of realistic bad inputs, one or more per command: each must give exit code 2,
# exactly one stderr line "error: ..." naming the file (and row), no traceback, and leave no
# output behind (only the command's log file may exist in the output folder).

AMP = ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude009"]
POSE = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
N_LAND = 30


def _toy_modes(n_atoms=40, seed=0):
    from deephemnma.core.modes import ModeSet

    rng = np.random.default_rng(seed)
    coords = rng.normal(scale=8.0, size=(n_atoms, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3 * n_atoms, 9)))
    vec = q.T.reshape(9, n_atoms, 3)
    s = lambda v: np.array([v] * n_atoms)  # noqa: E731
    return ModeSet(coords=coords, weights=np.ones(n_atoms), sigma=np.ones(n_atoms), element=s("C"),
                   atom_name=s("CA"), res_name=s("ALA"), res_seq=np.arange(1, n_atoms + 1), ins_code=s(""),
                   chain_id=s("A"), mode_numbers=np.array([7, 8, 9]), modes=vec[6:], computed_numbers=np.arange(1, 10),
                   computed_modes=vec, eigenvalues=np.arange(9.0), frequencies=np.arange(9.0),
                   collectivity=np.ones(9), centre=np.zeros(3), kind="atomic")


def _write_star(path, df):
    from deephemnma.core.star import write_star

    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [16], "rlnImageDimensionality": [2]})
    write_star(path, df, optics)
    return path


@pytest.fixture(scope="module")
def land(tmp_path_factory):
    """Landscape-stage inputs in one folder: amp.star (30 particles with amplitudes, landscape
    coordinates and poses) and broken variants, modes.npz, model.json (PCA), truth.csv, ..."""
    from deephemnma.core.modes import save_modes
    from deephemnma.landscape import PCAModel, SpectralModel

    d = tmp_path_factory.mktemp("land")
    rng = np.random.default_rng(0)
    X = rng.normal(scale=50.0, size=(N_LAND, 3))
    model = PCAModel.fit(X, AMP, 2)
    model.save(d / "model.json")
    Y = model.transform(X)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@s.mrcs" for i in range(N_LAND)], "rlnOpticsGroup": 1})
    for j, c in enumerate(AMP):
        df[c] = X[:, j]
    df["dhnmaPC1"], df["dhnmaPC2"] = Y[:, 0], Y[:, 1]
    for c in POSE:
        df[c] = rng.uniform(0, 90, N_LAND)
    _write_star(d / "amp.star", df)
    _write_star(d / "amp3.star", df.iloc[:3])
    _write_star(d / "amp1.star", df.iloc[:1])
    _write_star(d / "empty.star", df.iloc[:0])
    _write_star(d / "plain.star", df[["rlnImageName", "rlnOpticsGroup"]])
    nan = df.copy()
    nan.loc[4, "dhnmaPC1"] = np.nan
    nan.loc[4, "dhnmaAmplitude008"] = np.nan
    _write_star(d / "nan.star", nan)
    text = df.copy()
    text["dhnmaAmplitude008"] = text["dhnmaAmplitude008"].map("{:.3f}".format)
    text.loc[3, "dhnmaAmplitude008"] = "abc"
    _write_star(d / "text.star", text)
    df.to_csv(d / "truth.csv", index=False)
    t = df.copy()
    t.loc[6, "rlnAngleTilt"] = np.nan
    t.to_csv(d / "truth_nan.csv", index=False)
    df.iloc[:10].to_csv(d / "truth10.csv", index=False)
    m10 = df.rename(columns={"dhnmaAmplitude009": "dhnmaAmplitude010"})
    _write_star(d / "amp_mode10.star", m10)
    m10.to_csv(d / "truth_mode10.csv", index=False)
    PCAModel.fit(X, ["dhnmaAmplitude007", "dhnmaAmplitude008", "dhnmaAmplitude010"], 2).save(d / "model_mode10.json")
    SpectralModel.fit(X, AMP, 2, n_neighbors=5).save(d / "spectral.json")
    (d / "model_nokey.json").write_text('{"method": "pca", "mean": [0, 0, 0]}\n')
    ms = _toy_modes()
    save_modes(d / "modes.npz", ms)
    ms.modes = ms.modes[:, :30]  # mode vectors for 30 atoms, 40 atoms in the file
    save_modes(d / "modes_atoms.npz", ms)
    (d / "ref.pdb").write_text("ATOM      1  CA  ALA A   1       0.000   0.000   0.000  1.00  0.00           C\nEND\n")
    (d / "groups_nomean.csv").write_text("group,size\n1,3\n")
    (d / "groups_text.csv").write_text("group,size," + ",".join(f"{c}_mean" for c in AMP) + "\n0,3,1,2,3\n1,3,x,1,2\n")
    (d / "groups_empty.csv").write_text("")
    (d / "groups_bad").mkdir()
    (d / "groups_bad" / "groups.json").write_text("{not json")
    (d / "a_file").write_text("a regular file where a directory is expected\n")
    return d


# (id, argv with {d} = the land folder and {o} = a fresh output folder, needles in the error line)
CASES = [
    # filter
    ("filter-too-few", ["filter", "--particles", "{d}/amp3.star", "--out", "{o}/kept.star"],
     ["amp3.star:", "more particles than modes", "3 particle(s), 3 mode(s)"]),
    ("filter-empty-star", ["filter", "--particles", "{d}/empty.star", "--out", "{o}/kept.star"],
     ["empty.star:", "0 particle(s)"]),
    ("filter-nan", ["filter", "--particles", "{d}/nan.star", "--out", "{o}/kept.star"],
     ["nan.star (row 5)", "non-finite amplitude", "_dhnmaAmplitude008"]),
    ("filter-text", ["filter", "--particles", "{d}/text.star", "--out", "{o}/kept.star"],
     ["text.star (row 4)", "'abc' is not a number"]),
    ("filter-no-amplitudes", ["filter", "--particles", "{d}/plain.star", "--out", "{o}/kept.star"],
     ["plain.star:", "no amplitude columns"]),
    ("filter-modes-as-star", ["filter", "--particles", "{d}/modes.npz", "--out", "{o}/kept.star"],
     ["modes.npz:", "not a STAR file"]),
    # landscape
    ("landscape-one-particle", ["landscape", "--particles", "{d}/amp1.star", "--out", "{o}/l.star"],
     ["amp1.star:", "pca landscape needs at least 2 particles, got 1"]),
    ("landscape-spectral-too-few", ["landscape", "--particles", "{d}/amp3.star", "--out", "{o}/l.star",
                                    "--set", "landscape.method=spectral"],
     ["amp3.star:", "spectral landscape needs at least 16 particles, got 3"]),
    ("landscape-spectral-compare-too-few", ["landscape", "--particles", "{d}/amp3.star", "--out", "{o}/l.star",
                                            "--set", "landscape.spectral.compare=true"],
     ["amp3.star:", "spectral landscape needs at least"]),
    ("landscape-nan", ["landscape", "--particles", "{d}/nan.star", "--out", "{o}/l.star"],
     ["nan.star (row 5)", "non-finite feature"]),
    ("landscape-text", ["landscape", "--particles", "{d}/text.star", "--out", "{o}/l.star"],
     ["text.star (row 4)", "_dhnmaAmplitude008 = 'abc' is not a number"]),
    ("landscape-star-as-model", ["landscape", "--particles", "{d}/amp.star", "--out", "{o}/l.star",
                                 "--apply-model", "{d}/amp3.star"], ["amp3.star:", "not a JSON landscape model"]),
    ("landscape-npz-as-model", ["landscape", "--particles", "{d}/amp.star", "--out", "{o}/l.star",
                                "--apply-model", "{d}/modes.npz"], ["modes.npz:", "not a JSON landscape model"]),
    ("landscape-model-missing-key", ["landscape", "--particles", "{d}/amp.star", "--out", "{o}/l.star",
                                     "--apply-model", "{d}/model_nokey.json"],
     ["model_nokey.json:", "not a valid pca landscape model", "columns"]),
    ("landscape-model-columns-absent", ["landscape", "--particles", "{d}/plain.star", "--out", "{o}/l.star",
                                        "--apply-model", "{d}/model.json"], ["plain.star:", "dhnmaAmplitude007"]),
    # groups
    ("groups-nan-bins", ["groups", "--particles", "{d}/nan.star", "--outdir", "{o}"],
     ["nan.star (row 5)", "non-finite landscape coordinate"]),
    ("groups-nan-kmeans", ["groups", "--particles", "{d}/nan.star", "--outdir", "{o}",
                           "--set", "landscape.groups.method=kmeans"], ["nan.star (row 5)", "non-finite"]),
    ("groups-no-coordinates", ["groups", "--particles", "{d}/plain.star", "--outdir", "{o}"],
     ["plain.star:", "no landscape coordinates"]),
    ("groups-kmeans-too-few", ["groups", "--particles", "{d}/amp3.star", "--outdir", "{o}",
                               "--set", "landscape.groups.method=kmeans", "--set", "landscape.groups.k=5"],
     ["amp3.star:", "needs at least 5 particles, got 3"]),
    ("groups-gmm-one-particle", ["groups", "--particles", "{d}/amp1.star", "--outdir", "{o}",
                                 "--set", "landscape.groups.method=gmm", "--set", "landscape.groups.k=1"],
     ["amp1.star:", "needs at least 2 particles, got 1"]),
    ("groups-empty-star", ["groups", "--particles", "{d}/empty.star", "--outdir", "{o}"],
     ["empty.star:", "no particles to group"]),
    # animate
    ("animate-star-as-model", ["animate", "--model", "{d}/amp.star", "--modes", "{d}/modes.npz", "--outdir", "{o}"],
     ["amp.star:", "not a JSON landscape model"]),
    ("animate-npz-as-model", ["animate", "--model", "{d}/modes.npz", "--modes", "{d}/modes.npz", "--outdir", "{o}"],
     ["modes.npz:", "not a JSON landscape model"]),
    ("animate-model-missing-key", ["animate", "--model", "{d}/model_nokey.json", "--modes", "{d}/modes.npz",
                                   "--outdir", "{o}"], ["model_nokey.json:", "not a valid pca landscape model"]),
    ("animate-spectral-model", ["animate", "--model", "{d}/spectral.json", "--modes", "{d}/modes.npz",
                                "--outdir", "{o}"], ["spectral.json:", "no inverse map"]),
    ("animate-pdb-as-modes", ["animate", "--model", "{d}/model.json", "--modes", "{d}/ref.pdb", "--outdir", "{o}"],
     ["ref.pdb:", "not a normal-mode .npz file"]),
    ("animate-model-modes-mismatch", ["animate", "--model", "{d}/model_mode10.json", "--modes", "{d}/modes.npz",
                                      "--outdir", "{o}"], ["modes.npz:", "lacks mode(s) 10", "model_mode10.json"]),
    ("animate-atoms-modes-mismatch", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes_atoms.npz",
                                      "--outdir", "{o}"], ["modes_atoms.npz:", "not (M, 40, 3) for the 40 atoms"]),
    ("animate-particles-nan", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                               "--particles", "{d}/nan.star", "--outdir", "{o}"],
     ["nan.star (row 5)", "non-finite landscape coordinate"]),
    ("animate-particles-no-coordinates", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                                          "--particles", "{d}/plain.star", "--outdir", "{o}"],
     ["plain.star:", "landscape coordinate column"]),
    ("animate-groups-missing-columns", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                                        "--groups", "{d}/groups_nomean.csv", "--outdir", "{o}"],
     ["groups_nomean.csv:", "missing column(s) dhnmaAmplitude007_mean"]),
    ("animate-groups-text", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                             "--groups", "{d}/groups_text.csv", "--outdir", "{o}"],
     ["groups_text.csv (row 2)", "'x' is not a number"]),
    ("animate-groups-empty", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                              "--groups", "{d}/groups_empty.csv", "--outdir", "{o}"], ["groups_empty.csv:", "empty"]),
    ("animate-groups-binary", ["animate", "--model", "{d}/model.json", "--modes", "{d}/modes.npz",
                               "--groups", "{d}/modes.npz", "--outdir", "{o}"], ["modes.npz:", "not a CSV table"]),
    # evaluate
    ("evaluate-truth-missing", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/nope.csv",
                                "--outdir", "{o}"], ["nope.csv:", "not found"]),
    ("evaluate-truth-binary", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/modes.npz",
                               "--outdir", "{o}"], ["modes.npz:", "not a readable CSV table"]),
    ("evaluate-truth-no-key", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/groups_nomean.csv",
                               "--outdir", "{o}"], ["groups_nomean.csv:", "missing column rlnImageName"]),
    ("evaluate-truth-nan", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/truth_nan.csv",
                            "--outdir", "{o}"],
     ["truth_nan.csv (row 7)", "non-finite ground-truth value", "rlnAngleTilt"]),
    ("evaluate-particles-nan", ["evaluate", "--particles", "{d}/nan.star", "--truth", "{d}/truth.csv",
                                "--outdir", "{o}"], ["nan.star (row 5)", "non-finite"]),
    ("evaluate-no-ground-truth", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/truth10.csv",
                                  "--outdir", "{o}"], ["amp.star (row 11)", "11@s.mrcs has no ground truth"]),
    ("evaluate-empty-star", ["evaluate", "--particles", "{d}/empty.star", "--truth", "{d}/truth.csv",
                             "--outdir", "{o}"], ["empty.star:", "no particles"]),
    ("evaluate-nothing-to-compare", ["evaluate", "--particles", "{d}/plain.star", "--truth", "{d}/truth.csv",
                                     "--outdir", "{o}"], ["plain.star:", "nothing to compare"]),
    ("evaluate-modes-mismatch", ["evaluate", "--particles", "{d}/amp_mode10.star", "--truth", "{d}/truth_mode10.csv",
                                 "--modes", "{d}/modes.npz", "--outdir", "{o}"], ["modes.npz:", "lacks mode(s) 10"]),
    ("evaluate-pdb-as-modes", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/truth.csv",
                               "--modes", "{d}/ref.pdb", "--outdir", "{o}"], ["ref.pdb:", "not a normal-mode .npz"]),
    ("evaluate-groups-without-maps", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/truth.csv",
                                      "--groups", "{d}/groups_bad", "--outdir", "{o}"], ["groups_bad:", "--maps"]),
    ("evaluate-groups-json-corrupt", ["evaluate", "--particles", "{d}/amp.star", "--truth", "{d}/truth.csv",
                                      "--modes", "{d}/modes.npz", "--groups", "{d}/groups_bad", "--maps", "{d}",
                                      "--outdir", "{o}"], ["groups.json:", "not a JSON file"]),
    # merge
    ("merge-missing", ["merge", "--particles", "{d}/amp.star", "{d}/nope.star", "--out", "{o}/m.star"],
     ["nope.star:", "not found"]),
    ("merge-not-star", ["merge", "--particles", "{d}/amp.star", "{d}/modes.npz", "--out", "{o}/m.star"],
     ["modes.npz:", "not a STAR file"]),
    ("merge-columns-differ", ["merge", "--particles", "{d}/amp.star", "{d}/plain.star", "--out", "{o}/m.star"],
     ["plain.star:", "missing column(s)", "present in other inputs"]),
    ("merge-duplicate-particles", ["merge", "--particles", "{d}/amp.star", "{d}/amp3.star", "--out", "{o}/m.star"],
     ["amp3.star (row 1)", "particle 1@s.mrcs is also in", "amp.star (row 1)"]),
    # report, config, nma, predict, train
    ("report-no-results", ["report", "--results", "{d}/nope", "--out", "{o}/r.html"],
     ["nope:", "results directory not found"]),
    ("report-results-is-a-file", ["report", "--results", "{d}/amp.star", "--out", "{o}/r.html"],
     ["amp.star:", "results directory not found"]),
    ("config-missing", ["config", "--config", "{d}/nope.yaml", "--out", "{o}/c.yaml"], ["nope.yaml:", "not found"]),
    ("config-star-as-yaml", ["config", "--config", "{d}/amp.star", "--out", "{o}/c.yaml"], ["amp.star:", "YAML"]),
    ("nma-missing-reference", ["nma", "--reference", "{d}/nope.pdb", "--out", "{o}/m.npz"], ["nope.pdb:", "not found"]),
    ("nma-star-as-reference", ["nma", "--reference", "{d}/amp.star", "--out", "{o}/m.npz"],
     ["amp.star:", "atomic model"]),
    ("nma-too-few-atoms", ["nma", "--reference", "{d}/ref.pdb", "--out", "{o}/m.npz"], ["ref.pdb:", "at least 4"]),
    ("predict-missing-checkpoint", ["predict", "--checkpoint", "{d}/nope.pt", "--particles", "{d}/amp.star",
                                    "--out", "{o}/p.star"], ["nope.pt:", "checkpoint not found"]),
    ("predict-star-as-checkpoint", ["predict", "--checkpoint", "{d}/amp.star", "--particles", "{d}/amp.star",
                                    "--out", "{o}/p.star"], ["amp.star:", "not a readable checkpoint"]),
    ("train-no-labels", ["train", "-q", "--particles", "{d}/plain.star", "--outdir", "{o}"],
     ["plain.star:", "missing label column(s)"]),
    # commands whose logic lives elsewhere (align, simulate, preprocess)
    ("align-pdb-as-modes", ["align", "--particles", "{d}/amp.star", "--modes", "{d}/ref.pdb", "--out", "{o}/a.star"],
     ["ref.pdb:", "not a normal-mode .npz"]),
    ("simulate-star-as-modes", ["simulate", "--modes", "{d}/amp.star", "--outdir", "{o}"],
     ["amp.star:", "not a normal-mode .npz"]),
    ("preprocess-empty-star", ["preprocess", "--particles", "{d}/empty.star", "--outdir", "{o}"],
     ["empty.star:", "no particles"]),
    ("preprocess-not-star", ["preprocess", "--particles", "{d}/modes.npz", "--outdir", "{o}"],
     ["modes.npz:", "not a STAR file"]),
    # an output folder under a regular file: fetch-demo's own check (before any download)
    ("fetch-demo-outdir-under-a-file", ["fetch-demo", "--outdir", "{d}/a_file/demo", "--log", "{o}/fd.log"],
     ["a_file/demo:", "cannot create the output directory"]),
    # ... and where the log file or an output is created by code outside the command (core.logs, core.fileio)
    ("groups-outdir-under-a-file", ["groups", "--particles", "{d}/amp.star", "--outdir", "{d}/a_file/g"],
     ["a_file"]),
    ("filter-out-under-a-file", ["filter", "--particles", "{d}/amp.star", "--out", "{d}/a_file/k.star",
                                 "--log", "{o}/f.log"], ["a_file"]),
    ("config-binary", ["config", "--config", "{d}/modes.npz"], ["modes.npz:"]),
    ("config-set-bad-yaml", ["config", "--set", "nma.cutoff=["], ["nma.cutoff"]),
]


@pytest.mark.parametrize("name,argv,needles", CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_command_bad_input(run_cli, land, tmp_path, name, argv, needles):
    out = tmp_path / "out"
    proc = run_cli(*[a.format(d=land, o=out) for a in argv])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_one_line_error(proc, *needles)
    left = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".log"] if out.exists() else []
    assert not left, f"a failed command left {left}"


def test_check_empty_star(run_cli, land):
    assert_one_line_error(run_cli("check", "--particles", land / "empty.star"), "empty.star:", "no particles")


RECONSTRUCT_HEADER = CTF_HEADER + "_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginXAngst\n_rlnOriginYAngst\n"


@pytest.mark.parametrize("edit,needles", [
    ("no-poses", ["missing pose column(s) _rlnAngleRot"]),
    ("nan-angle", ["(row 4)", "non-finite"]),
    ("empty", ["particles"]),
])
def test_reconstruct_bad_input(run_cli, dataset, tmp_path, edit, needles):
    names = [f"{i}@Extract/a.mrcs" for i in range(1, 5)] + [f"{i:06d}@Extract/b.mrcs" for i in range(1, 4)]
    star = dataset.parent / f"{edit}.star"
    if edit == "no-poses":
        star = dataset
    else:
        body = "".join(f"{n} 1 10000 9000 30 {10 * i} {20 + i} {5 * i} 0.5 -0.5\n" for i, n in enumerate(names))
        if edit == "nan-angle":
            body = body.replace(" 23 ", " nan ", 1)
        star.write_text(OPTICS + RECONSTRUCT_HEADER + (body if edit != "empty" else ""))
    out = tmp_path / "rec"
    # polarity given: the images are noise, and the check under test comes first either way
    line = assert_one_line_error(run_cli("reconstruct", "--particles", star, "--outdir", out,
                                         "--set", "data.invert_contrast=false"), star.name, *needles)
    assert "Traceback" not in line
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".log"]


def test_fetch_demo_without_network_and_a_damaged_cache(run_cli, tmp_path, monkeypatch):
    """A damaged cached download is removed and fetched again; without network (pip may not
    reach an index here) that is one line naming the file, exit 2 — and nothing is written."""
    from deephemnma.core import demo_data

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo_data.SDIST).write_text("not the archive\n")
    monkeypatch.setenv("DEEPHEMNMA_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never download in tests
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    out = tmp_path / "demo"
    assert_one_line_error(run_cli("fetch-demo", "--outdir", out, "-q"), demo_data.SDIST, "could not download")
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".log"]


def test_fetch_demo_outdir_under_a_file_default_log(run_cli, tmp_path):
    (tmp_path / "a_file").write_text("x\n")
    assert_one_line_error(run_cli("fetch-demo", "--outdir", tmp_path / "a_file" / "demo"), "a_file")
