"""MRC conventions: memory-mapped particle access across stacks, stack and volume writers."""
from __future__ import annotations

import io
import pickle
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest

from deephemnma.core import star as S
from deephemnma.core.errors import InputError
from deephemnma.core.mrc import ParticleImages, StackWriter, read_header, read_volume, write_stack, write_volume


def mrc_data(path) -> np.ndarray:
    """mrcfile's own read (permissive: some peer stacks lack the 'MAP ' identifier)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data, dtype=np.float32)


def make_stack(path, n, box, seed=0, mode=2):
    data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    if mode == 1:
        data = (data * 100).astype(np.int16)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 1.5
    return data.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Reading peer stacks

@pytest.mark.peer
def test_relion31_images_equal_mrcfile(peer_dir):
    star = S.read_star(peer_dir / "relion31.star")
    imgs = ParticleImages.from_star(star)
    ref = mrc_data(peer_dir / "relion31.mrcs")
    assert len(imgs) == 5 and imgs.box == 256 and imgs.n_stacks == 1
    out = imgs.read([4, 0, 2, 2])
    assert out.dtype == np.float32 and out.shape == (4, 256, 256)
    np.testing.assert_array_equal(out, ref[[4, 0, 2, 2]])
    np.testing.assert_array_equal(imgs[3], ref[3])
    np.testing.assert_array_equal(imgs[-1], ref[4])


@pytest.mark.peer
def test_hand_random_order(peer_dir):
    ref = mrc_data(peer_dir / "hand.mrcs")
    assert ref.shape == (100, 64, 64)
    imgs = ParticleImages([peer_dir / "hand.mrcs"], np.zeros(100, int), np.arange(100))
    perm = np.random.default_rng(3).permutation(100)
    np.testing.assert_array_equal(imgs.read(perm), ref[perm])
    np.testing.assert_array_equal(imgs.read(perm[:7][::-1]), ref[perm[:7][::-1]])
    assert imgs.read([]).shape == (0, 64, 64)
    with pytest.raises(IndexError):
        imgs.read([100])


@pytest.mark.peer
def test_toy_projections_via_star_and_pickle(peer_dir):
    star = S.read_star(peer_dir / "toy_projections.star")
    imgs = ParticleImages.from_star(star)
    ref = mrc_data(peer_dir / "toy_projections.mrcs")
    idx = np.random.default_rng(0).choice(1000, 64, replace=False)
    np.testing.assert_array_equal(imgs.read(idx), ref[idx])
    assert imgs._open  # a stack is open now
    clone = pickle.loads(pickle.dumps(imgs))
    assert not clone._open  # open files do not travel; they reopen lazily
    np.testing.assert_array_equal(clone.read(idx[::-1]), ref[idx[::-1]])
    batches = list(imgs.iter_batches(300))
    assert [len(i) for i, _ in batches] == [300, 300, 300, 100]
    allidx = np.concatenate([i for i, _ in batches])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(1000))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), ref[allidx])


@pytest.mark.peer
def test_old_style_mrc_without_map_id_is_accepted(peer_dir):
    info = read_header(peer_dir / "empiar_10076_7.mrc")
    assert (info.n, info.ny, info.nx) == (7, 320, 320)
    star = S.read_star(peer_dir / "empiar_10076_7.star")
    np.testing.assert_array_equal(ParticleImages.from_star(star).read([6, 0]),
                                  mrc_data(peer_dir / "empiar_10076_7.mrc")[[6, 0]])


# ---------------------------------------------------------------------------------------
# Many stacks

def test_reading_a_whole_stack_keeps_the_process_small(tmp_path):
    """Images are read, not memory-mapped: reading 64 MB of particles batch by batch leaves the
    process's resident memory where it was (a map kept every page touched resident, so a job
    reading N particles grew by N images)."""
    import psutil

    n, box = 4000, 64
    path = tmp_path / "big.mrcs"
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        for s in range(0, n, 500):
            m.data[s:s + 500] = np.arange(s, s + 500, dtype=np.float32)[:, None, None]
    imgs = ParticleImages([path], np.zeros(n, dtype=np.int64), np.arange(n))
    proc = psutil.Process()
    imgs.read(np.arange(100))
    before = proc.memory_info().rss
    total = 0.0
    for idx, batch in imgs.iter_batches(100):
        assert np.array_equal(batch[:, 0, 0], idx.astype(np.float32))
        total += float(batch[:, box // 2, box // 2].sum())
    assert total == n * (n - 1) / 2
    grown = proc.memory_info().rss - before
    assert grown < 16e6, f"resident memory grew by {grown / 1e6:.1f} MB reading {n * box * box * 4 / 1e6:.0f} MB"
    # repeats and any order, across the run boundaries of the positioned reads
    ParticleImages.MAX_RUN_BYTES, saved = 3 * box * box * 4, ParticleImages.MAX_RUN_BYTES
    try:
        idx = np.array([7, 3, 3, 4, 5, 6, 0, 3999, 8, 7])
        np.testing.assert_array_equal(imgs.read(idx)[:, 1, 1], idx.astype(np.float32))
    finally:
        ParticleImages.MAX_RUN_BYTES = saved
    imgs.close()
    assert not imgs._open


def test_many_stacks_any_order_and_lru(tmp_path):
    a = make_stack(tmp_path / "a.mrcs", 6, 16, seed=1)
    b = make_stack(tmp_path / "b.mrcs", 4, 16, seed=2, mode=1)  # int16 stack read as float32
    c = make_stack(tmp_path / "c.mrcs", 3, 16, seed=3)
    names = ["2@a.mrcs", "1@b.mrcs", "3@c.mrcs", "6@a.mrcs", "4@b.mrcs", "1@c.mrcs", "1@a.mrcs"]
    expect = np.stack([a[1], b[0], c[2], a[5], b[3], c[0], a[0]])
    p = tmp_path / "p.star"
    S.write_star(p, pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1}),
                 pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.5]}))
    imgs = ParticleImages.from_star(S.read_star(p), max_open=1)
    order = np.random.default_rng(0).permutation(7)
    np.testing.assert_array_equal(imgs.read(order), expect[order])
    assert len(imgs._open) == 1
    imgs.validate()
    assert imgs.box == 16 and imgs.n_stacks == 3


def test_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    a = make_stack(tmp_path / "a.mrcs", 8, 8)
    imgs = ParticleImages([tmp_path / "a.mrcs"], np.zeros(8, int), np.arange(8))
    imgs.read([0])  # open a map in the parent first: it must not be shared with the workers

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return torch.from_numpy(imgs[i])

    dl = torch.utils.data.DataLoader(DS(), batch_size=3, num_workers=2)
    got = torch.cat(list(dl)).numpy()
    np.testing.assert_array_equal(got, a)


# ---------------------------------------------------------------------------------------
# Writers

def test_stack_writer_header_and_data(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.normal(size=(10, 24, 24)).astype(np.float32)
    path = tmp_path / "out.mrcs"
    with StackWriter(path, 10, 24, pixel_size=1.23) as w:
        w.write(6, data[6:])          # out of order
        w.append(data[:4])
        w.append(data[4])             # a single 2-D image
        w.write(5, data[5:6])
        assert not path.exists()      # nothing under the final name until closed
    with mrcfile.open(path) as m:
        h = m.header
        assert m.data.shape == (10, 24, 24) and m.data.dtype == np.float32
        assert int(h.mode) == 2 and int(h.nz) == 10 and int(h.ispg) == 0 and m.is_image_stack()
        assert m.voxel_size.x == pytest.approx(1.23) and m.voxel_size.y == pytest.approx(1.23)
        np.testing.assert_array_equal(m.data, data)
        assert float(h.dmin) == pytest.approx(data.min()) and float(h.dmax) == pytest.approx(data.max())
        assert float(h.dmean) == pytest.approx(data.mean(), abs=1e-6)
        assert float(h.rms) == pytest.approx(data.std(), rel=1e-5)
    log = io.StringIO()
    assert mrcfile.validate(path, print_file=log), log.getvalue()
    info = read_header(path)
    assert info.n == 10 and info.voxel_size == pytest.approx(1.23)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mrcs"]


def test_stack_writer_exception_leaves_no_file(tmp_path):
    path = tmp_path / "out.mrcs"
    with pytest.raises(KeyError):
        with StackWriter(path, 5, 8, pixel_size=1.0) as w:
            w.append(np.zeros((2, 8, 8)))
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_stack_writer_incomplete_leaves_no_file(tmp_path):
    path = tmp_path / "out.mrcs"
    with pytest.raises(RuntimeError, match="3 of 5 images were never written"):
        with StackWriter(path, 5, 8, pixel_size=1.0) as w:
            w.append(np.zeros((2, 8, 8)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        with StackWriter(path, 2, 8, pixel_size=1.0) as w:
            w.write(1, np.zeros((2, 8, 8)))  # beyond the end
    assert list(tmp_path.iterdir()) == []


def test_write_stack_roundtrip_through_particle_images(tmp_path):
    data = np.random.default_rng(1).normal(size=(7, 12, 12)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", data, pixel_size=2.0, chunk=3)
    imgs = ParticleImages([tmp_path / "s.mrcs"], np.zeros(7, int), np.arange(7))
    np.testing.assert_array_equal(imgs.read(np.arange(7)), data)


def test_volume_roundtrip(tmp_path):
    vol = np.random.default_rng(2).normal(size=(8, 10, 12)).astype(np.float32)
    path = tmp_path / "v.mrc"
    write_volume(path, vol, voxel_size=0.65, origin=(1.0, -2.5, 3.25))
    v = read_volume(path)
    np.testing.assert_array_equal(v.data, vol)
    assert v.data.dtype == np.float32 and v.voxel_size == pytest.approx(0.65)
    assert v.origin == (1.0, -2.5, 3.25)
    with mrcfile.open(path) as m:  # what other software sees
        assert m.is_volume() and m.data.shape == (8, 10, 12)
        assert m.voxel_size.z == pytest.approx(0.65)
        assert (float(m.header.origin.x), float(m.header.origin.y)) == (1.0, -2.5)
        # no creation time in the header: the same map written later has the same bytes
        assert m.header.nlabl == 1 and bytes(m.header.label[0]).startswith(b"Created by deephemnma")


@pytest.mark.peer
def test_read_peer_volume(peer_dir):
    v = read_volume(peer_dir / "hand-vol.mrc")
    np.testing.assert_array_equal(v.data, mrc_data(peer_dir / "hand-vol.mrc"))
    assert v.data.shape == (64, 64, 64) and v.voxel_size == 1.0


# ---------------------------------------------------------------------------------------
# Bad stacks through the API (the CLI versions are in test_bad_input.py)

def test_index_beyond_stack_names_stack_and_row(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, 8)
    imgs = ParticleImages([tmp_path / "a.mrcs"], [0, 0, 0], [0, 2, 5], star_path=tmp_path / "p.star")
    with pytest.raises(InputError) as e:
        imgs.read([0])  # touching the stack checks every index that refers to it
    msg = str(e.value)
    assert "a.mrcs" in msg and "image 6 requested by STAR row 3" in msg and "has 3 images" in msg


def test_nan_and_inf_pixels(tmp_path):
    data = make_stack(tmp_path / "a.mrcs", 4, 8)
    with mrcfile.open(tmp_path / "a.mrcs", mode="r+") as m:
        m.data[2, 3, 4] = np.nan
        m.data[3, 0, 0] = np.inf
    imgs = ParticleImages([tmp_path / "a.mrcs"] * 1, [0, 0, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(imgs.read([0, 1]), data[:2])
    with pytest.raises(InputError, match="image 3 .*NaN or Inf"):
        imgs.read([1, 2])
    with pytest.raises(InputError, match="image 4 .*NaN or Inf"):
        imgs.read([3])


def test_truncated_and_corrupt_headers(tmp_path):
    make_stack(tmp_path / "a.mrcs", 4, 8)
    raw = (tmp_path / "a.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[:-10])
    with pytest.raises(InputError, match="truncated"):
        read_header(tmp_path / "t.mrcs")
    (tmp_path / "g.mrcs").write_bytes(np.random.default_rng(0).bytes(1024) + raw[1024:])
    with pytest.raises(InputError, match="corrupt"):
        read_header(tmp_path / "g.mrcs")
    (tmp_path / "s.mrcs").write_bytes(b"tiny")
    with pytest.raises(InputError, match="not an MRC file"):
        read_header(tmp_path / "s.mrcs")
    with pytest.raises(InputError, match="not found"):
        read_header(tmp_path / "none.mrcs")


def test_box_mismatch_and_non_square(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2, 8)
    make_stack(tmp_path / "b.mrcs", 2, 10)
    imgs = ParticleImages([tmp_path / "a.mrcs", tmp_path / "b.mrcs"], [0, 1], [0, 0])
    with pytest.raises(InputError, match="box size 10 differs from 8") as e:
        imgs.validate()
    assert "b.mrcs" in str(e.value)
    with mrcfile.new(tmp_path / "r.mrcs") as m:
        m.set_data(np.zeros((2, 8, 6), np.float32))
    with pytest.raises(InputError, match="not square"):
        ParticleImages([tmp_path / "r.mrcs"], [0], [0]).read([0])
