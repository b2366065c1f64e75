"""Training data: reference records, the chat template and its supervision, the masked-diffusion corruption,
per-source packing, and the grain pipeline that mixes sources deterministically and checkpoints its position.

Follows Omni-Diffusion `omni_diffusion/data/dataset_qwen2.py` (`preprocess`, `forward_process`, packing):

    record (jsonl)   {"messages": [{role, content}...], "images": [...], "audios": [...]}
    tokenize         <|im_start|>role\\n content <|im_end|>\\n per message, pieces tokenized separately;
                     targets = tokens on assistant content + <|im_end|> + "\\n", -100 elsewhere.
                     <|image|> -> <|begin_of_image|> codes <|end_of_image|> (512 px for role "user", else 256 px);
                     assistant <|audio|> -> <|begin_of_audio|> speech codes <|end_of_audio|> (supervised);
                     other <|audio|> -> <|begin_of_audio|> <|context_of_audio|> x (T_lfr + 4) <|end_of_audio|>,
                     whose embeddings the speech encoder overwrites.
    corrupt          with no <|endoftext|> in the sample, append 1..16 of them (supervised); over the span from the
                     first to the last supervised position draw t, r ~ U[0,1) per token; thr = (1-eps) t + eps;
                     mask where r <= thr (r <= 0.6 thr for <|endoftext|> targets); masked inputs become <|mask|>
                     and only masked tokens keep a label.
    pack             one buffer per source; a sample that does not fit closes the buffer (padded with
                     <|endoftext|>, label -100, attention 0, positions continuing the last sample) and opens the
                     next one; samples longer than the pack are dropped and counted.

The tokenization half runs once, offline (`omnidiff data prepare`, see `prepare.py`), and writes samples to
ArrayRecord shards; the corruption and packing half runs in the training loop on every load, so masks are
redrawn every epoch. Mixture semantics (the reference's): each source is shuffled, its first floor(ratio * n)
items are used (indices wrap, so ratio > 1 repeats data; `num` caps the count), all sources are concatenated and
shuffled again, with a fresh permutation each epoch. Everything is a function of the seed and the element index,
so the pipeline's position is a handful of integers and restores exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
from flax import serialization

from omnidiff_jax.jsonl import parse_object
from omnidiff_jax.vocab import TokenLayout

IGNORE = -100
IMAGE_TAG = "<|image|>"
AUDIO_TAG = "<|audio|>"
ROLE_WORDS = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
ASSISTANT_ROLES = ("assistant", "gpt")
FEATURE_DIM = 560  # SenseVoice LFR features: 80 mel bins x 7 stacked frames
AUDIO_PREFIX = 4  # SenseVoice's language/event/emotion/text-norm query rows precede the frames
REDO = "delete it and run `omnidiff data prepare` again, which makes the missing shards"  # for a damaged shard


class DataError(ValueError):
    """Unusable training data; the message names the file, line or field at fault."""


# --------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation: (role, content) messages and the media files its tags consume, in order."""

    messages: tuple[tuple[str, str], ...]
    images: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Media:
    """A tokenizer request: kind is 'image' (codes at `size` px), 'speech_codes' or 'speech_features'."""

    kind: str
    path: str
    size: int = 0


