"""MRC image stacks and volumes (via mrcfile): positioned reads, streamed writing.

Reading particles
-----------------
:class:`ParticleImages` gives random access by particle index (STAR row order) to images
spread over many stack files. Nothing is loaded whole: each stack is opened when first
touched in a process (at most ``max_open`` at a time, least recently used closed first)
and the images asked for are read with positioned reads (``os.preadv``, one call per run
of consecutive images, straight into the result for float32 stacks), each followed by a
``POSIX_FADV_WILLNEED`` hint for what follows it (the next batch of a sequential pass is
fetched while the caller works on this one, as a memory map's read-ahead would). Positioned
reads keep no file position, so forked DataLoader workers may share the descriptors; on
pickling they are dropped and reopened lazily. Reads go through the page cache but never
into the process's own memory beyond the batch: a memory map keeps every page it touched
(and its read-around) resident and counted in the job's RSS, so a reconstruct job reading
20,000 particles at 128² grew by 1.1 GB (bench/README, reconstruct by group size). Images
come back as float32 ``(n, box, box)`` arrays indexed ``[y, x]``.

Checks, each an :class:`~deephemnma.core.errors.InputError` naming the stack (and the STAR
row or image where relevant): a stack that is missing; not an MRC file or with a corrupt
header (unknown mode, impossible dimensions); truncated (file shorter than its header
says); an image index beyond the stack; non-square images or a box size different from
the other stacks'; NaN or Inf pixels in any image read. Header checks happen when a stack
is first touched, or for all stacks at once with :meth:`ParticleImages.validate`.
Old-style MRC files without the ``MAP`` identifier (e.g. EMPIAR 10076, and the RELION
stacks among the peer files) are accepted when the rest of the header is consistent with
the file size. Headers are read with mrcfile in permissive mode (its strict mode rejects
those old files) and checked here: on a truncated file mrcfile itself raises ``ValueError``
("mmap length is greater than file size" / "Expected N bytes in data block") in strict
mode and only warns, leaving ``data`` None, in permissive mode, so the size check is ours.

Writing
-------
:class:`StackWriter` writes an image stack chunk by chunk into a memory-mapped file
(``mrcfile.new_mmap``): mode 2 (float32) or, with ``dtype="float16"``, mode 12 (IEEE
half precision: half the bytes; 11 significant bits, about 3 decimal digits, ample for
images normalised to unit background noise), ``nz`` = number of images, ``ispg`` = 0 and
``mz`` = 1 (mrcfile's ``set_image_stack``, what RELION and mrcfile expect of ``.mrcs``),
voxel size = pixel size, header statistics from the data written. The file appears under
its final name only when every image was written and the writer closed without error.
:func:`write_stack`, :func:`read_volume` and :func:`write_volume` cover the rest; volumes
are ``[z, y, x]`` float32 with voxel size (Å) and origin (Å, header ``origin`` x, y, z).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from .errors import InputError
from .fileio import atomic_path
from .logs import get_logger

#: posix_fadvise's WILLNEED where the platform has it (Linux), else None (no prefetch)
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)

log = get_logger(__name__)

HEADER_BYTES = 1024
#: MRC modes we read (MRC2014): 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16
READABLE_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}


@dataclass(frozen=True)
class StackInfo:
    """What the header of a stack file says (validated against the file size)."""

    path: Path
    n: int           # images (nz)
    ny: int
    nx: int
    dtype: np.dtype  # including byte order
    offset: int      # byte offset of the data block
    voxel_size: float


@dataclass
class Volume:
    data: np.ndarray           # float32 [z, y, x]
    voxel_size: float          # Å
    origin: tuple              # (x, y, z) Å, header ``origin``


def read_header(path: str | os.PathLike, what: str = "image stack") -> StackInfo:
    """Read and validate an MRC header without touching the data."""
    import mrcfile

    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} not found")
    if not path.is_file():
        raise InputError(path, f"{what} is not a regular file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(path, f"not an MRC file ({size} bytes; an MRC header alone has {HEADER_BYTES})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                h = m.header.copy()
                vox = float(m.voxel_size.x)
        except Exception as exc:  # noqa: BLE001 - anything mrcfile cannot parse is corrupt input
            raise InputError(path, f"not an MRC file or corrupt header ({exc})") from None
    has_map_id = not any("Map ID string" in str(w.message) for w in caught)
    mode = int(h.mode)
    nx, ny, nz, nsymbt = int(h.nx), int(h.ny), int(h.nz), int(h.nsymbt)
    problems = []
    if mode not in READABLE_MODES:
        problems.append(f"mode {mode} is not a real-valued image mode")
    if not (0 < nx <= 1 << 16 and 0 < ny <= 1 << 16 and 0 < nz < 1 << 31):
        problems.append(f"dimensions {nx}x{ny}x{nz}")
    if not 0 <= nsymbt <= size:
        problems.append(f"extended header of {nsymbt} bytes")
    if problems:
        raise InputError(path, "not an MRC file or corrupt header (" + "; ".join(problems) + ")")
    dtype = np.dtype(READABLE_MODES[mode]).newbyteorder(h.mode.dtype.byteorder)
    offset = HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        if not has_map_id:
            raise InputError(path, "not an MRC file or corrupt header (no 'MAP ' identifier and the "
                             "dimensions do not match the file size)")
        raise InputError(path, f"truncated: the header describes {nz} images of {nx}x{ny} "
                         f"({expected} bytes) but the file has {size} bytes")
    if not np.isfinite(vox) or vox < 0:
        vox = 0.0
    return StackInfo(path=path, n=nz, ny=ny, nx=nx, dtype=dtype, offset=offset, voxel_size=vox)


class ParticleImages:
    """Images of particles ``0..n-1`` located by ``(files, file_idx, image_idx)``.

    ``rows`` (optional) are the 1-based STAR rows used in error messages (default ``i + 1``).
    """

    def __init__(self, files: Sequence[str | os.PathLike], file_idx, image_idx, *,
                 star_path: str | os.PathLike | None = None, max_open: int = 64):
        self.files = [Path(f) for f in files]
        self.file_idx = np.ascontiguousarray(file_idx, dtype=np.int64)
        self.image_idx = np.ascontiguousarray(image_idx, dtype=np.int64)
        if self.file_idx.shape != self.image_idx.shape or self.file_idx.ndim != 1:
            raise ValueError("file_idx and image_idx must be 1-D arrays of equal length")
        if len(self.file_idx) and (self.file_idx.min() < 0 or self.file_idx.max() >= len(self.files)):
            raise ValueError("file_idx out of range")
        if len(self.image_idx) and self.image_idx.min() < 0:
            raise ValueError("image_idx must be >= 0")
        self.star_path = None if star_path is None else Path(star_path)
        self.max_open = int(max_open)
        self._info: dict[int, StackInfo] = {}
        self._max_image: np.ndarray | None = None
        self._box: int | None = None
        self._box_file: Path | None = None
        self._open: OrderedDict[int, int] = OrderedDict()  # stack index -> file descriptor

    @classmethod
    def from_star(cls, star, data_dir: str | os.PathLike | None = None, **kw) -> "ParticleImages":
        from .star import image_locations

        files, file_idx, image_idx = image_locations(star, data_dir)
        return cls(files, file_idx, image_idx, star_path=star.path, **kw)

    @classmethod
    def by_box(cls, star, data_dir: str | os.PathLike | None = None, **kw) -> dict[int, tuple[np.ndarray, "ParticleImages"]]:
        """``{box: (STAR rows, ParticleImages of those rows)}``: the particles grouped by the
        box size of their stacks (data merged from optics groups with different boxes)."""
        from .star import image_locations

        files, file_idx, image_idx = image_locations(star, data_dir)
        heads = [read_header(f) for f in files]
        for h in heads:
            if h.nx != h.ny:
                raise InputError(h.path, f"images are not square ({h.nx}x{h.ny} pixels)")
        box_of = np.array([h.nx for h in heads], dtype=np.int64)[file_idx]
        from .star import IMAGE_SIZE, merged

        table = merged(star)
        if IMAGE_SIZE in table.columns:  # each stack must have the box its optics group declares
            declared = pd.to_numeric(table[IMAGE_SIZE], errors="coerce").to_numpy()
            bad = np.isfinite(declared) & (declared != box_of)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(files[int(file_idx[i])], f"box size {int(box_of[i])} differs from {int(declared[i])}, "
                                 f"the rlnImageSize of its optics group (STAR row {i + 1} of {star.path})")
        out = {}
        for D in np.unique(box_of):
            rows = np.flatnonzero(box_of == D)
            used, local = np.unique(file_idx[rows], return_inverse=True)  # this box's stacks only
            out[int(D)] = (rows, cls([files[k] for k in used], local, image_idx[rows], star_path=star.path, **kw))
        return out

    # -- pickling: open files do not travel; they are re-opened lazily -------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.file_idx)

    @property
    def n_stacks(self) -> int:
        return len(self.files)

    @property
    def box(self) -> int:
        """Box size (pixels) of the images (from the first particle's stack header)."""
        if self._box is None:
            if not len(self):
                raise ValueError("no particles")
            self.stack_info(int(self.file_idx[0]))
        assert self._box is not None
        return self._box

    # -- headers --------------------------------------------------------------------------
    def _max_image_per_file(self) -> np.ndarray:
        if self._max_image is None:
            m = np.full(len(self.files), -1, dtype=np.int64)
            np.maximum.at(m, self.file_idx, self.image_idx)
            self._max_image = m
        return self._max_image

    def stack_info(self, k: int) -> StackInfo:
        """Validated header of stack ``k`` (checked against box and image indices)."""
        info = self._info.get(k)
        if info is not None:
            return info
        info = read_header(self.files[k])
        if info.nx != info.ny:
            raise InputError(info.path, f"images are not square ({info.nx}x{info.ny} pixels)")
        if self._box is None:
            self._box, self._box_file = info.nx, info.path
        elif info.nx != self._box:
            raise InputError(info.path, f"box size {info.nx} differs from {self._box} of {self._box_file}")
        if self._max_image_per_file()[k] >= info.n:
            rows = np.flatnonzero((self.file_idx == k) & (self.image_idx >= info.n))
            r = int(rows[0])
            raise InputError(info.path, f"image {int(self.image_idx[r]) + 1} requested by STAR row {r + 1}"
                             f"{self._of_star()} but the stack has {info.n} images")
        self._info[k] = info
        return info

    def _of_star(self) -> str:
        return f" of {self.star_path}" if self.star_path is not None else ""

    def validate(self, progress_desc: str | None = None) -> None:
        """Check every stack's header (existence, format, size, box, image indices)."""
        ks = range(len(self.files))
        if progress_desc:
            from .logs import progress

            ks = progress(ks, total=len(self.files), desc=progress_desc, unit="stack")
        for k in ks:
            self.stack_info(k)

    # -- data -----------------------------------------------------------------------------
    def _fd(self, k: int) -> int:
        fd = self._open.get(k)
        if fd is not None:
            self._open.move_to_end(k)
            return fd
        info = self.stack_info(k)
        try:
            fd = os.open(info.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(info.path, f"cannot open the image data ({exc.strerror or exc})") from None
        self._open[k] = fd
        while len(self._open) > self.max_open:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close the open stacks (they reopen when read again)."""
        while self._open:
            os.close(self._open.popitem(last=False)[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone already
            pass

    #: images per positioned read at most (bounds the temporary bytes of one read)
    MAX_RUN_BYTES = 16 << 20
    #: after each read, at least this many following bytes are prefetched (POSIX_FADV_WILLNEED)
    PREFETCH_BYTES = 128 << 10

    def _read_stack(self, k: int, imgs: np.ndarray) -> np.ndarray:
        """Images ``imgs`` (sorted, unique) of stack ``k`` as float32, read run by run."""
        info = self.stack_info(k)
        fd = self._fd(k)
        per = info.ny * info.nx * info.dtype.itemsize
        out = np.empty((len(imgs), info.ny, info.nx), dtype=np.float32)
        # native float32 is read straight into the result; other pixel types (float16, int16,
        # the other byte order) into a scratch block, converted on assignment
        direct = info.dtype == out.dtype
        max_run = max(1, self.MAX_RUN_BYTES // per)
        scratch = None if direct else np.empty((min(max_run, len(imgs)), info.ny, info.nx), dtype=info.dtype)
        breaks = np.flatnonzero(np.diff(imgs) != 1) + 1
        for run in np.split(np.arange(len(imgs)), breaks):
            for s in range(0, len(run), max_run):
                a, m = int(run[s]), min(max_run, len(run) - s)
                first = int(imgs[a])
                dest = out[a:a + m] if direct else scratch[:m]
                try:
                    got = os.preadv(fd, [memoryview(dest).cast("B")], info.offset + first * per)
                except OSError as exc:
                    raise InputError(info.path, f"cannot read images {first + 1}-{first + m} ({exc.strerror or exc})") from None
                if got != m * per:
                    raise InputError(info.path, f"truncated: images {first + 1}-{first + m} end past the end of the "
                                     "file (was it changed while being read?)")
                if not direct:
                    out[a:a + m] = dest
                # ask the kernel to fetch what follows while the caller works on this batch (as a
                # memory map's read-ahead would): the next batch of a sequential pass, the
                # neighbourhood of a random one
                if _WILLNEED is not None:
                    os.posix_fadvise(fd, info.offset + (first + m) * per, max(m * per, self.PREFETCH_BYTES), _WILLNEED)
        return out

    def read(self, indices) -> np.ndarray:
        """Images of particles ``indices`` (any order, repeats allowed) as float32 (n, box, box)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"particle index out of range 0..{n - 1}")
        idx = np.where(idx < 0, idx + n, idx)
        box = self.box
        out = np.empty((idx.size, box, box), dtype=np.float32)
        if idx.size == 0:
            return out
        f = self.file_idx[idx]
        order = np.argsort(f, kind="stable")
        fs = f[order]
        cuts = np.flatnonzero(np.diff(fs)) + 1
        for grp in np.split(order, cuts):
            k = int(f[grp[0]])
            imgs = self.image_idx[idx[grp]]
            o2 = np.argsort(imgs, kind="stable")
            uniq, inverse = np.unique(imgs[o2], return_inverse=True)
            block = self._read_stack(k, uniq)
            if len(uniq) != len(o2):
                block = block[inverse.reshape(-1)]
            dest = grp[o2]
            out[dest] = block
            bad = ~np.isfinite(block).reshape(len(dest), -1).all(axis=1)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                img = int(imgs[o2][j])
                row = int(idx[dest[j]])
                raise InputError(self.files[k], f"image {img + 1} (STAR row {row + 1}{self._of_star()}) "
                                 "contains NaN or Inf pixels")
        return out

    def __getitem__(self, i) -> np.ndarray:
        if isinstance(i, slice):
            return self.read(np.arange(len(self))[i])
        return self.read([int(i)])[0]

    def iter_batches(self, batch_size: int = 256, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` over ``indices`` (default all) in file/image order,
        which reads each stack sequentially."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        order = np.lexsort((self.image_idx[idx], self.file_idx[idx]))
        idx = idx[order]
        for s in range(0, len(idx), batch_size):
            part = idx[s: s + batch_size]
            yield part, self.read(part)


# ---------------------------------------------------------------------------------------
# Writing


STACK_LABEL = b"Created by deephemnma"


#: pixel types StackWriter writes, by name, with their MRC modes
WRITABLE_MODES = {"float32": 2, "float16": 12}


class StackWriter:
    """Write an MRC image stack of ``n_images`` × ``box``² images, chunk by chunk, as
    float32 (mode 2, the default) or float16 (mode 12; ``dtype``).

    >>> with StackWriter("out.mrcs", n, box, pixel_size=1.3) as w:
    ...     for chunk in chunks: w.append(chunk)

    ``write(start, images)`` writes at an index (any order). The stack appears under
    ``path`` only if every image was written and no exception occurred; otherwise the
    temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike, n_images: int, box: int, pixel_size: float,
                 dtype: str = "float32"):
        self.path = Path(path)
        if str(dtype) not in WRITABLE_MODES:
            raise ValueError(f"dtype must be one of {sorted(WRITABLE_MODES)}, got {dtype!r}")
        self.dtype = str(dtype)
        self.n = int(n_images)
        self.box = int(box)
        self.pixel_size = float(pixel_size)
        if self.n < 1 or self.box < 1:
            raise ValueError(f"need n_images >= 1 and box >= 1, got {self.n}, {self.box}")
        self._cursor = 0
        self._mrc = None
        self._ctx = None
        self._written = np.zeros(self.n, dtype=bool)
        self._min = np.inf
        self._max = -np.inf
        self._sum = 0.0
        self._sumsq = 0.0

    def __enter__(self) -> "StackWriter":
        import mrcfile

        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n, self.box, self.box),
                                         mrc_mode=WRITABLE_MODES[self.dtype], overwrite=True)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size
            # mrcfile stamps the creation time into label 0: a fixed label keeps outputs
            # byte-identical for identical inputs (same seed, same bytes)
            self._mrc.header.label[0] = STACK_LABEL
            self._mrc.header.nlabl = 1
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def write(self, start: int, images) -> None:
        if self._mrc is None:
            raise RuntimeError("StackWriter used outside its 'with' block")
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        if self.dtype == "float16":  # what is stored (and read back): statistics of these values
            with np.errstate(over="ignore"):
                images = images.astype(np.float16)
            if images.size and not np.isfinite(images).all():
                raise ValueError(f"{self.path}: pixel values beyond float16's range (±65504); write float32")
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (k, {self.box}, {self.box}), got {images.shape}")
        start = int(start)
        stop = start + images.shape[0]
        if start < 0 or stop > self.n:
            raise ValueError(f"images {start}..{stop - 1} outside the stack of {self.n}")
        self._mrc.data[start:stop] = images
        self._written[start:stop] = True
        if images.size:
            x = images.astype(np.float64, copy=False)
            self._min = min(self._min, float(x.min()))
            self._max = max(self._max, float(x.max()))
            self._sum += float(x.sum())
            self._sumsq += float(np.square(x).sum())

    def append(self, images) -> None:
        images = np.asarray(images, dtype=np.float32)
        k = 1 if images.ndim == 2 else images.shape[0]
        self.write(self._cursor, images)
        self._cursor += k

    def _abort(self, exc: BaseException) -> None:
        if self._mrc is not None:
            try:
                self._mrc.close()
            except Exception:  # noqa: BLE001 - closing a file we are about to delete
                pass
            self._mrc = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            try:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # noqa: BLE001 - atomic_path re-raises; the caller raises
                pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._abort(exc)
            return False
        if not self._written.all():
            missing = int((~self._written).sum())
            err = RuntimeError(f"{self.path}: {missing} of {self.n} images were never written; stack discarded")
            self._abort(err)
            raise err
        try:
            h = self._mrc.header
            count = self.n * self.box * self.box
            mean = self._sum / count
            h.dmin, h.dmax, h.dmean = self._min, self._max, mean
            h.rms = float(np.sqrt(max(self._sumsq / count - mean * mean, 0.0)))
            self._mrc.flush()
            self._mrc.close()
            self._mrc = None
        except BaseException as e:
            self._abort(e)
            raise
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)
        return False


def write_stack(path: str | os.PathLike, images, pixel_size: float, chunk: int = 1024,
                dtype: str = "float32") -> Path:
    """Write ``images`` (n, box, box) as an MRC stack (atomically, in chunks; ``dtype``
    float32 or float16, see :class:`StackWriter`)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, box, box), got {images.shape}")
    with StackWriter(path, images.shape[0], images.shape[1], pixel_size, dtype=dtype) as w:
        for s in range(0, images.shape[0], chunk):
            w.write(s, images[s: s + chunk])
    return Path(path)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read an MRC map as float32 [z, y, x] with its voxel size (Å) and origin (Å)."""
    info = read_header(path, what="map")
    data = np.fromfile(info.path, dtype=info.dtype, count=info.n * info.ny * info.nx,
                       offset=info.offset).reshape(info.n, info.ny, info.nx).astype(np.float32)
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(info.path, header_only=True, permissive=True) as m:
            o = m.header.origin
            origin = (float(o.x), float(o.y), float(o.z))
    return Volume(data=data, voxel_size=info.voxel_size, origin=origin)


def write_volume(path: str | os.PathLike, data, voxel_size: float, origin=None) -> Path:
    """Write a [z, y, x] volume as a float32 MRC map, atomically, with voxel size and origin (Å)."""
    import mrcfile

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"volume must be 3-D [z, y, x], got shape {data.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            m.set_volume()
            m.voxel_size = float(voxel_size)
            if origin is not None:
                ox, oy, oz = (float(v) for v in origin)
                m.header.origin.x, m.header.origin.y, m.header.origin.z = ox, oy, oz
            m.header.label[0] = STACK_LABEL  # not mrcfile's time stamp: same data, same bytes
            m.header.nlabl = 1
    return path
