"""Any-to-any generation: one object that holds every component and runs requests of every task.

    pipe = Pipeline.load("ckpt", image_tokenizer="magvitv2", speech_decoder="glm-4-voice-decoder")
    [result] = pipe.run([{"task": "t2i", "text": "a red apple"}])
    result["image"]        # uint8 [256, 256, 3]

A request is a dict (`omnidiff_jax.request`): `task`, the inputs it needs (`text`, `image` path, `audio` path, or
`prompt_ids` for plain text), and optional overrides of any `TaskPreset` field plus sampler options.

Every request is isolated from the others:
  - it is checked on its own (the type and value of every field, its files, its prompt's length) before any runs;
  - requests that share sampler settings then run as one batch; a batch that fails (a bad value the checks did not
    catch, out of memory, any error inside the sampler) is run again row by row, so a failure stays with its
    request and never changes another request's result;
  - `stream` yields each result as soon as it is finished, so a caller writes it before the next batch runs.
Over-long prompts are refused up front: prompt + generation must fit the model's positions, and the estimated
device memory of the sampler step (`step_bytes`) must fit the device's free memory; a batch whose estimate does
not fit is split.

A result holds `task`, `id`, `prompt_ids`, `ids` (the generated region), `text` (None without a tokenizer),
`audio_codes`, `image_codes`, `image` (uint8 HWC) or None, `wav` (float32 at `sample_rate`) or None, `warnings`
(e.g. an image code count that had to be repaired) and `error` (None, or one line naming the request and what
went wrong).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.errors import JaxRuntimeError
from jax.experimental import multihost_utils

from omnidiff_jax import adaptive_length, attention, sampler
from omnidiff_jax.checkpoint import load_model
from omnidiff_jax.image import ImageTokenizer, to_uint8
from omnidiff_jax.model import OmniModel
from omnidiff_jax.models.dream import DreamConfig
from omnidiff_jax.request import Request, RequestError, check_request, request_name
from omnidiff_jax.sampler import Prompt
from omnidiff_jax.speech_out import SpeechDecoder, decode_speech
from omnidiff_jax.tasks import build_prompt, fit_image_codes, split_output, task_content
from omnidiff_jax.text_tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

log = logging.getLogger(__name__)

GENERATED_IMAGE_CODES = 256  # a 256 x 256 image: 16 x 16 codes (Omni-Diffusion `tools/inference.py`)
USER_IMAGE_SIZE = 512  # user images are encoded at 512 x 512 -> 1024 codes


@dataclasses.dataclass
class _Job:
    """A checked request turned into a sampler row."""

    request: Request
    prompt: Prompt
    uncond: Prompt | None  # the unconditional prompt of classifier-free guidance
    gen_length: int
    steps: int
    settings: dict  # the other keyword arguments of `sampler.sample`: the same for every row of a batch

    @property
    def group(self) -> tuple:
        return tuple(sorted(self.settings.items()))


@dataclasses.dataclass
class Pipeline:
    """The LLM plus the optional modality components. Missing components make only the requests that need them fail.

    tokenizer: the text tokenizer, or None (then only requests given as `prompt_ids` run, and no text is decoded).
    image_tokenizer: a MAGVIT-v2 `ImageTokenizer` (image inputs and outputs). speech_decoder: the GLM-4-Voice
    `SpeechDecoder` (speech outputs; without it, speech codes are returned but no waveform). The speech *input*
    encoder travels inside the Omni-Diffusion checkpoint (`model.speech`).
    """

    model: OmniModel
    tokenizer: TextTokenizer | None
    image_tokenizer: ImageTokenizer | None = None
    speech_decoder: SpeechDecoder | None = None
    batch_size: int = 8
    seed: int = 0
    generated_image_codes: int = GENERATED_IMAGE_CODES  # codes of one generated image (a square)
    user_image_size: int = USER_IMAGE_SIZE

    def __post_init__(self):
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    @classmethod
    def load(cls, model: str | os.PathLike | OmniModel, *, image_tokenizer: str | os.PathLike | None = None,
             speech_decoder: str | os.PathLike | None = None, dtype: str | None = None, mesh=None,
             batch_size: int = 8, seed: int = 0) -> "Pipeline":
        """Loads the model (reference folder or our orbax folder) and whichever components are given."""
        if not isinstance(model, OmniModel):
            model = load_model(model, dtype=dtype, mesh=mesh)
        images = speech = None
        if image_tokenizer is not None:
            images = ImageTokenizer.load(image_tokenizer, mesh=mesh)
        if speech_decoder is not None:
            speech = SpeechDecoder.load(speech_decoder)
        return cls(model, text_tokenizer(model), images, speech, batch_size, seed)

    # ------------------------------------------------------------------------------------------ running

    def run(self, requests: Sequence[dict]) -> list[dict]:
        """Runs every request; returns one result per request, in order."""
        results: list[dict | None] = [None] * len(requests)
        for index, result in self.stream(requests):
            results[index] = result
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[dict]) -> Iterator[tuple[int, dict]]:
        """Runs every request and yields (index, result) as each is finished: first the requests that fail their
        checks, then batch by batch. Every request gets exactly one result."""
        jobs = []
        free = free_device_memory()
        for index, request in enumerate(requests):
            try:
                jobs.append(self._prepare(check_request(request, index), free))
            except Exception as e:  # noqa: BLE001 -- whatever goes wrong stays with this request
                yield index, _failed(request, index, e)
        for batch in self._batches(jobs, free):
            yield from self._run_batch(batch, requests)

    def __call__(self, task: str, **request) -> dict:
        """One request: `pipe("vqa", text="What is in the image?", image="cat.png")`."""
        [result] = self.run([{"task": task, **request}])
        if result["error"]:
            raise RequestError(result["error"])
        return result

    def prompt(self, request: dict) -> Prompt:
        """The prompt `request` runs with (after its checks and the encoding of its image and speech inputs)."""
        return self._prepare(check_request(request, 0), free_device_memory()).prompt

    # ------------------------------------------------------------------------------------------ steps

    def _prepare(self, request: Request, free: int | None) -> _Job:
        """The request's prompt, lengths and sampler settings; raises for anything that stops it from running
        (`free`: the device memory it may use, None if unknown)."""
        preset, layout, config = request.preset, self.model.layout, self.model.config
        if request.prompt_ids is not None:
            ids = np.asarray(request.prompt_ids, np.int64)
            if ids.max() >= config.vocab_size:
                raise RequestError(f"{request.name}: prompt_ids holds token id {ids.max()}, outside the "
                                   f"vocabulary [0, {config.vocab_size})")
            prompt = Prompt(ids.astype(np.int32))
        else:
            tokenizer = self._tokenizer(request)
            image_codes = [self._encode_image(request)] if request.image is not None else []
            audio_embeds = [self._encode_audio(request)] if request.audio is not None else []
            prompt = build_prompt(tokenizer, layout, content=task_content(preset.content, request.text),
                                  system=preset.system, image_codes=image_codes, audio_embeds=audio_embeds,
                                  chat=preset.chat)
        settings = dict(alg=preset.alg, temperature=preset.temperature, top_p=preset.top_p, top_k=preset.top_k,
                        cfg_scale=preset.cfg_scale, repeat_penalty=preset.repeat_penalty,
                        max_position_penalty=preset.max_position_penalty, boa_prefill=preset.boa_prefill,
                        seed=self.seed)
        settings.update(request.options)
        gen_length, steps = preset.gen_length, preset.steps
        if preset.adaptive is not None:
            if preset.adaptive == "asr":
                rule = adaptive_length.asr(len(prompt.ids))
            else:
                text = adaptive_length.tts_text(request.text or "")
                rule = adaptive_length.tts(max(len(self._tokenizer(request).encode(text)), 1))
            gen_length, steps = rule["gen_length"], rule["steps"]
            if "block_size" in rule:
                settings["block_size"] = rule["block_size"]
        uncond = None
        if preset.cfg_scale > 0:  # the reference's unconditional prompt: the system turn and an empty user turn
            uncond = build_prompt(self._tokenizer(request), layout, content="", system=preset.system,
                                  chat=preset.chat)
        job = _Job(request, prompt, uncond, gen_length, steps, settings)
        longest = max(len(prompt.ids), 0 if uncond is None else len(uncond.ids)) + gen_length
        if longest > config.max_position_embeddings:
            raise RequestError(f"{request.name}: prompt of {longest - gen_length} tokens + {gen_length} to generate "
                               f"exceeds the model's {config.max_position_embeddings} positions")
        need = self._step_bytes([job])
        if free is not None and need > free:
            raise RequestError(f"{request.name}: prompt of {len(prompt.ids)} tokens + {gen_length} to generate "
                               f"needs about {need / 2 ** 30:.1f} GiB of device memory per sampler step (estimated, "
                               f"see pipeline.step_bytes), more than the {free / 2 ** 30:.1f} GiB free")
        return job

    def _tokenizer(self, request: Request) -> TextTokenizer:
        if self.tokenizer is None:
            raise RequestError(f"{request.name}: the checkpoint has no tokenizer files (tokenizer_config.json), so "
                               "text cannot be tokenized; copy the reference's tokenizer files into the checkpoint "
                               "folder, or give the prompt as token ids (prompt_ids)")
        return self.tokenizer

    def _encode_image(self, request: Request) -> np.ndarray:
        if self.image_tokenizer is None:
            raise RequestError(f"{request.name}: an image input needs an image tokenizer (MAGVIT-v2)")
        _check_file(request.image, request, "image")
        return self.image_tokenizer.encode_files([request.image], size=self.user_image_size)[0]

    def _encode_audio(self, request: Request) -> np.ndarray:
        """The projected speech features of the request's audio, [T_lfr + 4, hidden]."""
        speech = self.model.speech
        if speech is None:
            raise RequestError(f"{request.name}: a speech input needs the speech encoder, which this checkpoint "
                               "lacks (no model.audio_model.* keys)")
        _check_file(request.audio, request, "audio")
        feats, lengths = speech.features([request.audio])
        limit = self.model.config.max_position_embeddings
        if lengths[0] + 4 > limit:  # refused before the speech encoder runs
            raise RequestError(f"{request.name}: the audio gives {lengths[0]} LFR frames, {lengths[0] + 4} prompt "
                               f"positions, beyond the model's {limit}")
        embeds, slots = speech.embed(feats, lengths)
        return np.asarray(embeds[0, :int(slots[0])])

    def _batches(self, jobs: list[_Job], free: int | None) -> Iterator[list[_Job]]:
        """Jobs with the same settings, `batch_size` at a time, each batch split until its memory estimate fits."""
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        for rows in groups.values():
            pending = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            while pending:
                batch = pending.pop(0)
                if len(batch) > 1 and free is not None and self._step_bytes(batch) > free:
                    half = len(batch) // 2
                    pending[:0] = [batch[:half], batch[half:]]
                else:
                    yield batch

    def _run_batch(self, batch: list[_Job], requests: Sequence[dict]) -> Iterator[tuple[int, dict]]:
        """Samples a batch and finishes each row; a batch that fails runs again one row at a time."""
        try:
            outputs = sampler.sample(self.model, [j.prompt for j in batch],
                                     uncond=None if batch[0].uncond is None else [j.uncond for j in batch],
                                     gen_length=[j.gen_length for j in batch], steps=[j.steps for j in batch],
                                     **batch[0].settings)
        except Exception as e:  # noqa: BLE001 -- retried row by row, so that the failure stays with its row
            if len(batch) == 1:
                index = batch[0].request.index
                yield index, _failed(requests[index], index, e)
                return
            log.info("a batch of %d failed (%s); running its rows one at a time", len(batch), describe_error(e)[1])
            for job in batch:
                yield from self._run_batch([job], requests)
            return
        for job, ids in zip(batch, outputs):
            index = job.request.index
            try:
                yield index, self._finish(job, ids)
            except Exception as e:  # noqa: BLE001 -- e.g. the speech decoder failing on this row's codes
                yield index, _failed(requests[index], index, e)

    def _finish(self, job: _Job, ids: np.ndarray) -> dict:
        layout, request = self.model.layout, job.request
        parsed = split_output(ids, layout)
        text = None if self.tokenizer is None else self.tokenizer.decode(parsed.text_ids)
        result = _result(request.task, request.id, prompt_ids=[int(i) for i in job.prompt.ids],
                         ids=[int(i) for i in ids], text=text, audio_codes=parsed.audio_codes,
                         image_codes=parsed.image_codes)
        if request.preset.output == "image":
            codes, warning = fit_image_codes(parsed.image_codes, self.generated_image_codes, layout.num_image_codes)
            if warning:
                result["warnings"].append(warning)
            if len(codes) and self.image_tokenizer is not None:
                result["image"] = to_uint8(self.image_tokenizer.decode_codes(codes[None])[0])
            elif len(codes):
                result["warnings"].append("no image tokenizer loaded: image codes returned without pixels")
        if request.preset.output == "speech":
            if not parsed.audio_codes:
                result["warnings"].append("no speech codes were generated")
            elif self.speech_decoder is not None:
                [wave] = decode_speech([parsed.audio_codes], self.speech_decoder, seed=job.settings["seed"])
                result["wav"], result["sample_rate"] = wave, self.speech_decoder.sample_rate
            else:
                result["warnings"].append("no speech decoder loaded: speech codes returned without a waveform")
        return result

    def _step_bytes(self, batch: list[_Job]) -> int:
        rows = len(batch) * (1 if batch[0].uncond is None else 2)
        prompt = max(max(len(j.prompt.ids), 0 if j.uncond is None else len(j.uncond.ids)) for j in batch)
        generated = sampler.bucket(max(j.gen_length for j in batch))
        return step_bytes(self.model.config, rows, sampler.bucket(prompt) + generated, generated)


