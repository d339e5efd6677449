"""Training data from EMO shards: index-driven, seeded, resumable, disjoint across ranks and workers.

Why not a plain ``webdataset.WebDataset`` pipeline: training needs (1) a data position that a
resumed run can seek to without re-reading what it already consumed, (2) the same stream for the
same ``--seed`` and world size (webdataset's shuffle buffer seeds itself from pid and time unless
told otherwise, and a DataLoader worker's random state restarts each epoch), (3) disjoint samples
per rank and worker also when there are fewer shards than ranks x workers, and (4) reads of only
the members and frames a sample needs. Every shard written by ``emo-data`` has a sidecar
``<shard>.index.json`` (byte offset, size and metadata of every member), so:

* the **catalog** (all samples' metadata) is read from the indexes, once, before any video byte;
  the data/model contract is checked on it (:func:`check_contract`), unusable samples (no audio
  features, too short) are dropped up front;
* an **epoch order** is a pure function of ``(seed, epoch)``: shards shuffled, then a shuffle
  buffer over the shard-ordered samples (webdataset's semantics, on indices);
* the order is **split by sample**: global slot ``s = rank * workers + worker`` of ``S`` slots takes
  positions ``s, s + S, s + 2S, ...`` (each slot the same count per epoch, so ranks stay in step);
* each item's random choices (window start, reference frame) come from
  ``SeedSequence((seed, epoch, position))``; the data position of a worker is the number of items
  it has produced, and a resumed worker starts at that item by arithmetic;
* members are read by byte range (``mp4``, ``face_mask.png``, ``audio_emb.npy``,
  ``speed_buckets.npy``; with pre-encoded latents only the needed frames' slice of
  ``latents.npy``); the mp4 is decoded from the keyframe before the first needed frame up to the
  last needed frame, and only the needed frames are converted to RGB and resized;
* ``resampled``: each slot draws shards with replacement from its own seeded generator
  (webdataset's ``resampled=True``): no epochs, slots not disjoint; for multi-node runs where
  epoch bookkeeping does not matter.
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from emo_data.latents import resize_frames  # noqa: F401 - the one resize for latents and decoded frames
from emo_data.shards import (
    DEFAULT_FPS,
    SCHEMA_VERSION,
    SampleMeta,
    list_shards,
    load_npy,
    load_png,
    load_wav,
    read_index,
)

logger = logging.getLogger(__name__)

LATENTS_MEMBER = "latents.npy"


class DataContractError(ValueError):
    """The shards do not fit the model (schema version, speed buckets, audio features, latents)."""


@dataclass
class SampleRef:
    """One sample as the shard index describes it (no bytes read)."""

    shard: str
    key: str
    members: dict  # member name -> (offset, size) in the tar
    meta: SampleMeta

    def __post_init__(self) -> None:
        if not isinstance(self.meta, SampleMeta):
            self.meta = SampleMeta.from_dict(self.meta or {})

    @property
    def num_frames(self) -> int:
        return int(self.meta.num_frames or 0)


# ----------------------------------------------------------------------------- catalog
def expand_shards(specs: Sequence[str]) -> list[str]:
    """Brace patterns, files, directories (their ``*.tar``) and globs -> shard paths / URLs."""
    import braceexpand

    expanded = [u for s in specs for u in braceexpand.braceexpand(str(s))]
    return list_shards(expanded)


def load_catalog(shards: Sequence[str]) -> list[SampleRef]:
    """Every sample of ``shards`` from their ``.index.json`` sidecars (metadata + byte ranges)."""
    refs: list[SampleRef] = []
    for shard in shards:
        index = read_index(shard)
        if index is None:
            if not (os.path.exists(shard) or "://" in shard):
                raise FileNotFoundError(f"shard {shard} does not exist")
            raise DataContractError(
                f"shard {shard} has no index ({os.path.basename(shard)[:-4]}.index.json): training reads member byte "
                "ranges and metadata from it; every shard written by emo-data has one (rewrite foreign shards with "
                "emo_data.shards.write_tar)")
        for entry in index.get("samples", []):
            members = {name: (int(loc["offset"]), int(loc["size"])) for name, loc in entry["members"].items()}
            refs.append(SampleRef(shard=shard, key=entry["key"], members=members,
                                  meta=SampleMeta.from_dict(entry.get("meta") or {})))
    return refs


@dataclass
class ContractReport:
    """What :func:`check_contract` found: the samples a stage can use and the shards' conventions."""

    usable: list  # SampleRef
    skipped: Counter
    speed_centers: Optional[list]
    speed_radii: Optional[list]
    audio: Optional[dict]  # {"num_layers", "dim", "encoder"}
    use_latents: bool
    latents: Optional[dict]  # the shards' latents metadata when used

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (f"{len(self.usable)} usable samples (skipped: {skipped}); speed buckets {len(self.speed_centers or [])}; "
                f"audio {self.audio}; {'pre-encoded latents' if self.use_latents else 'video decode + VAE'}")


