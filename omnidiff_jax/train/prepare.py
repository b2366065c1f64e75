"""Offline tokenization for training (`omnidiff data prepare`): jsonl records -> tokenized samples in ArrayRecord
shards, so the training loop never runs an image or speech tokenizer.

For each source, the records are read in order and cut into shards of `shard_size` lines. Per shard, every media
file the records need is tokenized once, in batches, by pluggable callables (MAGVIT-v2 image codes at 512 px for
user images and 256 px otherwise, GLM-4-Voice codes for assistant speech, fbank/LFR features for user speech),
then the chat template builds each sample (see data.py). A shard is written atomically, then its statistics beside
it with a digest of its inputs (record lines; size and mtime of the media they name), so a rerun, after an
interruption or a change of records or media, redoes exactly the shards whose inputs changed. Bad records
(malformed JSON, unknown roles, placeholder counts that do not match the files, missing or unreadable media) are
skipped and counted, or stop the run with `strict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from omnidiff_jax import sharding
from omnidiff_jax.files import atomic_write, write_text
from omnidiff_jax.train import data
from omnidiff_jax.vocab import TokenLayout

SKIP_REASONS = ("bad_record", "missing_file", "tokenizer_error")
MAX_EXAMPLES = 20  # error messages kept per shard


@dataclasses.dataclass(frozen=True)
class Tokenizers:
    """The text tokenizer (`.encode(str) -> ids`) and batched media tokenizers over file paths:
    image(paths, size) -> code arrays; speech_codes(paths) -> code arrays; speech_features(paths) -> [T, 560].
    `identity` names them (e.g. their checkpoints): shards made by tokenizers of another identity are redone."""

    text: object
    image: Callable[[list[str], int], Sequence[np.ndarray]] | None = None
    speech_codes: Callable[[list[str]], Sequence[np.ndarray]] | None = None
    speech_features: Callable[[list[str]], Sequence[np.ndarray]] | None = None
    identity: str = ""

    def run(self, kind: str, size: int, paths: list[str]) -> Sequence[np.ndarray]:
        fn = getattr(self, kind)
        if fn is None:
            raise data.DataError(f"{paths[0]}: records need {kind.replace('_', ' ')} but no tokenizer for it is "
                                 f"configured (prepare.{'image_tokenizer' if kind == 'image' else kind})")
        out = fn(paths, size) if kind == "image" else fn(paths)
        if len(out) != len(paths):
            raise data.DataError(f"the {kind} tokenizer returned {len(out)} results for {len(paths)} files")
        return out


def tokenizers_from_config(cfg: ml_collections.ConfigDict, layout: TokenLayout) -> Tokenizers:
    """The `prepare` config section's tokenizers: text ('bytes' or a tokenizer folder), MAGVIT-v2
    (`image_tokenizer`), GLM-4-Voice (`speech_tokenizer`) and the fbank/LFR/CMVN front end (`cmvn`: an am.mvn
    file, default the SenseVoiceSmall statistics; no dither, since features are computed once)."""
    from omnidiff_jax import fbank
    from omnidiff_jax.speech_in import load_wave
    from omnidiff_jax.text_tokenizer import load_text_tokenizer

    text = load_text_tokenizer(cfg.text_tokenizer, layout)
    image = speech_codes = None
    devices = jax.devices()
    mesh = sharding.make_mesh() if len(devices) > 1 else None
    if cfg.image_tokenizer:
        from omnidiff_jax.image import ImageTokenizer

        images = ImageTokenizer.load(cfg.image_tokenizer, mesh)
        image = lambda paths, size: list(images.encode_files(paths, size))  # noqa: E731
    if cfg.speech_tokenizer:
        from omnidiff_jax.audio_io import load_audio
        from omnidiff_jax.speech_tokenizer import SpeechTokenizer

        speech = SpeechTokenizer.load(cfg.speech_tokenizer, mesh, batch_size=cfg.batch_size)

        def speech_codes(paths):
            codes, lengths = speech.tokenize([load_audio(p, channel=0)[0] for p in paths])  # as the reference
            return [c[:n] for c, n in zip(codes, lengths)]

    cmvn = fbank.read_am_mvn(cfg.cmvn) if cfg.cmvn else fbank.SENSEVOICE_CMVN

    def speech_features(paths):
        feats, lengths = fbank.wave_features([load_wave(p) for p in paths], cmvn)
        return [f[:n] for f, n in zip(feats, lengths)]

    identity = json.dumps({k: cfg[k] for k in ("text_tokenizer", "image_tokenizer", "speech_tokenizer", "cmvn")})
    return Tokenizers(text, image, speech_codes, speech_features, identity)


def prepare_source(jsonl: Sequence[str | os.PathLike], out_dir: str | os.PathLike, layout: TokenLayout,
                   tokenizers: Tokenizers, *, prefix: str = "", shard_size: int = 1024, batch_size: int = 32,
                   image_sizes: tuple[int, int] = (512, 256), strict: bool = False, progress: bool = True) -> dict:
    """Tokenizes one source's jsonl files into `out_dir`/shard-NNNNN.array_record; returns summed statistics.

    Reruns redo only what changed: a shard is kept when the tokenizers' identity, the record lines it was made
    from and the size and modification time of every media file they name are as recorded beside it (and the
    shard has its recorded size); shards past the last record are removed. With `strict`, the first skipped record (in a shard made
    now or earlier) raises. A source that yields no sample raises DataError. The shard size must match the
    earlier run's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"jsonl": [str(p) for p in jsonl], "shard_size": shard_size, "image_sizes": list(image_sizes)}
    _check_settings(out / "prepare.json", settings)
    template = data.ChatTemplate(tokenizers.text, layout)
    total = sum(1 for _ in _lines(jsonl))
    totals = {"records": 0, "samples": 0, "tokens": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)}
    shards = 0
    with tqdm(total=total, desc=str(out.name), unit="rec", disable=not progress) as bar:
        for k, chunk in enumerate(_chunks(_lines(jsonl), shard_size)):
            shard, shards = out / f"shard-{k:05d}.array_record", k + 1
            inputs = _fingerprint(chunk, prefix, tokenizers.identity)
            stats = _prepared_stats(shard, inputs)
            if stats is None:
                samples, stats = _tokenize_chunk(chunk, template, tokenizers, prefix, batch_size, image_sizes, strict)
                _write_shard(shard, samples, {**stats, "inputs": inputs})
            elif strict and any(stats["skipped"].values()):
                raise data.DataError(stats["errors"][0])
            _add(totals, stats)
            bar.update(len(chunk))
            bar.set_postfix(samples=totals["samples"], skipped=sum(totals["skipped"].values()))
    for stale in sorted(out.glob("shard-*.array_record"))[shards:]:
        stale.with_suffix(".json").unlink(missing_ok=True)
        stale.unlink()
    write_text(out / "source.json", json.dumps(totals, indent=1))
    if not totals["samples"]:
        skipped = {k: v for k, v in totals["skipped"].items() if v}
        first = next((json.loads(f.read_text())["errors"][:1] for f in sorted(out.glob("shard-*.json"))), [])
        raise data.DataError(f"{out}: 0 samples from {totals['records']} record(s) of {settings['jsonl']}"
                             + (f" (skipped: {skipped}; first: {first[0]})" if first else ""))
    return totals


