"""`omnidiff demo`: a synthetic any-to-any world, learned by a tiny model with the real trainer and sampler.

The world has a handful of concepts. Each has a name (text), a picture (a 4 x 4 grid of coloured cells whose
image codes are the colours' palette indices), a voice (a two-tone chirp, heard through the real fbank front
end and a frozen random SenseVoice encoder) and a speech answer (a fixed sequence of speech codes). From them
the demo writes reference-format jsonl records for all six tasks, in the reference's chat layouts:

    t2i   "Generate an image ...\\n{name}"          -> <|image|> grid        asr   "Convert the speech ...\\n<|audio|>" -> name
    s2i   system + "\\n<|audio|>"                    -> <|image|> grid        tts   "Convert the text ...\\n{name}"       -> speech codes
    vqa   "What is this?\\n<|image|>"                -> name                  svqa  system + "<|audio|>\\n<|image|>"    -> speech codes

then runs `omnidiff data prepare`'s code on them, trains the tiny Dream (plus the speech projector) with the
trainer, samples every task through `Pipeline` with fresh recordings of the voices, and prints per-task exact
match. Chance is 1 / concepts. A picture of target vs generated grids is written for the image tasks.

The demo's "image tokenizer" reads the grid pictures cell by cell (exactly invertible), and its assistant
speech is given as code files: those are the synthetic world's definitions, not stand-ins for MAGVIT or
GLM-4-Voice, whose own tests cover them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image

from omnidiff_jax.audio_io import write_wav
from omnidiff_jax.tasks import PRESETS, task_content

NAMES = ("red", "blue", "green", "gold", "pink", "teal")
GRID = 4  # cells per side
CELL = 8  # pixels per cell
SPEECH_LEN = 6
MARKER = ".omnidiff-demo"
# gen length = steps: the answer plus room for the <|endoftext|> tail every training sample ends with
TASK_LENGTHS = {"t2i": 24, "s2i": 24, "vqa": 12, "asr": 12, "tts": 14, "svqa": 14}
# The presets' repeat and position penalties suit real 256-code images and speech; a two-colour 4 x 4 grid is
# nothing but repeats, so the demo samples every task with plain entropy ordering at temperature 0. Without the
# top-p filter: with it, every position whose best token has p > 0.9 keeps only that token, scores entropy 0, and
# the tie goes to the leftmost, so the canvas fills left to right like a language model copying the pattern so far
# (a tiny model then miscounts a repeating grid); the true entropies commit the surest positions anywhere first.
# No CFG: the demo never trains the unconditional prompt.
PLAIN = {"alg": "entropy", "top_p": None, "cfg_scale": 0.0, "repeat_penalty": 1.0, "max_position_penalty": 1.0}
RECORDINGS = 8  # voice recordings per concept in the training data (evaluation uses fresh ones)


def palette(n: int) -> np.ndarray:
    """n distinguishable RGB colours (uint8 [n, 3]) for image codes 0..n-1."""
    rng = np.random.RandomState(7)
    return rng.randint(0, 256, (n, 3)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    grid: np.ndarray  # [GRID * GRID] image codes
    speech: np.ndarray  # [SPEECH_LEN] speech codes
    tones: tuple[float, float]  # Hz


def world(num_image_codes: int, num_audio_codes: int) -> list[Concept]:
    """The concepts: distinct two-colour grid patterns, distinct speech code sequences, distinct voices."""
    out = []
    for k, name in enumerate(NAMES):
        a, b = (2 * k) % num_image_codes, (2 * k + 1) % num_image_codes
        r, c = np.divmod(np.arange(GRID * GRID), GRID)
        pattern = ((r + c) % 2, r % 2, c % 2)[k % 3]
        grid = np.where(pattern == 0, a, b).astype(np.int32)
        speech = ((7 * k + 3 * np.arange(SPEECH_LEN)) % num_audio_codes).astype(np.int32)
        out.append(Concept(name, grid, speech, (300.0 + 140 * k, 1800.0 + 260 * k)))
    return out


class GridImages:
    """The demo world's image tokenizer: a picture of GRID x GRID cells <-> the palette index of each cell."""

    def __init__(self, num_codes: int):
        self.colors = palette(num_codes).astype(np.int32)

    def picture(self, codes) -> np.ndarray:
        """codes [GRID^2] -> uint8 [GRID*CELL, GRID*CELL, 3]."""
        cells = self.colors[np.asarray(codes).reshape(GRID, GRID)].astype(np.uint8)
        return cells.repeat(CELL, axis=0).repeat(CELL, axis=1)

    def encode_files(self, paths, size: int | None = None) -> np.ndarray:
        """Reads pictures and returns the nearest palette code of each cell's centre: [B, GRID^2]."""
        out = []
        for p in paths:
            pixels = np.asarray(Image.open(p).convert("RGB"), np.int32)
            centres = pixels[CELL // 2::CELL, CELL // 2::CELL].reshape(-1, 1, 3)
            out.append(((centres - self.colors[None]) ** 2).sum(-1).argmin(-1).astype(np.int32))
        return np.stack(out)

    def decode_codes(self, codes) -> np.ndarray:
        """codes [B, GRID^2] -> images in [-1, 1], as a MAGVIT decoder returns them."""
        return np.stack([self.picture(c) for c in np.asarray(codes)]).astype(np.float32) / 127.5 - 1.0


def voice(concept: Concept, rng: np.random.RandomState, seconds: float = 0.5, sr: int = 16000) -> np.ndarray:
    """One recording of a concept's voice: its two tones with a random phase, loudness and background noise."""
    t = np.arange(int(seconds * sr)) / sr
    f1, f2 = concept.tones
    wave = np.sin(2 * np.pi * f1 * t + rng.uniform(0, 6.3)) + 0.6 * np.sin(2 * np.pi * f2 * t + rng.uniform(0, 6.3))
    wave = wave * rng.uniform(0.2, 0.35) + rng.normal(0, 0.01, t.size)
    return wave.astype(np.float32)


QUESTION = "What is this?"  # the VQA question about every picture


def chat(task: str, answer: str, text: str | None = None) -> list[dict]:
    """A record's messages in the layout the pipeline prompts with: the task preset's system turn (if any) and
    user content (`tasks.task_content`), then the assistant's answer."""
    system = PRESETS[task].system
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": task_content(PRESETS[task].content, text)},
        {"role": "assistant", "content": answer}]