def parse_record(line: str, where: str, prefix: str = "") -> Record:
    """One jsonl line -> Record, with media paths joined to `prefix`. Raises DataError naming `where`.

    Files are read with errors="surrogateescape", so a line that is not UTF-8 arrives here and is refused."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: not UTF-8 text (undecodable byte at character {e.start})") from None
    obj = parse_object(line, where, DataError)
    messages = obj.get("conversations") or obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: needs a non-empty 'messages' (or 'conversations') list")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLE_WORDS:
            raise DataError(f"{where}: message {i} must be {{role, content}} with role one of {sorted(ROLE_WORDS)}, "
                            f"got {json.dumps(m)[:120]}")
        parsed.append((m["role"], m["content"]))
    files = {}
    for field in ("images", "audios"):
        value = obj.get(field) or []
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise DataError(f"{where}: '{field}' must be a list of paths, got {json.dumps(value)[:120]}")
        files[field] = tuple(os.path.join(prefix, p) for p in value)
    record = Record(tuple(parsed), files["images"], files["audios"])
    for tag, field in ((IMAGE_TAG, "images"), (AUDIO_TAG, "audios")):
        tags = sum(content.count(tag) for _, content in record.messages)
        if tags != len(files[field]):
            raise DataError(f"{where}: {tags} {tag} placeholder(s) but {len(files[field])} {field}")
    return record


def media_requests(record: Record, image_sizes: tuple[int, int] = (512, 256)) -> list[Media]:
    """What the tokenizers must produce for `record`, in tag order.

    Images are tokenized at image_sizes[0] in role "user" and image_sizes[1] in every other role (the reference
    tests the literal "user", so a "human" image is generated-size); assistant speech becomes codes, any other
    speech becomes encoder features.
    """
    out = []
    images, audios = iter(record.images), iter(record.audios)
    for role, content in record.messages:
        for tag in _tags(content):
            if tag == IMAGE_TAG:
                out.append(Media("image", next(images), image_sizes[0] if role == "user" else image_sizes[1]))
            elif role in ASSISTANT_ROLES:
                out.append(Media("speech_codes", next(audios)))
            else:
                out.append(Media("speech_features", next(audios)))
    return out


def _tags(content: str) -> list[str]:
    return [tag for _, tag in _split(content) if tag]


def _split(content: str) -> list[tuple[str, str | None]]:
    """content -> [(text before a tag, tag or None)] in order."""
    pieces, start = [], 0
    while True:
        hits = [(content.find(t, start), t) for t in (IMAGE_TAG, AUDIO_TAG)]
        hits = [(i, t) for i, t in hits if i >= 0]
        if not hits:
            pieces.append((content[start:], None))
            return pieces
        i, tag = min(hits)
        pieces.append((content[start:i], tag))
        start = i + len(tag)


class ChatTemplate:
    """Turns a Record plus its tokenized media into a sample: input ids, targets and speech-feature spans."""

    def __init__(self, text, layout: TokenLayout):
        self.text, self.layout = text, layout
        self.nl = list(text.encode("\n"))
        self.words = {role: list(text.encode(word)) for role, word in ROLE_WORDS.items()}

    def tokenize(self, record: Record, media: Mapping[Media, np.ndarray],
                 image_sizes: tuple[int, int] = (512, 256)) -> dict[str, np.ndarray]:
        """Returns {input_ids, targets} int32 [n] and, when the record has user speech, {audio_starts,
        audio_lengths} int32 [A] (first <|context_of_audio|> position, frame count T) and audio_frames
        float32 [sum T, 560]."""
        lay = self.layout
        requests = iter(media_requests(record, image_sizes))
        ids, targets, starts, frames = [], [], [], []
        for role, content in record.messages:
            head = [lay.im_start, *self.words[role], *self.nl]
            body = []
            for text, tag in _split(content):
                body += self.text.encode(text) if text else []
                if tag is None:
                    continue
                req = next(requests)
                value = media[req]
                if req.kind == "image":
                    body += [lay.begin_of_image, *lay.image_ids(value).tolist(), lay.end_of_image]
                elif req.kind == "speech_codes":
                    body += [lay.begin_of_audio, *lay.audio_ids(value).tolist(), lay.end_of_audio]
                else:
                    value = np.asarray(value, np.float32)
                    if value.ndim != 2 or value.shape[1] != FEATURE_DIM or not len(value):
                        raise DataError(f"{req.path}: speech features must be [frames > 0, {FEATURE_DIM}], "
                                        f"got {value.shape}")
                    starts.append(len(ids) + len(head) + len(body) + 1)  # just after <|begin_of_audio|>
                    body += [lay.begin_of_audio] + [lay.context_of_audio] * (len(value) + AUDIO_PREFIX)
                    body += [lay.end_of_audio]
                    frames.append(value)
            end = [lay.im_end, *self.nl]
            ids += head + body + end
            supervised = role in ASSISTANT_ROLES
            targets += [IGNORE] * len(head) + (body + end if supervised else [IGNORE] * (len(body) + len(end)))
        sample = {"input_ids": np.asarray(ids, np.int32), "targets": np.asarray(targets, np.int32)}
        if frames:
            sample["audio_starts"] = np.asarray(starts, np.int32)
            sample["audio_lengths"] = np.asarray([len(f) for f in frames], np.int32)
            sample["audio_frames"] = np.concatenate(frames)
        return sample


def encode_sample(sample: Mapping[str, np.ndarray]) -> bytes:
    """A tokenized sample -> bytes for a shard record."""
    return serialization.msgpack_serialize(dict(sample))


def decode_sample(data: bytes) -> dict[str, np.ndarray]:
    return serialization.msgpack_restore(data)


# --------------------------------------------------------------------------------------------- corruption
@dataclasses.dataclass(frozen=True)
class Corruption:
    """The reference's forward process: tail of 1..tail_max eos, per-token noise, eos masked at special_ratio.

    noise="per_token" is the reference: every position draws its own t, so each supervised token is masked with
    probability ~0.5 independently and a fully masked answer is practically never seen. noise="per_sample" (the
    MDLM/Dream-pretraining draw, an extension) uses one t per sample, so all masking levels up to a fully masked
    answer, the sampler's starting point, are trained; small models learn to generate from scratch with it.
    """

    mask_id: int
    eos_id: int
    tail_max: int = 16
    eps: float = 1e-3
    special_ratio: float = 0.6
    noise: str = "per_token"

    def __post_init__(self):
        if self.noise not in ("per_token", "per_sample"):
            raise ValueError(f"noise must be 'per_token' (the reference) or 'per_sample', got {self.noise!r}")

    def draw(self, rng: np.random.Generator, input_ids: np.ndarray, targets: np.ndarray):
        """(tail length, t, r) in the reference's draw order; t and r cover first..last supervised position."""
        tail = 0 if (input_ids == self.eos_id).any() else int(rng.integers(1, self.tail_max + 1))
        eligible = np.flatnonzero(np.concatenate([targets, np.full(tail, self.eos_id)]) != IGNORE)
        n = int(eligible[-1] - eligible[0] + 1) if len(eligible) else 0
        t = rng.random(n if self.noise == "per_token" else 1, dtype=np.float32)
        return tail, np.broadcast_to(t, (n,)), rng.random(n, dtype=np.float32)

    def apply(self, input_ids: np.ndarray, targets: np.ndarray, tail: int, t: np.ndarray, r: np.ndarray):
        """-> (input ids with <|mask|>, labels (-100 unless masked), mask probability per position [float32])."""
        ids = np.concatenate([input_ids, np.full(tail, self.eos_id, np.int32)]).astype(np.int32)
        targets = np.concatenate([targets, np.full(tail, self.eos_id, np.int32)]).astype(np.int32)
        labels = np.full_like(ids, IGNORE)
        prob = np.zeros(len(ids), np.float32)
        eligible = np.flatnonzero(targets != IGNORE)
        if not len(eligible):
            return ids, labels, prob
        first, last = eligible[0], eligible[-1] + 1
        thr = np.float32(1 - self.eps) * t + np.float32(self.eps)
        thr = np.where(targets[first:last] == self.eos_id, thr * np.float32(self.special_ratio), thr)
        span_eligible = targets[first:last] != IGNORE
        masked = (r <= thr) & span_eligible
        ids[first:last] = np.where(masked, self.mask_id, ids[first:last])
        labels[first:last] = np.where(masked, targets[first:last], IGNORE)
        prob[first:last] = np.where(span_eligible, thr, 0)
        return ids, labels, prob

    def __call__(self, sample: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Corrupts a tokenized sample (a grain random_map function)."""
        draws = self.draw(rng, sample["input_ids"], sample["targets"])
        ids, labels, prob = self.apply(sample["input_ids"], sample["targets"], *draws)
        out = {k: v for k, v in sample.items() if k.startswith("audio_")}
        return {**out, "input_ids": ids, "labels": labels, "mask_prob": prob}


# --------------------------------------------------------------------------------------------- packing
@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Static shape of a pack: `length` tokens; with max_audios > 0, speech features aligned to the tokens."""

    length: int
    pad_id: int
    max_audios: int = 0
    max_audio_frames: int = 0

    def fits(self, sample: Mapping[str, np.ndarray]) -> str | None:
        """None if the sample can be packed, else why not."""
        if len(sample["input_ids"]) > self.length:
            return "too_long"
        lengths = sample.get("audio_lengths")
        if lengths is not None and (len(lengths) > self.max_audios or lengths.max() > self.max_audio_frames):
            return "audio_over_limit"
        return None

    def pack(self, samples: Sequence[Mapping[str, np.ndarray]], task: int) -> dict[str, np.ndarray]:
        """Concatenates samples, positions restarting at 0 per sample, and pads to `length` (pad joins the last
        segment). Speech: the frame t of an audio whose placeholders start at s sits at position s + 4 + t of
        `audio_frames` [L, 560]; `audio_index` [L] says which audio of the pack a placeholder belongs to (-1 for
        none) and `audio_row` [L] which encoder output row (0..T+3) it receives."""
        ids = np.concatenate([s["input_ids"] for s in samples])
        n, pad = len(ids), self.length - len(ids)
        positions = np.concatenate([np.arange(len(s["input_ids"])) for s in samples])
        out = {
            "input_ids": np.concatenate([ids, np.full(pad, self.pad_id)]).astype(np.int32),
            "labels": np.concatenate([*(s["labels"] for s in samples), np.full(pad, IGNORE)]).astype(np.int32),
            "mask_prob": np.concatenate([*(s["mask_prob"] for s in samples), np.zeros(pad)]).astype(np.float32),
            "positions": np.concatenate([positions, positions[-1] + 1 + np.arange(pad)]).astype(np.int32),
            "valid": np.arange(self.length) < n,
            "task": np.int32(task),
        }
        if self.max_audios:
            out.update(self._audio(samples))
        return out

    def _audio(self, samples):
        frames = np.zeros((self.length, FEATURE_DIM), np.float32)
        index = np.full(self.length, -1, np.int32)
        row = np.zeros(self.length, np.int32)
        offset, k = 0, 0
        for s in samples:
            if "audio_lengths" in s:
                feats = np.split(s["audio_frames"], np.cumsum(s["audio_lengths"])[:-1])
                for start, f in zip(s["audio_starts"], feats):
                    span = slice(offset + start, offset + start + len(f) + AUDIO_PREFIX)
                    index[span], row[span] = k, np.arange(len(f) + AUDIO_PREFIX)
                    frames[offset + start + AUDIO_PREFIX:span.stop] = f
                    k += 1
            offset += len(s["input_ids"])
        return {"audio_frames": frames, "audio_index": index, "audio_row": row}


class PackIterator(grain.DatasetIterator):
    """Packs corrupted samples from a random-access dataset, one buffer per source (single-task packs).

    Its state is the next element index, the indices held in each buffer and the drop counts: elements are a
    pure function of their index, so buffers are rebuilt by re-reading them. `names` and `epoch_sizes` (per
    source) turn a source none of whose samples fits a pack into a DataError after an epoch's worth of drops,
    instead of an endless search.
    """

    def __init__(self, samples: grain.MapDataset, spec: PackSpec, tasks: Sequence[int],
                 names: Sequence[str] = (), epoch_sizes: Sequence[int] = ()):
        super().__init__()
        self.samples, self.spec, self.tasks = samples, spec, tuple(tasks)
        self.names, self.epoch_sizes = tuple(names), tuple(epoch_sizes)
        self.next_index = 0
        self.buffers: dict[int, list[tuple[int, dict]]] = {}
        self.dropped = {"too_long": 0, "audio_over_limit": 0}
        self.fitted: set[int] = set()  # sources with a sample that fitted (since this iterator was made)
        self.misses: dict[int, int] = {}  # per source not fitted yet: samples dropped

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            index = self.next_index
            if index >= len(self.samples):
                raise StopIteration
            source, sample = self.samples[index]
            self.next_index += 1
            reason = self.spec.fits(sample)
            name = self.names[source] if self.names else source
            if reason == "audio_over_limit" and not self.spec.max_audios:
                raise DataError(f"source {name} has user speech but the pack holds no audio (data.max_audios 0)")
            if reason:
                self.dropped[reason] += 1
                if source not in self.fitted:
                    self.misses[source] = self.misses.get(source, 0) + 1
                    if self.epoch_sizes and self.misses[source] >= self.epoch_sizes[source]:
                        raise DataError(f"source {name}: none of its samples fits a pack ({self.misses[source]} "
                                        f"read, the last {reason}: data.seq_len {self.spec.length}, "
                                        f"data.max_audios {self.spec.max_audios}, data.max_audio_frames "
                                        f"{self.spec.max_audio_frames})")
                continue
            self.fitted.add(source)
            buffer = self.buffers.setdefault(source, [])
            used = sum(len(s["input_ids"]) for _, s in buffer)
            audios = sum(len(s.get("audio_lengths", ())) for _, s in buffer) + len(sample.get("audio_lengths", ()))
            if buffer and (used + len(sample["input_ids"]) > self.spec.length or audios > self.spec.max_audios):
                pack = self.spec.pack([s for _, s in buffer], self.tasks[source])
                self.buffers[source] = [(index, sample)]
                return pack
            buffer.append((index, sample))

    def get_state(self) -> dict:
        return {"next_index": self.next_index, "dropped": dict(self.dropped),
                "buffers": {str(k): [i for i, _ in v] for k, v in self.buffers.items() if v}}

    def set_state(self, state: dict) -> None:
        self.next_index = int(state["next_index"])
        self.dropped = {k: int(v) for k, v in state["dropped"].items()}
        self.buffers = {int(k): [(i, self.samples[i][1]) for i in v] for k, v in state["buffers"].items()}


# --------------------------------------------------------------------------------------------- sources
def shard_files(folder: str | os.PathLike) -> list[str]:
    """The complete ArrayRecord shards of a prepared source folder, in order."""
    folder = Path(folder)
    files = sorted(folder.glob("shard-*.array_record"))
    if not files:
        raise DataError(f"{folder}: no prepared shards (shard-*.array_record); run `omnidiff data prepare`")
    return [str(f) for f in files]


class Shards:
    """The records of ArrayRecord shard files as one random-access sequence of bytes (a grain data source).

    Every file is opened up front, so a truncated or damaged shard fails here naming the file; a record that
    fails its checksum when read later raises DataError naming its shard too.
    """

    def __init__(self, files: Sequence[str]):
        lengths = []
        for f in files:
            try:
                lengths.append(len(grain.sources.ArrayRecordDataSource([f])))
            except RuntimeError as e:
                raise DataError(f"{f}: not a readable shard ({str(e) or 'truncated or damaged'}); {REDO}") from None
        self.files = list(files)
        self.ends = np.cumsum(lengths)  # [files] records up to the end of each file
        self.records = grain.sources.ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index) -> bytes:
        try:
            return self.records[index]
        except RuntimeError as e:
            f = self.files[int(np.searchsorted(self.ends, int(index), side="right"))]
            raise DataError(f"{f}: damaged shard ({e}); {REDO}") from None