def _fingerprint(chunk: list[tuple[str, str]], prefix: str, tokenizers: str) -> str:
    """A digest of a shard's inputs: the tokenizers' identity, the record lines and the size and mtime of every
    media file they name."""
    digest = hashlib.sha256(tokenizers.encode())
    for where, line in chunk:
        digest.update(f"{where}\n{line}\n".encode("utf-8", "surrogateescape"))
        try:
            record = data.parse_record(line, where, prefix)
        except data.DataError:
            continue
        for path in (*record.images, *record.audios):
            try:
                st = os.stat(path)
                digest.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path} missing\n".encode())
    return digest.hexdigest()


def _prepared_stats(shard: Path, inputs: str) -> dict | None:
    """The statistics of `shard` if it was made from `inputs` and is whole, else None."""
    try:
        stats = json.loads(shard.with_suffix(".json").read_text())
        whole = shard.stat().st_size == stats["bytes"]
    except (OSError, ValueError, KeyError):
        return None
    return stats if whole and stats.get("inputs") == inputs else None


def _lines(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    for path in paths:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:  # parse_record refuses non-UTF-8
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{number}", line


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenize_chunk(chunk, template, tokenizers, prefix, batch_size, image_sizes, strict):
    stats = {"records": len(chunk), "samples": 0, "tokens": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0),
             "errors": []}

    def skip(reason: str, error: data.DataError):
        if strict:
            raise error
        stats["skipped"][reason] += 1
        if len(stats["errors"]) < MAX_EXAMPLES:
            stats["errors"].append(str(error))

    records = []
    for where, line in chunk:
        try:
            record = data.parse_record(line, where, prefix)
            requests = data.media_requests(record, image_sizes)
        except data.DataError as e:
            skip("bad_record", e)
            continue
        missing = [r for r in requests if not os.path.isfile(r.path)]
        if missing:
            skip("missing_file", data.DataError(f"{where}: {missing[0].kind} file {missing[0].path} not found"))
            continue
        records.append((where, record, requests))
    media, failed = _tokenize_media({r for _, _, reqs in records for r in reqs}, tokenizers, batch_size)
    samples = []
    for where, record, requests in records:
        bad = next((failed[r] for r in requests if r in failed), None)
        if bad is not None:
            skip("tokenizer_error", data.DataError(f"{where}: {bad}"))
            continue
        try:
            sample = template.tokenize(record, media, image_sizes)
        except (data.DataError, ValueError) as e:
            skip("bad_record", data.DataError(f"{where}: {e}"))
            continue
        samples.append(data.encode_sample(sample))
        stats["samples"] += 1
        stats["tokens"] += len(sample["input_ids"])
    return samples, stats