def records(concepts: list[Concept], media: Path, recordings: int, rng: np.random.RandomState) -> dict[str, list]:
    """Reference-format records for the six tasks, writing the media files they name under `media`."""
    out = {task: [] for task in TASK_LENGTHS}
    for k, c in enumerate(concepts):
        grid, codes = media / f"grid_{k}.png", media / f"speech_{k}.npy"
        wavs = [media / f"voice_{k}_{n}.wav" for n in range(recordings)]
        for wav in wavs:
            write_wav(wav, voice(c, rng), 16000)
        out["t2i"].append({"messages": chat("t2i", "<|image|>", c.name), "images": [str(grid)]})
        out["vqa"].append({"messages": chat("vqa", c.name, QUESTION), "images": [str(grid)]})
        out["tts"].append({"messages": chat("tts", "<|audio|>", c.name), "audios": [str(codes)]})
        for wav in wavs:
            out["asr"].append({"messages": chat("asr", c.name), "audios": [str(wav)]})
            out["s2i"].append({"messages": chat("s2i", "<|image|>"), "audios": [str(wav)], "images": [str(grid)]})
        for j in range(len(concepts)):  # spoken question about a picture: answer with the picture's speech
            out["svqa"].append({"messages": chat("svqa", "<|audio|>"),
                                "audios": [str(wavs[j % recordings]), str(media / f"speech_{j}.npy")],
                                "images": [str(media / f"grid_{j}.png")]})
    return out


def write_media(concepts: list[Concept], media: Path, images: GridImages) -> None:
    for k, c in enumerate(concepts):
        Image.fromarray(images.picture(c.grid)).save(media / f"grid_{k}.png")
        np.save(media / f"speech_{k}.npy", c.speech)