def _example(refs: list) -> str:
    return ", ".join(f"{os.path.basename(r.shard)}:{r.key}" for r in refs[:3])


def check_contract(refs: list, model_config, stage: str, resolution: int, use_latents: str = "auto",
                   vae_fingerprint: Optional[str] = None) -> ContractReport:
    """Check the shards' metadata against the model; raise :class:`DataContractError` saying what to do.

    * ``schema_version`` of every sample == :data:`emo_data.shards.SCHEMA_VERSION`;
    * one set of speed-bucket centres/radii across all samples, with ``model_config.speed_buckets`` entries;
    * stages video/speed: ``audio_emb`` layers x dims == ``audio_layers`` x ``audio_feature_dim``;
      samples without audio features or shorter than n + f frames are skipped (counted);
    * latents (``use_latents`` auto/yes): resolution == ``resolution``, channels == ``in_channels``,
      and the VAE that encoded them == the training VAE (``vae_fingerprint``) when both are known.
    """
    if not refs:
        raise DataContractError("no samples in the shards")
    bad_version = [r for r in refs if r.meta.schema_version != SCHEMA_VERSION]
    if bad_version:
        versions = sorted({str(r.meta.schema_version) for r in bad_version})
        raise DataContractError(
            f"{len(bad_version)} samples have schema_version {', '.join(versions)} (e.g. {_example(bad_version)}); "
            f"this trainer reads schema_version {SCHEMA_VERSION}: rebuild those shards with this emo-data")

    buckets = Counter()
    for r in refs:
        buckets[(tuple(r.meta.speed_centers), tuple(r.meta.speed_radii))] += 1
    if len(buckets) > 1:
        listing = "; ".join(f"{n} samples with centres {list(c)}" for (c, _), n in buckets.most_common(4))
        raise DataContractError(
            f"the shards disagree on speed-bucket centres/radii ({listing}); run `emo-data fit-buckets SHARDS --apply` "
            "over all of them (or rebuild) so that one set of buckets describes the corpus")
    (centers, radii), = buckets.keys()
    d = int(model_config.speed_buckets)
    if centers and len(centers) != d:
        raise DataContractError(
            f"the shards hold {len(centers)} speed buckets (centres {list(centers)}), the model has speed_buckets={d}: "
            f"refit with `emo-data fit-buckets SHARDS -d {d} --apply` or start from a model with speed_buckets={len(centers)}")
    if not centers:
        raise DataContractError(f"samples lack speed_buckets metadata (e.g. {_example(refs)})")

    skipped: Counter = Counter()
    usable = refs
    audio = None
    span = int(model_config.num_motion_frames) + int(model_config.num_frames)
    if stage == "image":
        usable = [r for r in refs if r.num_frames >= 1]
        skipped["without frames"] = len(refs) - len(usable)
    else:
        with_audio = [r for r in refs if "audio_emb.npy" in r.members and r.meta.audio_emb]
        skipped["without audio_emb.npy"] = len(refs) - len(with_audio)
        L, D = int(model_config.audio_layers), int(model_config.audio_feature_dim)
        wrong = [r for r in with_audio
                 if (int(r.meta.audio_emb.get("num_layers", -1)), int(r.meta.audio_emb.get("dim", -1))) != (L, D)]
        if wrong:
            got = wrong[0].meta.audio_emb
            raise DataContractError(
                f"{len(wrong)} samples have audio features of {got.get('num_layers')} layers x {got.get('dim')} dims "
                f"(encoder {got.get('encoder')!r}, e.g. {_example(wrong)}), the model expects audio_layers={L} x "
                f"audio_feature_dim={D}: rerun `emo-data add-features SHARDS --audio-encoder ... --audio-layers ...` "
                "with the encoder the model is built for, or start from a model built for these features")
        usable = [r for r in with_audio if r.num_frames >= span]
        skipped[f"shorter than {span} frames"] = len(with_audio) - len(usable)
        if with_audio:
            a = with_audio[0].meta.audio_emb
            audio = {"num_layers": L, "dim": D, "encoder": a.get("encoder")}
    skipped = Counter({k: v for k, v in skipped.items() if v})
    if not usable:
        raise DataContractError(
            f"no usable samples for stage {stage} in {len({r.shard for r in refs})} shards ({len(refs)} samples; "
            + ", ".join(f"{n} {why}" for why, n in skipped.items())
            + ("" if stage == "image" else "; stages video/speed need audio_emb.npy (emo-data add-features)") + ")")

    latents_meta = None
    want = use_latents
    with_latents = [r for r in usable if LATENTS_MEMBER in r.members and r.meta.latents]
    fits = [r for r in with_latents if int(r.meta.latents.get("resolution", -1)) == int(resolution)
            and int(r.meta.latents.get("channels", -1)) == int(model_config.in_channels)]
    if want == "yes":
        if len(fits) != len(usable):
            missing = [r for r in usable if r not in fits]
            have = sorted({int(r.meta.latents.get("resolution", -1)) for r in with_latents})
            raise DataContractError(
                f"--use-latents yes, but {len(missing)} of {len(usable)} samples lack latents.npy at resolution {resolution} "
                f"(latents found at {have or 'no'} resolution; e.g. {_example(missing)}): run "
                f"`emo-data add-latents SHARDS --vae DIR --resolution {resolution}` or use --use-latents no")
    use = want != "no" and len(fits) == len(usable)
    if want == "auto" and with_latents and not use:
        logger.warning("latents.npy present in %d of %d usable samples at resolution %s: decoding video instead",
                       len(fits), len(usable), resolution)
    if use:
        fingerprints = {r.meta.latents.get("vae_fingerprint") for r in fits}
        if vae_fingerprint and fingerprints - {vae_fingerprint, None}:
            raise DataContractError(
                f"the latents were encoded by another VAE (fingerprints {sorted(f for f in fingerprints if f)}) than the "
                f"training VAE ({vae_fingerprint}): rerun emo-data add-latents with this VAE or use --use-latents no")
        scaling = {float(r.meta.latents.get("scaling_factor", 0)) for r in fits}
        if len(scaling) != 1:
            raise DataContractError(f"latents with different VAE scaling factors {sorted(scaling)}: re-encode them with one VAE")
        latents_meta = dict(fits[0].meta.latents)
    return ContractReport(usable=usable, skipped=skipped, speed_centers=list(centers), speed_radii=list(radii),
                          audio=audio, use_latents=use, latents=latents_meta)


