"""End to end: every task from a converted tiny checkpoint (Dream + SenseVoice + projector, imported to orbax),
a tiny MAGVIT-v2 and a tiny GLM-4-Voice decoder, with the real images and speech in tests/data."""

import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import omnidiff_jax
from omnidiff_jax import cli
from omnidiff_jax.pipeline import Pipeline
from omnidiff_jax.request import RequestError, iter_jsonl
from omnidiff_jax.tasks import PRESETS, build_prompt, task_content
from omnidiff_jax.sampler import sample
from omnidiff_jax.text_tokenizer import ByteTokenizer
from torch_ref import dream as dream_ref
from torch_ref import glm4voice_decoder as decoder_ref
from torch_ref.omni import write_tiny_omni

FAST = {"steps": 6}  # every request also runs its task preset, with fewer steps to keep the suite quick


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model, magvit = write_tiny_omni(root)
    decoder_ref.save_decoder(root / "decoder", decoder_ref.random_flow(), decoder_ref.random_hift())
    return {"model": model, "image_tokenizer": magvit, "speech_decoder": root / "decoder"}


@pytest.fixture(scope="module")
def pipe(paths):
    return Pipeline.load(paths["model"], image_tokenizer=paths["image_tokenizer"],
                         speech_decoder=paths["speech_decoder"])


@pytest.mark.slow
def test_every_task_end_to_end(pipe, assets):
    requests = [
        {"task": "t2i", "text": "a red apple", **FAST},
        {"task": "s2i", "audio": str(assets / "s2i_0.wav"), **FAST},
        {"task": "vqa", "text": "What is in the picture?", "image": str(assets / "vqa_0.png"), **FAST},
        {"task": "svqa", "audio": str(assets / "svqa_0.wav"), "image": str(assets / "svqa_0.jpg"), **FAST},
        {"task": "tts", "text": "hello world", **FAST},
        {"task": "asr", "audio": str(assets / "asr_0.wav"), **FAST},
    ]
    results = pipe.run(requests)
    for req, res in zip(requests, results):
        assert res["error"] is None, (req["task"], res["error"])
        assert len(res["ids"]) == PRESETS[req["task"]].gen_length
    for res in results[:2]:  # image tasks: a 256 x 256 RGB picture from exactly 256 codes
        assert res["image"].shape == (256, 256, 3) and res["image"].dtype == np.uint8
    tts = results[4]
    if tts["audio_codes"]:  # random weights may emit no speech code; then a warning says so
        assert tts["sample_rate"] == 22050 and tts["wav"].ndim == 1 and np.isfinite(tts["wav"]).all()
    else:
        assert "no speech codes were generated" in tts["warnings"]
    # determinism: the same requests give the same tokens
    again = pipe.run(requests[:1] + requests[5:])
    assert again[0]["ids"] == results[0]["ids"] and again[1]["ids"] == results[5]["ids"]


def test_prompts_equal_the_reference_token_sequences(pipe, assets):
    """Each task's prompt, built by hand from Omni-Diffusion `tools/inference.py` with the same byte tokenizer."""
    lay = pipe.model.layout
    enc = ByteTokenizer(lay.num_text).encode
    head = lambda role: [lay.im_start, *enc(f"{role}\n")]  # noqa: E731
    tail = [lay.im_end, *enc("\n"), lay.im_start, *enc("assistant\n")]
    audio = lambda n: [lay.begin_of_audio] + [lay.context_of_audio] * (n + 4) + [lay.end_of_audio]  # noqa: E731
    image = lambda codes: [lay.begin_of_image, *(lay.image_code_start + np.asarray(codes)), lay.end_of_image]  # noqa
    system = lambda text: [lay.im_start, *enc(f"system\n{text}"), lay.im_end, *enc("\n")]  # noqa: E731
    codes = np.arange(16) % lay.num_image_codes
    want = {
        "t2i": head("user") + enc("Generate an image based on the provided text description.\nsky") + tail,
        "vqa": head("user") + enc("Why?\n") + image(codes) + tail,
        "tts": head("user") + enc("Convert the text to speech.\nsky") + tail,
        "asr": head("user") + enc("Convert the speech to text.\n") + audio(7) + tail,
        "s2i": system("Please generate an image based on the input audio.") + head("user") + enc("\n") + audio(7)
        + tail,
        "svqa": system("Please response the input audio based on the given image.") + head("user") + audio(7)
        + enc("\n") + image(codes) + tail,
    }
    features = np.zeros((7 + 4, pipe.model.config.hidden_size), np.float32)  # T_lfr = 7: 7 + 4 slots
    for task, ids in want.items():
        preset = PRESETS[task]
        content = task_content(preset.content, {"t2i": "sky", "tts": "sky", "vqa": "Why?"}.get(task))
        got = build_prompt(pipe.tokenizer, lay, content=content, system=preset.system,
                           image_codes=[codes] * content.count("<|image|>"),
                           audio_embeds=[features] * content.count("<|audio|>"))
        assert got.ids.tolist() == [int(i) for i in ids], task
    # the speech features land on the <|context_of_audio|> slots of an ASR prompt
    prompt = pipe.prompt({"task": "asr", "audio": str(assets / "svqa_0.wav")})
    slots = np.flatnonzero(prompt.ids == lay.context_of_audio)
    assert prompt.embed_positions.tolist() == slots.tolist() and len(prompt.embeds) == len(slots)


