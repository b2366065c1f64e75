"""Any-to-any generation: one object that holds every component and runs requests of the six tasks.

    pipe = Pipeline.load("ckpt", image_tokenizer="magvitv2", speech_decoder="glm-4-voice-decoder")
    [result] = pipe.run([{"task": "t2i", "text": "a red apple"}])
    result["image"]        # uint8 [256, 256, 3]

A request is a dict: `task`, the inputs the task needs (`text`, `image` path, `audio` path), and optional
overrides of any `TaskPreset` field (`steps`, `gen_length`, `alg`, `cfg`, `adaptive`, ...) plus `seed`,
`cfg_compat`, `block_size`, `prefix_cache`. Requests that share sampler settings run as one batch (the sampler
buckets lengths internally); a request that fails (missing file, wrong input kind, over-long prompt) gets an
`error` and the rest of the batch still completes.

A result holds `text`, `ids` (the generated region), `audio_codes`, `image_codes`, `image` (uint8 HWC) or None,
`wav` (float32 at `sample_rate`) or None, and `warnings` (e.g. an image code count that had to be repaired).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from omnidiff_jax import adaptive_length, sampler
from omnidiff_jax.jsonl import parse_object
from omnidiff_jax.model import OmniModel, load_model
from omnidiff_jax.tasks import (INPUTS, PRESETS, TASKS, TaskPreset, build_prompt, fit_image_codes, split_output,
                                task_content)
from omnidiff_jax.text_tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

GENERATED_IMAGE_CODES = 256  # a 256 x 256 image: 16 x 16 codes (Omni-Diffusion `tools/inference.py`)
USER_IMAGE_SIZE = 512  # user images are encoded at 512 x 512 -> 1024 codes
SAMPLER_OPTIONS = ("seed", "cfg_compat", "block_size", "prefix_cache", "alg_temp")


class RequestError(ValueError):
    """A request that cannot run; the message names the request and the problem."""


@dataclasses.dataclass
class _Ready:
    """A request turned into a sampler row."""

    index: int
    task: str
    preset: TaskPreset
    prompt: sampler.Prompt
    uncond: sampler.Prompt | None
    options: dict


@dataclasses.dataclass
class Pipeline:
    """The LLM plus the optional modality components. Missing components make only the tasks that need them fail.

    image_tokenizer: a MAGVIT-v2 `ImageTokenizer` (image inputs and outputs). speech_decoder: the GLM-4-Voice
    `SpeechDecoder` (speech outputs; without it, speech codes are returned but no waveform). The speech *input*
    encoder travels inside the Omni-Diffusion checkpoint (`model.speech`).
    """

    model: OmniModel
    tokenizer: TextTokenizer
    image_tokenizer: object | None = None
    speech_decoder: object | None = None
    batch_size: int = 8
    seed: int = 0
    generated_image_codes: int = GENERATED_IMAGE_CODES  # codes of one generated image (a square)
    user_image_size: int = USER_IMAGE_SIZE

    @classmethod
    def load(cls, model: str | os.PathLike | OmniModel, *, image_tokenizer: str | os.PathLike | None = None,
             speech_decoder: str | os.PathLike | None = None, dtype: str | None = None, mesh=None,
             batch_size: int = 8, seed: int = 0) -> "Pipeline":
        """Loads the model (reference folder or our orbax folder) and whichever components are given."""
        if not isinstance(model, OmniModel):
            model = load_model(model, dtype=dtype, mesh=mesh)
        images = speech = None
        if image_tokenizer is not None:
            from omnidiff_jax.image import ImageTokenizer
            images = ImageTokenizer.load(image_tokenizer, mesh=mesh)
        if speech_decoder is not None:
            from omnidiff_jax.speech_out import SpeechDecoder
            speech = SpeechDecoder.load(speech_decoder)
        return cls(model, text_tokenizer(model), images, speech, batch_size, seed)

    # ------------------------------------------------------------------------------------------ running

    def run(self, requests: Sequence[dict], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Runs every request; returns one result per request, in order. `progress(n)` after each batch of n."""
        results: list[dict | None] = [None] * len(requests)
        ready: list[_Ready] = []
        for i, request in enumerate(requests):
            try:
                ready.append(self._prepare(i, request))
            except (ValueError, OSError) as e:
                results[i] = _failed(request, e)
                if progress:
                    progress(1)
        groups: dict[tuple, list[_Ready]] = {}
        for r in ready:
            groups.setdefault(_group_key(r), []).append(r)
        for rows in groups.values():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                try:
                    outputs = self._sample(batch)
                except ValueError as e:  # e.g. a prompt beyond the model's maximum length
                    for r in batch:
                        results[r.index] = _failed(requests[r.index], e)
                else:
                    for r, ids in zip(batch, outputs):
                        results[r.index] = self._finish(requests[r.index], r, ids)
                if progress:
                    progress(len(batch))
        return results  # type: ignore[return-value]

    def __call__(self, task: str, **request) -> dict:
        """One request: `pipe("vqa", text="What is in the image?", image="cat.png")`."""
        [result] = self.run([{"task": task, **request}])
        if result.get("error"):
            raise RequestError(result["error"])
        return result

    # ------------------------------------------------------------------------------------------ steps

    def _prepare(self, index: int, request: dict) -> _Ready:
        task = request.get("task")
        if task not in TASKS:
            raise RequestError(f"request {index}: unknown task {task!r}; expected one of {TASKS}")
        for field in INPUTS[task]:
            if request.get(field) in (None, ""):
                raise RequestError(f"request {index} ({task}): needs {field!r}")
        preset_fields = {f.name for f in dataclasses.fields(TaskPreset)}
        unknown = set(request) - preset_fields - set(SAMPLER_OPTIONS) - {"task", "text", "image", "audio", "id"}
        if unknown:
            raise RequestError(f"request {index}: unknown field(s) {sorted(unknown)}")
        preset = dataclasses.replace(PRESETS[task], **{k: v for k, v in request.items() if k in preset_fields})
        layout = self.model.layout
        image_codes = []
        if "image" in INPUTS[task]:
            image_codes = [self._encode_image(request["image"], index)]
        embeds = positions = None
        frames = []
        if "audio" in INPUTS[task]:
            embeds, frames = self._encode_audio(request["audio"], index)
        content = task_content(task, request.get("text"))
        prompt = build_prompt(self.tokenizer, layout, content=content, system=preset.system,
                              image_codes=image_codes, audio_frames=frames)
        if prompt.audio_slots:
            start, n = prompt.audio_slots[0]
            positions = np.arange(start, start + n)
            embeds = embeds[:n]
        options = {k: request[k] for k in SAMPLER_OPTIONS if k in request}
        if preset.adaptive == "asr":
            options.update(_lengths(adaptive_length.asr(len(prompt.ids))))
        elif preset.adaptive == "tts":
            text = adaptive_length.tts_text(request.get("text") or "")
            options.update(_lengths(adaptive_length.tts(max(len(self.tokenizer.encode(text)), 1))))
        gen_length = options.get("gen_length", preset.gen_length)
        limit = self.model.config.max_position_embeddings
        if len(prompt.ids) + gen_length > limit:
            raise RequestError(f"request {index} ({task}): prompt of {len(prompt.ids)} tokens + {gen_length} to "
                               f"generate exceeds the model's {limit} positions")
        uncond = None
        if preset.cfg > 0:  # the reference's unconditional prompt: the system turn and an empty user turn
            uncond = sampler.Prompt(build_prompt(self.tokenizer, layout, content="", system=preset.system).ids)
        return _Ready(index, task, preset, sampler.Prompt(prompt.ids, embeds, positions), uncond, options)

    def _encode_image(self, path, index: int) -> np.ndarray:
        if self.image_tokenizer is None:
            raise RequestError(f"request {index}: an image input needs an image tokenizer (MAGVIT-v2)")
        _check_file(path, index, "image")
        return self.image_tokenizer.encode_files([path], size=self.user_image_size)[0]

    def _encode_audio(self, path, index: int) -> tuple[np.ndarray, list[int]]:
        speech = self.model.speech
        if speech is None:
            raise RequestError(f"request {index}: a speech input needs the speech encoder, which this checkpoint "
                               "lacks (no model.audio_model.* keys)")
        _check_file(path, index, "audio")
        feats, lengths = speech.features([path])
        embeds, _ = speech.embed(feats, lengths)
        return np.asarray(embeds[0]), [int(lengths[0])]

    def _sample(self, batch: list[_Ready]) -> list[np.ndarray]:
        p = batch[0].preset
        options = {k: v for k, v in batch[0].options.items() if k not in ("gen_length", "steps")}  # set per row
        options.setdefault("seed", self.seed)
        uncond = [r.uncond for r in batch] if p.cfg > 0 else None
        return sampler.sample(
            self.model, [r.prompt for r in batch], uncond=uncond,
            gen_length=[r.options.get("gen_length", r.preset.gen_length) for r in batch],
            steps=[r.options.get("steps", r.preset.steps) for r in batch], alg=p.alg, temperature=p.temperature,
            top_p=p.top_p, top_k=p.top_k, cfg=p.cfg, repeat_penalty=p.repeat_penalty,
            max_position_penalty=p.max_position_penalty, boa_prefill=p.boa_prefill, **options)

    def _finish(self, request: dict, ready: _Ready, ids: np.ndarray) -> dict:
        layout = self.model.layout
        parsed = split_output(ids, layout)
        result = _result(request, ids=[int(i) for i in ids], text=self.tokenizer.decode(parsed.text_ids),
                         audio_codes=parsed.audio_codes, image_codes=parsed.image_codes)
        if ready.preset.output == "image":
            codes, warning = fit_image_codes(parsed.image_codes, self.generated_image_codes, layout.num_image_codes)
            if warning:
                result["warnings"].append(warning)
            if len(codes) and self.image_tokenizer is not None:
                from omnidiff_jax.image import to_uint8
                result["image"] = to_uint8(self.image_tokenizer.decode_codes(codes[None])[0])
            elif len(codes):
                result["warnings"].append("no image tokenizer loaded: image codes returned without pixels")
        if ready.preset.output == "speech":
            if not parsed.audio_codes:
                result["warnings"].append("no speech codes were generated")
            elif self.speech_decoder is not None:
                from omnidiff_jax.speech_out import decode_speech
                [wave] = decode_speech([parsed.audio_codes], self.speech_decoder, seed=request.get("seed", self.seed))
                result["wav"], result["sample_rate"] = wave, self.speech_decoder.sample_rate
            else:
                result["warnings"].append("no speech decoder loaded: speech codes returned without a waveform")
        return result