def train_config(root: Path, steps: int) -> ml_collections.ConfigDict:
    """The tiny Dream with the six demo sources (the reference's mixture semantics, equal samples per task).

    Packs are single-task and their padding joins the last sample's attention as keys (the reference's
    packing). A sample that always sat alone in a pack would only ever be trained with a long run of padding
    after it, which a sampling canvas never has: the pack length fits two of the longest samples (spoken VQA:
    129 tokens + up to 16 <|endoftext|>), so every task is also trained without padding behind it.
    """
    from omnidiff_jax.configs.tiny import get_config as tiny
    from omnidiff_jax.train.settings import add_training, source

    r = RECORDINGS
    per_task = {"t2i": r, "vqa": r, "tts": r, "asr": 1.0, "s2i": 1.0, "svqa": r / len(NAMES)}  # balanced epochs
    cfg = add_training(tiny(), workdir=str(root / "run"), steps=steps, seq_len=288, micro_batch=4, grad_accum=1,
                       sources={t: source(t, t, jsonl=(f"{t}.jsonl",), ratio=r) for t, r in per_task.items()})
    cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_layers = 128, 256, 3
    cfg.data.root = str(root / "data")
    cfg.data.max_audios, cfg.data.max_audio_frames = 3, 16  # ASR packs hold 3 clips of 8 frames
    cfg.data.noise = "per_sample"  # train every masking level, up to the fully masked answer sampling starts from
    cfg.train.checkpoint_every = steps
    cfg.train.log_every = max(steps // 10, 1)
    # 3e-3 leaves the grids half learned after 1500 steps (loss ~0.08); 2e-3 gets to ~5e-4 by 1100 steps, where
    # seeds 0 and 1 answer all six tasks exactly (after 800, seed 1 still miscounted two t2i grids)
    cfg.optim.lr = 2e-3
    cfg.optim.warmup_ratio = 0.05
    cfg.prepare.text_tokenizer = "bytes"
    return cfg


def run(out: str | os.PathLike = "demo", steps: int = 1100, seed: int = 0, force: bool = False,
        progress: bool = True) -> dict:
    """Builds the world, trains, samples every task; returns {task: accuracy} and writes `out`/results.json."""
    from omnidiff_jax import fbank, sharding
    from omnidiff_jax.config import token_layout
    from omnidiff_jax.models.projector import ProjectorConfig
    from omnidiff_jax.models.sensevoice import SenseVoiceConfig
    from omnidiff_jax.speech_in import init_speech_input, load_wave
    from omnidiff_jax.text_tokenizer import ByteTokenizer
    from omnidiff_jax.train import prepare
    from omnidiff_jax.train.speech import speech_encoder
    from omnidiff_jax.train.trainer import Trainer

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists() and not force:
        raise FileExistsError(f"{root} exists and is not a demo folder; choose another --out or pass --force")
    if root.exists():
        shutil.rmtree(root)
    media = root / "media"
    media.mkdir(parents=True)
    (root / MARKER).write_text("written by omnidiff demo\n")
    began = time.perf_counter()

    cfg = train_config(root, steps)
    layout = token_layout(cfg)
    concepts = world(layout.num_image_codes, layout.num_audio_codes)
    images = GridImages(layout.num_image_codes)
    write_media(concepts, media, images)
    rng = np.random.RandomState(seed)
    for task, recs in records(concepts, media, recordings=RECORDINGS, rng=rng).items():
        (root / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    speech = init_speech_input(SenseVoiceConfig.tiny(), ProjectorConfig.tiny(hidden_size=cfg.model.hidden_size),
                               seed=seed)
    tokenizers = prepare.Tokenizers(
        text=ByteTokenizer(layout.num_text),
        image=lambda paths, size: list(images.encode_files(paths)),
        speech_codes=lambda paths: [np.load(p) for p in paths],
        speech_features=lambda paths: [f[:n] for f, n in zip(*fbank.wave_features([load_wave(p) for p in paths]))])
    for name, src in cfg.data.sources.items():
        prepare.prepare_source([root / f"{name}.jsonl"], Path(cfg.data.root) / src.path, layout, tokenizers,
                               shard_size=256, progress=False)

    one_device = sharding.make_mesh(devices=jax.devices()[:1])  # the tiny model and its 4-pack batch: any host
    trainer = Trainer(cfg, speech_encoder(speech, cfg.data.max_audios, cfg.data.max_audio_frames), one_device)
    trainer.run(progress=progress)
    pipe = trained_pipeline(root, seed)

    accuracy, shown = evaluate(pipe, concepts, media, np.random.RandomState(seed + 1))
    picture = root / "image_tasks.png"
    Image.fromarray(shown).save(picture)
    summary = {"accuracy": accuracy, "chance": 1 / len(concepts), "train_steps": steps,
               "seconds": round(time.perf_counter() - began, 1), "picture": str(picture)}
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def trained_pipeline(root: str | os.PathLike, seed: int = 0):
    """The `Pipeline` of the demo run in `root` (after `run`): its trained Dream and speech projector, the frozen
    random speech encoder of `seed` it was trained with, and the grid image tokenizer."""
    from omnidiff_jax.config import dream_config, token_layout
    from omnidiff_jax.model import OmniModel
    from omnidiff_jax.models.projector import ProjectorConfig
    from omnidiff_jax.models.sensevoice import SenseVoiceConfig
    from omnidiff_jax.pipeline import Pipeline
    from omnidiff_jax.speech_in import SpeechInput, init_speech_input
    from omnidiff_jax.text_tokenizer import ByteTokenizer
    from omnidiff_jax.train.checkpoints import load_run_params

    cfg = train_config(Path(root), steps=1)  # the model's shape; the step count does not matter here
    layout = token_layout(cfg)
    speech = init_speech_input(SenseVoiceConfig.tiny(), ProjectorConfig.tiny(hidden_size=cfg.model.hidden_size),
                               seed=seed)
    trained = load_run_params(cfg.train.workdir)
    speech = SpeechInput(speech.encoder, speech.projector,
                         {"encoder": speech.params["encoder"], "projector": trained["audio_projection"]})
    model = OmniModel(dream_config(cfg), layout, jax.tree.map(np.asarray, trained["dream"]), speech=speech)
    # batches of two concepts' six requests (`eval_requests`' order) all have one canvas shape: one sampler program
    return Pipeline(model, ByteTokenizer(layout.num_text), image_tokenizer=GridImages(layout.num_image_codes),
                    seed=seed, generated_image_codes=GRID * GRID, batch_size=2 * len(TASK_LENGTHS))


def evaluate(pipe, concepts: list[Concept], media: Path, rng: np.random.RandomState) -> tuple[dict, np.ndarray]:
    """Samples every task for every concept (fresh voice recordings); returns exact-match accuracy per task and a
    picture with one row per image request: target grid | t2i output | s2i output."""
    requests, targets = eval_requests(concepts, media, rng)
    results = pipe.run(requests)
    for req, res in zip(requests, results):
        if res["error"]:
            raise RuntimeError(f"demo request {req} failed: {res['error']}")
    rows = []
    images = pipe.image_tokenizer
    for k, c in enumerate(concepts):
        t2i, s2i = results[6 * k], results[6 * k + 1]
        tiles = [images.picture(c.grid)]
        for r in (t2i, s2i):
            codes = list(r["image_codes"][:GRID * GRID]) or [0]
            codes += [codes[-1]] * (GRID * GRID - len(codes))
            tiles.append(images.picture(codes))
        gap = np.full((GRID * CELL, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    shown = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    return score(requests, results, targets), shown


def eval_requests(concepts: list[Concept], media: Path, rng: np.random.RandomState) -> tuple[list, list]:
    """The evaluation: every task for every concept, spoken ones with a fresh recording of its voice (written
    under `media`); returns the pipeline requests and their targets (the grid, name or speech codes)."""
    requests, targets = [], []
    for k, c in enumerate(concepts):
        wav = media / f"eval_voice_{k}.wav"
        write_wav(wav, voice(c, rng), 16000)
        other = (k + 1) % len(concepts)
        lengths = lambda t: {"gen_length": TASK_LENGTHS[t], "steps": TASK_LENGTHS[t], **PLAIN}  # noqa: E731
        requests += [
            {"task": "t2i", "text": c.name, **lengths("t2i")},
            {"task": "s2i", "audio": str(wav), **lengths("s2i")},
            {"task": "vqa", "text": QUESTION, "image": str(media / f"grid_{k}.png"), **lengths("vqa")},
            {"task": "asr", "audio": str(wav), **lengths("asr")},
            {"task": "tts", "text": c.name, **lengths("tts")},
            {"task": "svqa", "audio": str(wav), "image": str(media / f"grid_{other}.png"), "boa_prefill": False,
             **lengths("svqa")},
        ]
        targets += [c.grid, c.grid, c.name, c.name, c.speech, concepts[other].speech]
    return requests, targets


def score(requests: list[dict], results: list[dict], targets: list) -> dict[str, float]:
    """Exact-match accuracy per task of `results` (the pipeline's result dicts) against `eval_requests`' targets:
    the first GRID^2 image codes, the speech codes, or the stripped text."""
    hits: dict[str, list[bool]] = {t: [] for t in TASK_LENGTHS}
    for req, res, want in zip(requests, results, targets):
        task = req["task"]
        if task in ("t2i", "s2i"):
            got = np.asarray(res["image_codes"][:GRID * GRID])
            hits[task].append(got.shape == want.shape and bool((got == want).all()))
        elif task in ("tts", "svqa"):
            hits[task].append(res["audio_codes"] == want.tolist())
        else:
            hits[task].append(res["text"].strip() == want)
    return {t: float(np.mean(h)) for t, h in hits.items()}