def _tokenize_media(requests: set, tokenizers: Tokenizers, batch_size: int):
    """Runs each tokenizer over its requests in batches; a failing batch is retried file by file so one bad
    file fails alone. Returns ({request: result}, {request: error message})."""
    media, failed = {}, {}
    groups: dict[tuple[str, int], list[data.Media]] = {}
    for r in sorted(requests, key=lambda r: (r.kind, r.size, r.path)):
        groups.setdefault((r.kind, r.size), []).append(r)
    for (kind, size), reqs in groups.items():
        for start in range(0, len(reqs), batch_size):
            batch = reqs[start:start + batch_size]
            try:
                results = tokenizers.run(kind, size, [r.path for r in batch])
            except data.DataError:
                raise
            except (ValueError, OSError):
                results = []
                for r in batch:
                    try:
                        results.append(tokenizers.run(kind, size, [r.path])[0])
                    except (ValueError, OSError) as e:
                        failed[r] = f"{kind} tokenizer failed on {r.path}: {e}"
                        results.append(None)
            media.update((r, v) for r, v in zip(batch, results) if v is not None)
    return media, failed


def _write_shard(path: Path, samples: list[bytes], stats: dict) -> None:
    """Writes the shard, then its statistics with its size: a shard counts as prepared only once both exist."""
    path.with_suffix(".json").unlink(missing_ok=True)
    with atomic_write(path, overwrite=True) as tmp:
        try:
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            for s in samples:
                writer.write(s)
            writer.close()
        except RuntimeError as e:  # ArrayRecord's C++ I/O errors (a full disk...) arrive as RuntimeError
            raise OSError(f"cannot write {path}: {e}") from None
    write_text(path.with_suffix(".json"), json.dumps({**stats, "bytes": path.stat().st_size}, indent=1))


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            raise data.DataError(f"{path}: this folder was prepared with {before}, not {settings}; use a new "
                                 "folder or delete it to start over")
    else:
        write_text(path, json.dumps(settings, indent=1))


def _add(totals: dict, stats: dict) -> None:
    for key in ("records", "samples", "tokens"):
        totals[key] += stats[key]
    for reason, n in stats["skipped"].items():
        totals["skipped"][reason] += n