# ----------------------------------------------------------------------------- reading
class MemberReader:
    """Byte-range reads of shard members, a few open files kept per worker."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._files: OrderedDict = OrderedDict()

    def _file(self, shard: str):
        fh = self._files.get(shard)
        if fh is None:
            if "://" in shard:
                import fsspec

                fh = fsspec.open(shard, "rb").open()
            else:
                fh = open(shard, "rb")
            self._files[shard] = fh
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return fh

    def read(self, ref: SampleRef, member: str, start: int = 0, length: Optional[int] = None) -> bytes:
        offset, size = ref.members[member]
        length = size - start if length is None else length
        if start < 0 or start + length > size:
            raise ValueError(f"{ref.shard}:{ref.key}.{member}: bytes {start}..{start + length} outside {size}")
        fh = self._file(ref.shard)
        fh.seek(offset + start)
        data = fh.read(length)
        if len(data) != length:
            raise IOError(f"{ref.shard}:{ref.key}.{member}: short read ({len(data)} of {length} bytes); truncated shard?")
        return data

    def npy(self, ref: SampleRef, member: str) -> np.ndarray:
        return load_npy(self.read(ref, member))

    def npy_rows(self, ref: SampleRef, member: str, rows: Sequence[int]) -> np.ndarray:
        """Rows ``rows`` (first axis) of a stored ``.npy`` without reading the rest: contiguous runs
        of rows are read as one byte range each."""
        from numpy.lib import format as npformat

        head = io.BytesIO(self.read(ref, member, 0, min(ref.members[member][1], 4096)))
        version = npformat.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = npformat.read_array_header_2_0(head)
        if fortran or dtype.hasobject:
            raise ValueError(f"{ref.key}.{member}: expected a C-ordered numeric array")
        data_start = head.tell()
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype=dtype)
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                j += 1
            if rows[i] < 0 or rows[j] >= shape[0]:
                raise IndexError(f"{ref.key}.{member}: rows {rows[i]}..{rows[j]} outside {shape[0]}")
            buf = self.read(ref, member, data_start + rows[i] * row_bytes, (j - i + 1) * row_bytes)
            out[i : j + 1] = np.frombuffer(buf, dtype=dtype).reshape((j - i + 1,) + tuple(shape[1:]))
            i = j + 1
        return out

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def decode_frames(mp4: bytes, indices: Sequence[int], fps: float) -> np.ndarray:
    """RGB uint8 ``[len(indices), H, W, 3]`` of the frames ``indices`` (any order, repeats allowed).

    Seeks to the keyframe at or before the first wanted frame, decodes up to the last wanted
    frame and converts only the wanted frames to RGB (the conversion is ~20 % of decode time at
    512 x 512). Frame numbers come from presentation timestamps (constant frame rate, as the
    shards are written), so a seek lands on the right frame numbers.
    """
    import av

    want = sorted(set(int(i) for i in indices))
    first, last = want[0], want[-1]
    got: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(mp4), mode="r") as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        t0 = stream.start_time or 0
        if first > 0:
            container.seek(t0 + int(first / fps / tb), stream=stream, backward=True, any_frame=False)
        counter = None
        for frame in container.decode(stream):
            if frame.pts is not None:
                idx = int(round((frame.pts - t0) * tb * fps))
            else:  # no timestamps: count from the first frame (only valid without a seek)
                counter = 0 if counter is None else counter + 1
                idx = counter
            if idx > last:
                break
            if idx in want and idx not in got:
                got[idx] = frame.to_ndarray(format="rgb24")
    missing = [i for i in want if i not in got]
    if missing:
        raise ValueError(f"mp4 lacks frames {missing[:5]} (decoded {len(got)} of {len(want)} wanted)")
    return np.stack([got[int(i)] for i in indices])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    import cv2

    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def window_indices(start: int, stop: int, m: int, total: int) -> np.ndarray:
    """``[stop - start, 2m + 1]`` frame indices of each frame's ±m neighbours, clamped to the clip
    (the same edge padding as :func:`emo_model.conditioning.window_frames` over the whole clip)."""
    idx = np.arange(start, stop)[:, None] + np.arange(-m, m + 1)[None, :]
    return np.clip(idx, 0, total - 1)


# ----------------------------------------------------------------------------- items
@dataclass
class ItemMaker:
    """A catalog sample + its random generator -> one training item (runs in DataLoader workers).

    Items hold uint8 pixels / float16 latents and audio (half the bytes through the worker pipes);
    the training step converts them. Keys: ``reference`` ``[3, S, S]`` uint8 or
    ``reference_latents`` ``[4, s, s]``; stage image: ``target`` ``[1, 3, S, S]`` / ``target_latents``;
    stages video/speed: ``frames`` ``[n+f, 3, S, S]`` / ``frame_latents`` ``[n+f, 4, s, s]``, ``audio``
    ``[f, 2m+1, L, D]`` float16, ``speed`` ``[n+f, 2m+1, d]``; all: ``mask`` ``[1, S, S]`` uint8,
    ``window`` (stage image: target and reference frame; else window start and reference frame).
    """

    stage: str
    size: int
    num_motion_frames: int
    num_frames: int
    audio_window: int
    speed_window: int
    use_latents: bool = False

    def choose(self, total: int, rng: np.random.Generator) -> tuple[int, int]:
        if self.stage == "image":  # target and a different reference frame
            t = int(rng.integers(total))
            r = int(rng.integers(total - 1)) if total > 1 else 0
            if total > 1 and r >= t:
                r += 1
            return t, r
        span = self.num_motion_frames + self.num_frames
        return int(rng.integers(total - span + 1)), int(rng.integers(total))

    def __call__(self, ref: SampleRef, rng: np.random.Generator, reader: MemberReader) -> dict:
        total = ref.num_frames
        a, r = self.choose(total, rng)
        span = self.num_motion_frames + self.num_frames
        frame_ids = [a] if self.stage == "image" else list(range(a, a + span))
        item: dict[str, Any] = {"window": torch.tensor([a, r])}
        if self.use_latents:
            lat = torch.from_numpy(reader.npy_rows(ref, LATENTS_MEMBER, frame_ids + [r]))
            item["reference_latents"] = lat[-1]
            item["target_latents" if self.stage == "image" else "frame_latents"] = lat[:-1]
        else:
            fps = float(ref.meta.fps or DEFAULT_FPS)
            pix = resize_frames(decode_frames(reader.read(ref, "mp4"), frame_ids + [r], fps), self.size)
            pix = torch.from_numpy(np.ascontiguousarray(pix)).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, S, S]
            item["reference"] = pix[-1]
            item["target" if self.stage == "image" else "frames"] = pix[:-1]
        mask = resize_mask(load_png(reader.read(ref, "face_mask.png")), self.size)
        item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))[None]
        if self.stage != "image":
            audio = reader.npy(ref, "audio_emb.npy")  # [T, L, D] float16
            idx = window_indices(a + self.num_motion_frames, a + span, self.audio_window, total)
            item["audio"] = torch.from_numpy(np.ascontiguousarray(audio[idx]))
            speed = reader.npy(ref, "speed_buckets.npy").astype(np.float32)
            item["speed"] = torch.from_numpy(np.ascontiguousarray(speed[window_indices(a, a + span, self.speed_window, total)]))
        return item


def collate(items: list) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ----------------------------------------------------------------------------- order
def epoch_order(refs: Sequence[SampleRef], seed: int, epoch: int, shard_shuffle: bool, buffer: int) -> np.ndarray:
    """Sample indices of one epoch: shards in a seeded random order, each shard's samples in
    tar order, through a seeded shuffle buffer of ``buffer`` samples (0 or 1: no buffer)."""
    rng = np.random.default_rng([seed, epoch, 1])
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_shard.setdefault(r.shard, []).append(i)
    shards = list(by_shard)
    if shard_shuffle:
        shards = [shards[j] for j in rng.permutation(len(shards))]
    seq = [i for s in shards for i in by_shard[s]]
    return _buffer_shuffle(seq, rng, buffer)


def _buffer_shuffle(seq, rng: np.random.Generator, buffer: int) -> np.ndarray:
    if buffer <= 1:
        return np.asarray(seq, dtype=np.int64)
    out, buf = [], []
    for x in seq:
        buf.append(x)
        if len(buf) >= buffer:
            j = int(rng.integers(len(buf)))
            out.append(buf[j])
            buf[j] = buf[-1]
            buf.pop()
    rest = rng.permutation(len(buf))
    out.extend(buf[j] for j in rest)
    return np.asarray(out, dtype=np.int64)


def samples_per_slot(num_samples: int, world_size: int, num_workers: int) -> int:
    """Samples each data stream (process x DataLoader worker) gets per epoch; a clear error when
    there are fewer samples than streams (splitting is by sample, so the shard count does not matter)."""
    slots = world_size * max(num_workers, 1)
    per = num_samples // slots
    if per < 1:
        fit = num_samples // world_size
        if fit > 1:
            hint = f"use --num-workers {fit} or fewer"
        elif fit == 1:
            hint = "use --num-workers 0 (one stream per process)"
        else:
            hint = f"use at most {num_samples} processes"
        raise DataContractError(
            f"{num_samples} usable samples cannot feed {slots} data streams ({world_size} processes x "
            f"{max(num_workers, 1)} DataLoader workers): each stream needs at least one sample per epoch; {hint}, or add data")
    return per


@dataclass
class StreamLayout:
    """Where a process sits among the data streams.

    A process has ``max(num_workers, 1)`` streams ("logical workers"); the DataLoader takes batch
    ``m`` (counted over the whole run) from stream ``m % workers``. ``start_items[l]``: items stream
    ``l`` had produced when this loader starts; ``first_batch``: the run's micro-batch count then (a
    resumed loader's first physical worker serves stream ``first_batch % workers``, so the rotation
    continues where it stopped)."""

    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    start_items: list = field(default_factory=list)
    first_batch: int = 0


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of training items for one process (and its DataLoader workers).

    See the module docstring for order, split and seeding. ``position_of(micro_batches)`` gives the
    per-worker item counts to store in a checkpoint; a new stream built with them as
    ``layout.start_items`` continues exactly where the old one was.
    """

    def __init__(self, refs: Sequence[SampleRef], maker: ItemMaker, layout: StreamLayout, *, shuffle_buffer: int = 256,
                 shard_shuffle: bool = True, resampled: bool = False):
        super().__init__()
        self.refs = list(refs)
        self.maker = maker
        self.layout = layout
        self.shuffle_buffer = int(shuffle_buffer)
        self.shard_shuffle = bool(shard_shuffle)
        self.resampled = bool(resampled)
        self.num_slots = layout.world_size * max(layout.num_workers, 1)
        if not resampled:  # fail in the main process, not in a worker
            samples_per_slot(len(self.refs), layout.world_size, layout.num_workers)

    # -- positions
    def items_per_stream(self, micro_batches: int, batch_size: int) -> list[int]:
        """Items each of this process's streams has produced once the run has taken ``micro_batches``
        batches in total (the DataLoader takes batches from its workers in strict rotation): what a
        checkpoint stores as the data position."""
        w = max(self.layout.num_workers, 1)
        start = list(self.layout.start_items) or [0] * w
        first = int(self.layout.first_batch)
        counts = [0] * w
        for stream in range(w):  # batches m in [first, micro_batches) with m % w == stream
            lo = first + ((stream - first) % w)
            counts[stream] = max(0, (micro_batches - lo + w - 1) // w) if micro_batches > lo else 0
        return [a + c * batch_size for a, c in zip(start, counts)]

    # -- order
    def indices(self, slot: int, skip: int = 0) -> Iterator[tuple[tuple, int]]:
        """(entropy of the item's generator, sample index) of slot ``slot`` from item ``skip`` on."""
        seed = int(self.layout.seed)
        if self.resampled:
            yield from self._resampled(slot, skip)
            return
        per = samples_per_slot(len(self.refs), self.layout.world_size, self.layout.num_workers)
        epoch, offset = divmod(int(skip), per)
        while True:
            order = epoch_order(self.refs, seed, epoch, self.shard_shuffle, self.shuffle_buffer)
            for k in range(offset, per):
                position = k * self.num_slots + slot
                yield (seed, 2, epoch, position), int(order[position])
            epoch, offset = epoch + 1, 0

    def _resampled(self, slot: int, skip: int) -> Iterator[tuple[tuple, int]]:
        seed = int(self.layout.seed)
        rng = np.random.default_rng([seed, 3, slot])
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(self.refs):
            by_shard.setdefault(r.shard, []).append(i)
        shards = list(by_shard)
        buf: list[int] = []
        produced = 0
        while True:
            buf.extend(by_shard[shards[int(rng.integers(len(shards)))]])
            while len(buf) >= max(self.shuffle_buffer, 1):
                j = int(rng.integers(len(buf)))
                idx = buf[j]
                buf[j] = buf[-1]
                buf.pop()
                if produced >= skip:
                    yield (seed, 4, slot, produced), idx
                produced += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.layout.num_workers, 1):
            raise RuntimeError(f"stream laid out for {self.layout.num_workers} workers, running in {workers}")
        stream = (worker + int(self.layout.first_batch)) % workers
        slot = self.layout.rank * workers + stream
        skip = self.layout.start_items[stream] if self.layout.start_items else 0
        reader = MemberReader()
        try:
            for entropy, idx in self.indices(slot, skip):
                yield self._make(idx, np.random.default_rng(list(entropy)), reader)
        finally:
            reader.close()

    def _make(self, idx: int, rng: np.random.Generator, reader: MemberReader) -> dict:
        # A sample that fails to read (corrupt bytes) is replaced by the next ones in the catalog
        # with the same generator: the stream keeps one item per position, so positions stay exact.
        state = rng.bit_generator.state
        for attempt in range(4):
            ref = self.refs[(idx + attempt) % len(self.refs)]
            try:
                rng.bit_generator.state = state
                return self.maker(ref, rng, reader)
            except Exception as exc:  # noqa: BLE001 - logged; a run of failures re-raises below
                logger.warning("skipping %s:%s (%s: %s)", ref.shard, ref.key, type(exc).__name__, exc)
                last = exc
        raise RuntimeError(f"4 consecutive samples from {self.refs[idx].shard}:{self.refs[idx].key} failed to load") from last