def test_jsonl_batch_with_mixed_tasks_and_bad_requests(paths, assets, tmp_path, capsys):
    batch = tmp_path / "requests.jsonl"
    lines = [
        {"id": "img", "task": "t2i", "text": "a cat", **FAST},
        {"id": "missing", "task": "asr", "audio": str(tmp_path / "nope.wav"), **FAST},
        {"id": "wrong-kind", "task": "asr", "audio": str(assets / "vqa_0.png"), **FAST},
        {"id": "unknown", "task": "paint", "text": "x"},
        {"id": "speech", "task": "tts", "text": "hi", **FAST},
        {"id": "too-long", "task": "tts", "text": "a" * 131072, **FAST},
    ]
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    code = cli.main(["generate", "--model", str(paths["model"]), "--image-tokenizer", str(paths["image_tokenizer"]),
                     "--speech-decoder", str(paths["speech_decoder"]), "--requests", str(batch), "--out", str(out)])
    assert code == 1  # some requests failed; the rest completed
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    by_id = {m["id"]: m for m in manifest}
    assert [m["id"] for m in manifest] == [x["id"] for x in lines]
    assert by_id["img"]["error"] is None
    with Image.open(out / by_id["img"]["image"]) as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    assert "does not exist" in by_id["missing"]["error"]
    assert "vqa_0.png" in by_id["wrong-kind"]["error"]
    assert "unknown task 'paint'" in by_id["unknown"]["error"]
    assert "exceeds the model's 131072 positions" in by_id["too-long"]["error"]
    speech = by_id["speech"]
    assert speech["error"] is None
    if speech["wav"]:
        info = sf.info(str(out / speech["wav"]))
        assert info.samplerate == 22050 and info.frames > 0
    # the output folder is not overwritten without --force
    assert cli.main(["generate", "--model", str(paths["model"]), "--task", "t2i", "--text", "x", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("line, problem", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_jsonl_batch_names_the_bad_line(tmp_path, line, problem):
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"task": "t2i", "text": "a cat"}\n\n' + line + "\n")
    with pytest.raises(RequestError, match=rf"requests.jsonl:3: {problem}"):
        list(iter_jsonl(batch))


# ------------------------------------------------------------------------------------------- plain text (task "text")

@pytest.mark.slow
def test_cli_generate_with_random_tiny_weights(capsys):
    assert cli.main(["generate", "--config", "tiny", "--prompt-ids", "1,2,3", "--prompt-ids", "4,5",
                     "--gen-length", "128", "--steps", "8", "--batch-size", "1"]) == 0
    out = capsys.readouterr()
    assert "random weights" in out.err.lower()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [line["prompt_ids"] for line in lines] == [[1, 2, 3], [4, 5]]
    assert [len(line["ids"]) for line in lines] == [128, 128]
    # a tiny vocabulary has the tasks' byte tokenizer, so text prompts run too (the chat template: see below)
    assert cli.main(["generate", "--config", "tiny", "--prompt", "hello", "--raw", "--gen-length", "128", "--steps",
                     "8"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["prompt_ids"] == list(b"hello") and len(line["ids"]) == 128


def test_text_needs_tokenizer_files_or_token_ids():
    model = omnidiff_jax.init_model("tiny")
    pipe = Pipeline(model, tokenizer=None)  # as a full-size vocabulary without tokenizer files
    text, ids = pipe.run([{"task": "text", "text": "hello", "gen_length": 128, "steps": 2},
                          {"task": "text", "prompt_ids": [1, 2, 3], "gen_length": 128, "steps": 2}])
    assert "no tokenizer files" in text["error"] and "prompt_ids" in text["error"]
    assert ids["error"] is None and ids["text"] is None and len(ids["ids"]) == 128


def test_cli_generate_with_a_checkpoint_and_its_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    c = dream_ref.tiny_hf_config()
    folder = dream_ref.save_hf(dream_ref.random_dream(c, seed=1), tmp_path / "ckpt", c)
    jm = omnidiff_jax.load_model(folder)
    lay = jm.layout
    specials = {lay.eos: "<|endoftext|>", lay.im_start: "<|im_start|>", lay.im_end: "<|im_end|>",
                lay.audio_tag: "<|audio|>"}  # at the ids the model's token layout gives them
    words = [f"w{i}" for i in range(200)] + ["hello", "world"]
    words += [specials.get(i, f"x{i}") for i in range(len(words), lay.audio_tag + 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(specials.values())})
    fast.save_pretrained(folder)
    out_file = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(folder), "--prompt", "hello world", "--gen-length", "128", "--steps", "8",
            "--output", str(out_file)]
    assert cli.main(argv + ["--raw"]) == 0
    record = json.loads(out_file.read_text().splitlines()[0])
    assert record["prompt_ids"] == [200, 201] and isinstance(record["text"], str)
    assert record["ids"] == sample(jm, [[200, 201]], gen_length=128, steps=8)[0].tolist()
    assert cli.main(argv) == 2  # an existing output file is not overwritten without --force
    assert "exists" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0  # the chat template: <|im_start|>user\n ... <|im_start|>assistant\n
    ids = json.loads(out_file.read_text().splitlines()[0])["prompt_ids"]
    assert ids[0] == jm.layout.im_start and ids.count(jm.layout.im_start) == 2 and ids.count(jm.layout.im_end) == 1