def step_bytes(config: DreamConfig, rows: int, length: int, generated: int) -> int:
    """Estimated device memory of one sampler step beyond the parameters, for `rows` model rows (twice the batch
    with classifier-free guidance) on a canvas of `length` positions (the sampler's buckets), `generated` of them
    decoded. Only the largest buffers are counted, so it is a lower bound:

    - attention, the XLA backend: the fp32 score matrix of every query head (XLA computes the softmax weights in
      place), [rows, heads, L, L] x 4 bytes, plus the boolean segment mask, [rows, heads / kv_heads, L, L]; on
      CPU the heads run one at a time, so L x L x 4 bytes plus the mask [rows, L, L] (for a 100k-token prompt of
      the tiny test model, 66 GB, what XLA tries to allocate). The cuDNN (GPU, half precision) and splash (TPU)
      kernels keep no score matrix: only cuDNN's mask [rows, L, L] counts;
    - one layer's activations, [rows, L, 2 x hidden + 2 x intermediate] in fp32;
    - the logits of the generated region and their softmax, 2 x [rows, generated, vocab] in fp32.
    """
    square = length * length
    backend = config.attention_impl
    if backend == "auto":
        backend = attention.auto_implementation(jnp.dtype(config.dtype))
    if backend != "xla":
        scores = rows * square if backend == "cudnn" else 0
    elif jax.default_backend() == "cpu":
        scores = 4 * square + rows * square
    else:
        scores = rows * square * (4 * config.num_heads + config.num_heads // config.num_kv_heads)
    layer = rows * length * (2 * config.hidden_size + 2 * config.intermediate_size) * 4
    logits = 2 * rows * generated * config.vocab_size * 4
    return scores + layer + logits


def free_device_memory() -> int | None:
    """Free bytes on the first local device: its allocator's limit minus what is in use (GPU, TPU), or the host's
    available memory on CPU (Linux); None where neither is known. In a multi-process run, the least over the
    processes (a collective: every process calls it), so that all of them refuse and split batches alike."""
    free = _local_free_memory()
    if jax.process_count() == 1:
        return free
    every = multihost_utils.process_allgather(np.int64(-1 if free is None else free))
    return None if (every < 0).any() else int(every.min())


def _local_free_memory() -> int | None:
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def text_tokenizer(model: OmniModel) -> TextTokenizer | None:
    """The checkpoint's tokenizer files, UTF-8 bytes for tiny vocabularies (as the tiny training configs), or
    None (a full-size vocabulary without tokenizer files: only prompts given as token ids can run)."""
    if model.tokenizer_path is not None:
        return HFTokenizer(model.tokenizer_path, model.layout)
    if model.layout.num_text < 1000:
        return ByteTokenizer(model.layout.num_text)
    return None


def _check_file(path, request: Request, kind: str) -> None:
    if not Path(path).exists():
        raise RequestError(f"{request.name}: {kind} file {str(path)!r} does not exist")
    if not Path(path).is_file():
        raise RequestError(f"{request.name}: {kind} file {str(path)!r} is not a file")


def _result(task, request_id, **fields) -> dict:
    base = {"task": task, "id": request_id, "prompt_ids": [], "ids": [], "text": None, "audio_codes": [],
            "image_codes": [], "image": None, "wav": None, "sample_rate": None, "warnings": [], "error": None}
    base.update(fields)
    return base


def _failed(request, index: int, error: Exception) -> dict:
    """The result of a request that did not run: its task and id (when they are plain values) and the error."""
    fields = request if isinstance(request, dict) else {}
    task, request_id = fields.get("task"), fields.get("id")
    plain = lambda v: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)  # noqa: E731
    fixable, message = describe_error(error)
    if not isinstance(error, RequestError):
        message = f"{request_name(index, plain(task))}: {message}"
    if not fixable:
        log.info("request %d failed", index, exc_info=error)
    return _result(plain(task), plain(request_id), error=message)


def describe_error(error: Exception) -> tuple[bool, str]:
    """(whether the user can fix it, the error as one line). The user can fix bad values, files and folders
    (ValueError, OSError: the message alone, an OSError as "file: reason") and running out of device or host
    memory; anything else is a bug: "internal error, <type>: <message>". The `omnidiff` command line and the
    results of failed requests both say errors this way."""
    if isinstance(error, OSError) and error.strerror:
        files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return True, _one_line(f"{files}: {error.strerror}" if files else error.strerror)
    if isinstance(error, (ValueError, OSError)):
        return True, _one_line(str(error) or type(error).__name__)
    if isinstance(error, JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
        return True, _one_line(f"out of device memory ({str(error).splitlines()[0]}); use a smaller batch or length")
    if isinstance(error, MemoryError):
        return True, "out of host memory"
    return False, _one_line(f"internal error, {type(error).__name__}: {error}")


def _one_line(message: str, limit: int = 2000) -> str:
    """`message` on one line ("; " between its lines), cut to `limit` characters."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