def open_source(folder: str | os.PathLike) -> grain.MapDataset:
    """A prepared source as a random-access dataset of tokenized samples; one without samples is an error."""
    shards = Shards(shard_files(folder))
    if not len(shards):
        raise DataError(f"{folder}: the prepared source holds 0 samples (every record was skipped: see "
                        f"{Path(folder) / 'source.json'})")
    return grain.MapDataset.source(shards).map(decode_sample)


@dataclasses.dataclass(frozen=True)
class Source:
    """A named source of the mixture: its samples, a ratio of its size to use per epoch, a cap, a task id.

    `epoch_size`, how many samples it gives per epoch, min(floor(ratio * n), num), is computed when it is made and
    must be > 0."""

    name: str
    samples: grain.MapDataset
    ratio: float = 1.0
    num: int | None = None
    task: int = 0
    epoch_size: int = dataclasses.field(init=False)

    def __post_init__(self):
        n = len(self.samples)
        used = int(n * self.ratio)
        if self.num is not None:
            used = min(used, self.num)
        if used <= 0:
            raise DataError(f"source {self.name} yields 0 samples ({n} samples, ratio {self.ratio}, num {self.num})")
        object.__setattr__(self, "epoch_size", used)


class Shuffled(grain.MapDataset):
    """`parent` in a fresh random order each epoch (element i is epoch i // n): NumPy permutations seeded by
    (seed, epoch), computed when first needed; `epochs=None` repeats forever."""

    def __init__(self, parent: grain.MapDataset, seed: int, epochs: int | None = None):
        super().__init__(parent)
        self.seed, self.size, self.epochs = seed, len(parent), epochs
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize if self.epochs is None else self.size * self.epochs

    def __str__(self) -> str:
        return f"Shuffled(seed={self.seed}, epochs={self.epochs})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self.size)
        if epoch not in self._cache:
            if len(self._cache) > 1:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._parent[int(self._cache[epoch][i])]