def text_tokenizer(model: OmniModel) -> TextTokenizer:
    """The checkpoint's tokenizer files, or UTF-8 bytes for tiny vocabularies (as the tiny training configs)."""
    if model.tokenizer_path is not None:
        return HFTokenizer(model.tokenizer_path, model.layout)
    if model.layout.num_text < 1000:
        return ByteTokenizer(model.layout.num_text)
    raise RequestError("the checkpoint has no tokenizer files (tokenizer_config.json); copy the reference's "
                       "tokenizer files into the checkpoint folder")


def _lengths(settings: dict) -> dict:
    return {k: settings[k] for k in ("gen_length", "steps", "block_size") if k in settings}


def _group_key(r: _Ready) -> tuple:
    p = r.preset
    options = tuple(sorted((k, v) for k, v in r.options.items() if k not in ("gen_length", "steps")))
    return (p.alg, p.temperature, p.top_p, p.top_k, p.cfg, p.repeat_penalty, p.max_position_penalty, p.boa_prefill,
            options)


def _check_file(path, index: int, kind: str) -> None:
    if not Path(path).is_file():
        raise RequestError(f"request {index}: {kind} file {str(path)!r} does not exist")


def _result(request: dict, **fields) -> dict:
    base = {"task": request.get("task"), "id": request.get("id"), "text": "", "ids": [], "audio_codes": [],
            "image_codes": [], "image": None, "wav": None, "sample_rate": None, "warnings": [], "error": None}
    base.update(fields)
    return base


def _failed(request: dict, error: Exception) -> dict:
    return _result(request, error=str(error))


def iter_jsonl(path: str | os.PathLike) -> Iterable[dict]:
    """Requests from a JSONL batch file, one JSON object per line (blank lines skipped)."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            yield parse_object(line, f"{path}:{n}", RequestError)
