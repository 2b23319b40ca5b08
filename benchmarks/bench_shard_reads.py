"""How fast can training read random 96^3 patches, and what does each storage format cost on disk?

One CT-like phantom, normalised like the builder does, stored as an HDF5 shard per codec (read through
``ShardReader``), in nnU-Net v2's blosc2 layout and as ``.nii.gz``; every method reads the same seeded
starts and must return the in-memory patches. The RAM copy is the physical limit, nibabel what training
without shards would pay. Interleaved rounds, best kept: a neighbour's load burst must not pick the winner.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shard_reads.py --write-md
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import blosc2  # noqa: E402
import h5py  # noqa: E402
import hdf5plugin  # noqa: E402
import nibabel as nib  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_tools.phantoms import generate_case  # noqa: E402
from ds_seg3d.data import shard_format as sf  # noqa: E402
from ds_seg3d.data.geometry import largest_component  # noqa: E402
from ds_seg3d.data.preprocess import CT_BODY_HU  # noqa: E402
from ds_seg3d.data.reader import ShardReader  # noqa: E402
from ds_seg3d.results import save_png, write_section

CASE_ID = "bench_000"
SECTION = "## Shard reads"
Reader = Callable[[tuple[int, int, int]], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- the volume and its stored forms

def normalise(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> tuple[np.ndarray, dict]:
    """The builder's CT normalisation: clip to the HU window, z-score with the body's statistics."""
    clipped = np.clip(hu.astype(np.float32), *window)
    body = clipped[largest_component(clipped > CT_BODY_HU)]
    mean, std = float(body.mean(dtype=np.float64)), float(body.std(dtype=np.float64))
    norm = {"clip_low": window[0], "clip_high": window[1], "mean": mean, "std": std}
    return ((clipped - np.float32(mean)) / np.float32(std)).astype(np.float32), norm


def write_shard(folder: Path, codec: str, chunk: int, image: np.ndarray, label: np.ndarray,
                affine: np.ndarray, norm: dict, seed: int) -> Path:
    """One shard holding the one case, plus the manifest fields ShardReader needs; returns the folder."""
    folder.mkdir(parents=True)
    shape = tuple(int(s) for s in image.shape)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    geometry = sf.CaseGeometry(
        original_affine=affine, original_shape=shape, original_axcodes="".join(nib.aff2axcodes(affine)),
        original_spacing=spacing, spacing=spacing, resampled_shape=shape, crop_start=(0, 0, 0),
        crop_stop=shape, affine=affine)
    fg = np.argwhere(label == 1)
    pick = np.random.default_rng(seed).choice(len(fg), size=min(len(fg), 10000), replace=False)
    record = sf.CaseRecord(CASE_ID, image, label, geometry, norm, {1: fg[np.sort(pick)].astype(np.int32)})
    name = sf.SHARD_PATTERN.format(0)
    with sf.ShardWriter(folder / name, dataset="bench", codec=codec, chunk=chunk) as writer:
        writer.write_case(record)
    sf.write_manifest(folder, {
        "name": "bench", "labels": {"background": 0, "kidney": 1}, "codec": codec, "chunk": chunk,
        "shards": [{"file": name, "sha256": sf.sha256_file(folder / name), "cases": [CASE_ID]}],
        "cases": {CASE_ID: {"shard": name, "shape": list(shape)}},
        "splits": {"train": [CASE_ID], "val": [], "test": []}})
    return folder


def nnunet_blosc2_params(image_size: Sequence[int], patch: Sequence[int], itemsize: int,
                         l1: int = 32768, l3: int = 1441792, safety: float = 0.8) -> tuple[tuple, tuple]:
    """(blocks, chunks) as nnU-Net v2's ``nnUNetDatasetBlosc2.comp_blosc2_params`` chooses them.

    Re-implemented from its algorithm: blocks start at the next power of two of the patch and halve the
    axis that most exceeds the patch until a block fits 80% of a 32 KiB L1; chunks grow by whole blocks,
    least-grown axis first, up to 80% of a 1.375 MiB L3 share or 1.5x the patch on average.
    ``image_size`` is (channels, x, y, z)."""
    size, p = np.asarray(image_size, dtype=np.int64), np.asarray(patch, dtype=np.int64)
    block = np.array([size[0], *[2 ** max(0, math.ceil(math.log2(s))) for s in p]], dtype=np.int64)
    while block.prod() * itemsize > l1 * safety:
        axis = next(a for a in np.argsort(block[1:] / p)[::-1] if block[a + 1] > 1) + 1
        block[axis] = min(2 ** max(0, math.floor(math.log2(block[axis] - 1))), size[axis])
    block = np.minimum(block, size)
    chunk = block.copy()
    while chunk.prod() * itemsize < l3 * safety and not np.array_equal(chunk, size):
        axis = next(a for a in np.argsort(chunk[1:] / block[1:]) if chunk[a + 1] < size[a + 1]) + 1
        chunk[axis] = min(chunk[axis] + block[axis], size[axis])
        if np.mean(chunk[1:] / p) > 1.5:
            chunk[axis] -= block[axis]
            break
    return tuple(int(b) for b in block), tuple(int(c) for c in np.minimum(chunk, size))


def write_blosc2(folder: Path, codec: blosc2.Codec, image: np.ndarray, label: np.ndarray,
                 patch: Sequence[int]) -> tuple[list[Path], list[tuple[int, ...]]]:
    """``case.b2nd`` + ``case_seg.b2nd`` with a channel axis and clevel 8, as nnU-Net v2 saves a case."""
    folder.mkdir(parents=True)
    paths, layout = [], []
    for suffix, arr in (("", image), ("_seg", label)):
        arr4 = np.ascontiguousarray(arr[None])
        blocks, chunks = nnunet_blosc2_params(arr4.shape, patch, arr4.itemsize)
        paths.append(folder / f"{CASE_ID}{suffix}.b2nd")
        blosc2.asarray(arr4, urlpath=str(paths[-1]), mode="w", chunks=chunks, blocks=blocks,
                       cparams={"codec": codec, "clevel": 8, "nthreads": 1})
        layout += [blocks[1:], chunks[1:]]  # (blocks, chunks) of the image, then of the label
    return paths, layout


# ---------------------------------------------------------------- readers and timing

def region(start: tuple[int, int, int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size))


def ram_reader(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> Reader:
    return lambda start: (image[region(start, size)].copy(), label[region(start, size)].copy())


def shard_reader(folder: Path, size: Sequence[int], cache_bytes: int) -> Reader:
    reader = ShardReader(folder, cache_bytes=cache_bytes)
    return lambda start: reader.read_patch(CASE_ID, start, size)


def nifti_reader(paths: list[Path], size: Sequence[int]) -> Reader:
    """A fresh ``nib.load`` per patch, as a dataset that does not keep decoded volumes would do."""
    return lambda start: tuple(np.asarray(nib.load(p).dataobj[region(start, size)]) for p in paths)


def blosc2_reader(paths: list[Path], size: Sequence[int]) -> Reader:
    image, label = (blosc2.open(str(p), mode="r", mmap_mode="r", dparams={"nthreads": 1}) for p in paths)
    return lambda start: (image[(0, *region(start, size))], label[(0, *region(start, size))])


def read_syscalls() -> int:
    """Read system calls so far (Linux; 0 elsewhere): does HDF5 read whole chunks or many small runs?"""
    io = Path("/proc/self/io")
    lines = io.read_text().splitlines() if io.exists() else []
    return next((int(ln.split()[1]) for ln in lines if ln.startswith("syscr")), 0)


@dataclass
class Method:
    name: str
    disk_bytes: int
    open: Callable[[], Reader]  # a fresh reader: what a new DataLoader worker starts with
    open_no_cache: Callable[[], Reader] | None = None  # the HDF5 chunk cache off
    codec: str = ""
    chunk: int = 0
    seconds: np.ndarray | None = None  # per read of the best round, the open counted in the first
    no_cache: np.ndarray | None = None
    syscalls: float = 0.0  # read calls per patch without the chunk cache

    def rate(self, warmup: int = 0) -> float:
        rest = self.seconds[warmup:] if warmup < len(self.seconds) else self.seconds
        return len(rest) / rest.sum()

    @property
    def no_cache_rate(self) -> float | None:
        return None if self.no_cache is None else len(self.no_cache) / self.no_cache.sum()


def time_reads(open_reader: Callable[[], Reader], starts: np.ndarray, truth: Reader | None,
               label: str) -> tuple[np.ndarray, float]:
    """Seconds per read from a freshly opened reader (the open counted in the first), read syscalls per
    patch; with ``truth``, the first three patches must equal the in-memory volume (checked after timing)."""
    seconds, kept = np.empty(len(starts)), []
    calls = read_syscalls()
    t0 = time.perf_counter()
    read = open_reader()
    for i, start in enumerate(tqdm([tuple(int(s) for s in st) for st in starts], desc=label, leave=False)):
        out = read(start)
        t1 = time.perf_counter()
        seconds[i], t0 = t1 - t0, t1
        if truth is not None and i < 3:
            kept.append((start, out))
    calls = (read_syscalls() - calls) / len(starts)
    for start, got in kept:
        if not all(np.array_equal(np.squeeze(g), w) for g, w in zip(got, truth(start))):
            raise RuntimeError(f"{label}: the patch at {start} differs from the in-memory volume")
    return seconds, calls


def blocks_touched(starts: np.ndarray, size: Sequence[int], block: Sequence[int]) -> float:
    """Mean number of chunks (or blosc2 blocks) a patch overlaps: each is decoded whole."""
    block = np.asarray(block)
    first, last = starts // block, (starts + np.asarray(size) - 1) // block
    return float(np.prod(last - first + 1, axis=1).mean())


# ---------------------------------------------------------------- the run

def measure(args: argparse.Namespace, work: Path) -> tuple[list[Method], dict]:
    size = (args.patch,) * 3
    hu, label, affine = generate_case("kidney", args.seed, shape=tuple(args.shape))
    image, norm = normalise(hu)
    info = {"shape": image.shape, "raw_bytes": image.nbytes + label.nbytes, "foreground": float(label.mean()),
            "hu": (int(hu.min()), int(hu.max())), "patch_bytes": int(np.prod(size)) * 5}
    disk = lambda paths: sum(Path(p).stat().st_size for p in paths)  # noqa: E731
    truth = ram_reader(image, label, size)
    methods = [Method("RAM copy (numpy slice + copy)", 0, lambda: truth)]
    variants = [(c, args.chunk) for c in args.codecs] + [(sf.DEFAULT_CODEC, k) for k in args.sweep_chunks]
    for codec, chunk in tqdm(variants, desc="writing shards"):
        folder = write_shard(work / f"h5_{codec}_{chunk}", codec, chunk, image, label, affine, norm, args.seed)
        name = f"HDF5 {codec}" + (" (default)" if codec == sf.DEFAULT_CODEC else "")
        name += f", {chunk}^3 chunks" if chunk != args.chunk else ""
        methods.append(Method(name, disk(folder.glob("*.h5")),
                              lambda f=folder: shard_reader(f, size, sf.DEFAULT_CACHE_BYTES),
                              lambda f=folder: shard_reader(f, size, 0), codec, chunk))
    for name, codec in (("LZ4HC", blosc2.Codec.LZ4HC), ("ZSTD", blosc2.Codec.ZSTD)):
        paths, info[f"b2_{name}"] = write_blosc2(work / f"b2_{name}", codec, image, label, size)
        methods.append(Method(f"blosc2 {name}-8, nnU-Net v2 layout", disk(paths),
                              lambda p=paths: blosc2_reader(p, size)))
    nii = [work / "case_0000.nii.gz", work / "case_seg.nii.gz"]
    for arr, path in zip((image, label), nii):
        nib.save(nib.Nifti1Image(arr, affine), path)
    methods.append(Method("nibabel .nii.gz", disk(nii), lambda: nifti_reader(nii, size)))

    starts = np.random.default_rng(args.seed).integers(0, np.subtract(image.shape, size) + 1, size=(args.reads, 3))
    nc_starts = starts[:args.no_cache_reads]
    for r in range(args.rounds):  # interleaved rounds: a burst of foreign load hits every method alike
        for m in tqdm(methods, desc=f"round {r + 1}/{args.rounds}"):
            check = truth if r == 0 else None
            sec, _ = time_reads(m.open, starts[:args.nifti_reads] if m.name.startswith("nibabel") else starts,
                                check, m.name)
            if m.seconds is None or sec.sum() < m.seconds.sum():
                m.seconds = sec
            if m.open_no_cache is not None:
                sec, m.syscalls = time_reads(m.open_no_cache, nc_starts, check, f"{m.name}, no cache")
                m.no_cache = sec if m.no_cache is None or sec.sum() < m.no_cache.sum() else m.no_cache
    tiny = time_reads(lambda: shard_reader(work / f"h5_{sf.DEFAULT_CODEC}_{args.chunk}", (1, 1, 1),
                                           sf.DEFAULT_CACHE_BYTES), np.zeros_like(starts), None, "1-voxel reads")
    info["overhead_s"] = float(np.median(tiny[0][1:]))
    info["touched"] = blocks_touched(starts, size, (args.chunk,) * 3)
    b2 = info["b2_LZ4HC"]
    info["b2_amp"] = (blocks_touched(starts, size, b2[0]) * np.prod(b2[0]) * 4
                      + blocks_touched(starts, size, b2[2]) * np.prod(b2[2])) / info["patch_bytes"]
    return methods, info


# ---------------------------------------------------------------- the report

def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {mem / 2**20:.0f} GiB RAM, load average {load} at the end. "
            f"Python {platform.python_version()}, numpy {np.__version__}, h5py {h5py.__version__} (HDF5 "
            f"{h5py.version.hdf5_version}), hdf5plugin {hdf5plugin.version}, blosc2 {blosc2.__version__}, nibabel "
            f"{nib.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def limits(methods: list[Method], info: dict, args: argparse.Namespace) -> list[str]:
    """Bullets on what bounds each rate, every number from this run."""
    main = {m.codec: m for m in methods if m.codec and m.chunk == args.chunk}
    d, nn = main[sf.DEFAULT_CODEC], next(m for m in methods if m.name.startswith("blosc2 LZ4HC"))
    c, b2, raw, cache = args.chunk, info["b2_LZ4HC"], info["raw_bytes"], sf.DEFAULT_CACHE_BYTES / 2**20
    n_chunks = int(np.prod(np.ceil(np.divide(info["shape"], c))))
    decode_mbs = lambda m: m.no_cache_rate * info["touched"] * c**3 * 5 / 1e6  # noqa: E731
    out = [f"- **Chunk cache.** `ShardReader` gives each open dataset a {cache:.0f} MiB chunk cache; this image is "
           f"{n_chunks} chunks of {c}^3 ({n_chunks * c**3 * 4 / 2**20:.0f} MiB decoded). Once a chunk is cached, "
           f"patches are copied out of decoded chunks: `{d.codec}` {d.rate():,.0f} patches/s from a fresh reader, "
           f"{d.rate(args.warmup):,.0f} warm, {d.no_cache_rate:,.0f} without the cache. The reader keeps every case it "
           f"touched open, so over many cases the cache can grow to 2 x {cache:.0f} MiB per case (image, label); "
           "where that memory is not there, expect the no-cache column.",
           f"- **Decoding whole chunks.** A patch overlaps {info['touched']:.1f} chunks of {c}^3 on average, so "
           f"without the cache HDF5 decodes {info['touched'] * c**3 / args.patch**3:.1f}x the voxels it "
           f"returns; nnU-Net's blosc2 decodes only the blocks it overlaps (image {b2[0]}, label {b2[2]}: "
           f"{info['b2_amp']:.1f}x): {nn.rate():,.0f} patches/s against {d.no_cache_rate:,.0f} for uncached "
           f"`{d.codec}`."]
    sweep = sorted((m for m in methods if m.codec == d.codec), key=lambda m: m.chunk)
    if len(sweep) > 1:
        best = max(sweep, key=lambda m: m.no_cache_rate)
        out.append(f"- **Chunk edge**, `{d.codec}` (patches/s fresh reader / no cache; ratio): " + "; ".join(
            f"{m.chunk}^3: {m.rate():,.0f} / {m.no_cache_rate:,.0f}; {raw / m.disk_bytes:.2f}" for m in sweep) + ". "
            + (f"**Proposal:** `DEFAULT_CHUNK = {best.chunk}` beats blosc2 even without the cache."
               if best.no_cache_rate > nn.rate() and raw / best.disk_bytes >= 1.5 else
               f"No edge makes uncached `{d.codec}` beat blosc2 (best {best.chunk}^3): the HDF5 filter decodes whole "
               "chunks, so that target holds only while the chunk cache keeps a case's chunks."))
    if "none" in main:
        n = main["none"]
        out.append(f"- **Uncompressed without cache**, HDF5 reads the hyperslab straight from the file, row by row: "
                   f"{n.syscalls:,.0f} read calls per patch against {d.syscalls:,.0f} for `{d.codec}`, "
                   f"{n.rate() / n.no_cache_rate:.0f}x slower than through the cache, which reads each chunk once. "
                   f"Its partial edge chunks are stored whole: {raw / n.disk_bytes:.2f}x the raw bytes on disk.")
    out.append(f"- **Per-call overhead.** A 1-voxel `read_patch` costs {1e6 * info['overhead_s']:,.0f} µs, "
               f"{100 * info['overhead_s'] * d.rate(args.warmup):.0f}% of a warm `{d.codec}` patch: not the limit.")
    if "gzip" in main:
        out.append(f"- **gzip** decodes {decode_mbs(main['gzip']):,.0f} MB/s of chunk data against "
                   f"{decode_mbs(d):,.0f} MB/s for `{d.codec}`: decompression-bound whatever the chunk shape.")
    out.append("- **nibabel** decompresses the `.nii.gz` from its start up to the patch on every read, so its rate "
               f"falls with file size: x nibabel grows on volumes larger than this {raw / 1e6:.0f} MB one.")
    return out


def report(methods: list[Method], info: dict, args: argparse.Namespace, command: str, png: str) -> str:
    """The markdown section: setup, the table, the targets and what limits the rates."""
    ram, nii = methods[0], methods[-1]
    main = {m.codec: m for m in methods if m.codec and m.chunk == args.chunk}
    d, nn = main[sf.DEFAULT_CODEC], next(m for m in methods if m.name.startswith("blosc2 LZ4HC"))
    mb, b2, raw = info["patch_bytes"] / 1e6, info["b2_LZ4HC"], info["raw_bytes"]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [SECTION, "", f"Written by `{command}` on {now:%Y-%m-%d %H:%M} UTC.  ", f"Machine: {machine()}.", "",
             f"One kidney phantom (`generate_case(\"kidney\", {args.seed}, {tuple(args.shape)})`), {info['shape']} "
             f"voxels, HU {info['hu']}, clipped to [-1000, 1000] and z-scored with the body's statistics (float32); "
             f"label uint8, {100 * info['foreground']:.2f}% foreground; raw image + label {raw / 1e6:.1f} MB. "
             f"{args.reads} random {args.patch}^3 patches inside the volume (seed {args.seed}), the same starts for "
             f"every method ({args.nifti_reads} for nibabel, {args.no_cache_reads} without chunk cache), {mb:.2f} MB "
             f"each (image + label); each method's first patches equal the in-memory arrays. Best of {args.rounds} "
             "interleaved rounds. The files were just written and sit in the OS page cache: this measures decoding, "
             "not the disk.", "",
             f"*patches/s*: a fresh reader (`ShardReader(folder)`, chunk cache on) over all reads, the open included; "
             f"*warm*: after its first {args.warmup} reads; *no chunk cache*: `ShardReader(folder, cache_bytes=0)`. "
             f"HDF5 shards use {args.chunk}^3 chunks unless named. blosc2 files use nnU-Net v2's `comp_blosc2_params` "
             f"layout (image chunks {b2[1]} blocks {b2[0]}, label chunks {b2[3]} blocks {b2[2]}), opened with "
             "`blosc2.open(..., mmap_mode='r')`, one thread; nnU-Net v2 itself saves with ZSTD-8.", "",
             "| method | on disk MB | ratio | patches/s | warm | no chunk cache | MB/s | x RAM | x nibabel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        disk = f"{m.disk_bytes / 1e6:.1f} | {raw / m.disk_bytes:.2f}" if m.disk_bytes else "(RAM) | –"
        nc = "–" if m.no_cache is None else f"{m.no_cache_rate:,.1f}"
        lines.append(f"| {m.name} | {disk} | {m.rate():,.1f} | {m.rate(args.warmup):,.1f} | {nc} "
                     f"| {m.rate() * mb:,.0f} | {m.rate() / ram.rate():.3f} | {m.rate() / nii.rate():,.0f} |")
    ok = lambda good: "PASS" if good else "MISS"  # noqa: E731
    ratio, nc = raw / d.disk_bytes, lambda m: m.no_cache_rate  # noqa: E731
    slow, slow_nc = min(main.values(), key=Method.rate), min(main.values(), key=nc)
    lines += ["", "| target | fresh reader | | no chunk cache | |", "|---|---|---|---|---|",
              f"| `{d.codec}` (default) faster than blosc2 LZ4HC-8, ratio >= 1.5 | {d.rate():,.0f} vs {nn.rate():,.0f} "
              f"patches/s, ratio {ratio:.2f} | {ok(d.rate() > nn.rate() and ratio >= 1.5)} | {nc(d):,.0f} vs "
              f"{nn.rate():,.0f} | {ok(nc(d) > nn.rate() and ratio >= 1.5)} |"]
    if "none" in main:
        n = main["none"]
        x, x_nc = n.rate() / ram.rate(), nc(n) / ram.rate()
        lines.append(f"| uncompressed >= 0.2x the RAM copy | {x:.3f}x | {ok(x >= 0.2)} | {x_nc:.3f}x "
                     f"| {ok(x_nc >= 0.2)} |")
    lines += [f"| every codec >= 50x nibabel | slowest `{slow.codec}` {slow.rate() / nii.rate():,.0f}x | "
              f"{ok(slow.rate() >= 50 * nii.rate())} | slowest `{slow_nc.codec}` {nc(slow_nc) / nii.rate():,.0f}x | "
              f"{ok(nc(slow_nc) >= 50 * nii.rate())} |", "", "What limits the rates (numbers from this run):", "",
              *limits(methods, info, args), "", f"![96^3 patches per second, log scale]({png})", ""]
    return "\n".join(lines)


def plot(methods: list[Method], path: Path) -> None:
    """Log-scale bars: the rates span several orders of magnitude, from nibabel to RAM."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(methods) + 1.2))
    y = np.arange(len(methods))[::-1]
    ax.barh(y + 0.2, [m.rate() for m in methods], height=0.4, label="fresh reader (chunk cache on)")
    ax.barh(y - 0.2, [m.no_cache_rate or m.rate() for m in methods], height=0.4, color="tab:orange",
            label="no chunk cache (same bar where there is no cache)")
    ax.set_yticks(y, [m.name for m in methods], fontsize=8)
    ax.set(xscale="log", xlabel="96^3 patches per second (image + label), log scale")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], help="phantom shape before its jitter")
    p.add_argument("--patch", type=int, default=96, help="cubic patch edge, voxels")
    p.add_argument("--reads", type=int, default=200, help="patches per method and round")
    p.add_argument("--no-cache-reads", type=int, default=60, help="patches without chunk cache (slow for gzip)")
    p.add_argument("--nifti-reads", type=int, default=12, help="patches for nibabel (slow)")
    p.add_argument("--warmup", type=int, default=20, help="reads before the warm rate is measured")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each method keeps its best")
    p.add_argument("--seed", type=int, default=0, help="phantom and patch-start seed")
    p.add_argument("--codecs", nargs="+", default=list(sf.CODECS), choices=sf.CODECS, help="shard codecs")
    p.add_argument("--chunk", type=int, default=sf.DEFAULT_CHUNK, help="HDF5 chunk edge, voxels")
    p.add_argument("--sweep-chunks", type=int, nargs="*", default=[32, 48, 96],
                   help="extra chunk edges tried with the default codec")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: the system temp)")
    p.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "shard_reads.png")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="file that --write-md updates")
    p.add_argument("--write-md", action="store_true", help='replace the "## Shard reads" section of --md')
    args = p.parse_args(argv)
    if min(args.reads, args.no_cache_reads, args.nifti_reads, args.rounds) < 1 or args.patch > min(args.shape):
        p.error("read counts and --rounds must be >= 1, and --patch must fit inside --shape")
    if sf.DEFAULT_CODEC not in args.codecs:
        p.error(f"--codecs must include the default codec {sf.DEFAULT_CODEC!r}: the targets compare against it")
    args.sweep_chunks = [k for k in dict.fromkeys(args.sweep_chunks) if k != args.chunk]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_shard_reads.py", *map(shlex.quote, shown)])
    with tempfile.TemporaryDirectory(prefix="bench_shard_reads_", dir=args.workdir) as tmp:
        methods, info = measure(args, Path(tmp))
    plot(methods, args.png)
    section = report(methods, info, args, command, os.path.relpath(args.png.resolve(), args.md.resolve().parent))
    print(section)
    if args.write_md:
        write_section(args.md, section)
        print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