def mixture(sources: Sequence[Source], seed: int) -> grain.MapDataset:
    """(source index, sample) pairs: each source shuffled and cut to min(floor(ratio * n), num) items (indices
    wrapping), concatenated, then shuffled afresh every epoch; endless."""
    parts = []
    for k, src in enumerate(sources):
        n, used = len(src.samples), src.epoch_size
        part = Shuffled(src.samples, seed, epochs=1).repeat(math.ceil(used / n), reseed_each_epoch=False)[:used]
        parts.append(part.map(functools.partial(_tag_source, k)))
    if not parts:
        raise DataError("the mixture has no sources")
    return Shuffled(grain.MapDataset.concatenate(parts), seed)


def _tag_source(k, sample):
    return k, sample


def _corrupt_pair(corruption: Corruption, pair, rng):
    return pair[0], corruption(pair[1], rng)


def pack_iterator(sources: Sequence[Source], spec: PackSpec, corruption: Corruption, seed: int,
                  process_index: int = 0, process_count: int = 1) -> PackIterator:
    """The training stream of one process: mixture -> corruption (seeded per global element index) -> this
    process's share of the elements (index % process_count) -> per-source packing."""
    mixed = mixture(sources, seed).random_map(functools.partial(_corrupt_pair, corruption), seed=seed)
    return PackIterator(mixed[process_index::process_count], spec, [s.task for s in sources],
                        [s.name for s in sources], [s.epoch_size for s in sources])