def make_loader(stream: ShardStream, batch_size: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` (batching inside the workers; torch already runs each worker on
    one thread). OpenCV is set to one thread here, in the parent: its thread pool does not survive
    fork, and calling ``cv2.setNumThreads`` inside a forked worker after the parent used the pool
    hangs (measured); the workers are the parallelism."""
    workers = stream.layout.num_workers
    if workers:
        try:
            import cv2

            cv2.setNumThreads(1)
        except Exception:  # noqa: BLE001 - OpenCV is optional here
            pass
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
    )


# ----------------------------------------------------------------------------- validation samples
def load_validation_samples(refs: Sequence[SampleRef], count: int, num_frames: int, size: int) -> list[dict]:
    """The first ``count`` samples (shard order) with at least ``num_frames`` frames, as
    ``{key, reference (frame 0, uint8 [S, S, 3]), frames (ground truth [F, S, S, 3]), audio (float32
    16 kHz of those frames), mask ([S, S] uint8), face_box (frame 0, in S pixels), speed (mean
    head speed), fps}``: the same held-out samples at every validation."""
    reader = MemberReader()
    out = []
    try:
        for ref in refs:
            if len(out) >= count:
                break
            if ref.num_frames < 1:
                continue
            fps = float(ref.meta.fps or DEFAULT_FPS)
            n = min(num_frames, ref.num_frames)
            frames = decode_frames(reader.read(ref, "mp4"), list(range(n)), fps)
            src = frames.shape[1]
            samples, rate = load_wav(reader.read(ref, "wav"))
            box = reader.npy(ref, "face_boxes.npy")[0].astype(np.float32) * (size / src)
            out.append({
                "key": ref.key, "shard": ref.shard, "fps": fps, "rate": rate,
                "reference": resize_frames(frames[:1], size)[0], "frames": resize_frames(frames, size),
                "audio": samples[: int(round(n / fps * rate))].astype(np.float32),
                "mask": resize_mask(load_png(reader.read(ref, "face_mask.png")), size),
                "face_box": box, "speed": float(ref.meta.head_speed_mean or 0.5),
            })
    finally:
        reader.close()
    return out