def next_packs(it: Iterator[dict], count: int) -> dict[str, np.ndarray]:
    """Stacks the next `count` packs into arrays with a leading batch axis."""
    packs = [next(it) for _ in range(count)]
    return {k: np.stack([p[k] for p in packs]) for k in packs[0]}


class Streams:
    """This process's share of a run's `count` pack streams. Stream s packs the mixture's elements s, s + count,
    ... (`pack_iterator(..., s, count)`); process p of P runs streams p * count / P onwards, and each micro-batch
    holds every stream's packs in stream order. The global batches, hence the losses, do not depend on the process
    count, and a data position ({stream: position}, from every process's file) restores on any process count that
    divides `count`."""

    def __init__(self, make: Callable[[int], PackIterator], count: int, process_index: int = 0,
                 process_count: int = 1):
        if count % process_count:
            raise ValueError(f"data.streams {count} must be a multiple of the process count {process_count}")
        per = count // process_count
        self.count = count
        self.streams = {s: make(s) for s in range(process_index * per, (process_index + 1) * per)}

    def next_packs(self, micro_batches: int, rows: int) -> dict[str, np.ndarray]:
        """The packs of this process's `rows` rows of the next `micro_batches` micro-batches, stacked
        [micro_batches * rows, ...] micro-batch-major; each stream fills rows / (its process's streams) rows."""
        per = rows // len(self.streams)
        parts = [next_packs(it, micro_batches * per) for it in self.streams.values()]
        return {k: np.concatenate([p[k].reshape(micro_batches, per, *p[k].shape[1:]) for p in parts], axis=1)
                .reshape(micro_batches * rows, *parts[0][k].shape[1:]) for k in parts[0]}

    def dropped(self) -> dict[str, int]:
        """Samples skipped so far by this process's streams, per reason."""
        out: dict[str, int] = {}
        for it in self.streams.values():
            for reason, n in it.dropped.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def get_state(self) -> dict:
        return {"streams": {str(s): it.get_state() for s, it in self.streams.items()}}

    def set_state(self, state: dict) -> None:
        """Moves this process's streams to their positions in `state` (which may hold other processes' too)."""
        saved = state["streams"]
        if len(saved) != self.count or any(str(s) not in saved for s in self.streams):
            raise DataError(f"the checkpoint's data position covers streams {sorted(map(int, saved))}, this run "
                            f"needs {sorted(self.streams)} of data.streams={self.count}: resume with the "
                            "data.streams the run was started with")
        for s, it in self.streams.items():
            it.set_state(saved[str(s)])


def read_positions(folder: str | os.PathLike) -> dict:
    """Every process's saved `Streams` state in a checkpoint's data folder (`process_<i>-of-<n>.json`, grain's
    checkpoint files), merged into one {"streams": {stream: position}}. A file written before streams holds one
    `PackIterator` state: process i of n ran exactly stream i of n."""
    streams = {}
    for path in sorted(Path(folder).glob("process_*-of-*.json")):
        saved = json.loads(path.read_text())
        streams.update(saved["streams"] if "streams" in saved else {path.name.split("_")[1].split("-")[0]: saved})
    if not streams:
        raise DataError(f"{folder}: no data position (process_*-of-*.json)")
    return {"streams": streams}


def read_jsonl(path: str | os.PathLike, prefix: str = "", strict: bool = False,
               on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, Record]]:
    """(line number, Record) for each non-blank line; a bad line raises (strict, or with no `on_error`) or is
    passed to `on_error`."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, parse_record(line, f"{path}:{number}", prefix)
            except DataError as e:
                if strict or on_error is None:
                    raise
                on_error(e)
