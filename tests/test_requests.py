"""Request isolation: every bad request fails alone, with one line naming it and its problem, and never changes
another request's result; results are written as they finish and survive a later crash; bad output
destinations are one-line errors. A tiny random Omni checkpoint (Dream + SenseVoice + projector) and MAGVIT-v2."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from omnidiff_jax import cli, sampler
from omnidiff_jax.commands.generate import requests_from_args
from omnidiff_jax.pipeline import Pipeline, free_device_memory, step_bytes
from omnidiff_jax.request import FIELDS, SAMPLER_OPTIONS, RequestError, check_request, iter_jsonl
from omnidiff_jax.tasks import TaskPreset
from torch_ref.omni import write_tiny_omni

FAST = {"gen_length": 16, "steps": 2}  # short, and the same shapes in every test: few sampler compilations
POISON = [9, 9, 9, 9]  # prompt ids on which the sampler (wrapped below) raises a RuntimeError


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    model, magvit = write_tiny_omni(root)
    (root / "bad.png").write_text("not an image")
    (root / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    return {"model": model, "image_tokenizer": magvit, "bad_png": root / "bad.png", "bad_wav": root / "bad.wav",
            "missing": root / "nope.wav"}


@pytest.fixture(scope="module")
def pipe(paths):
    return Pipeline.load(paths["model"], image_tokenizer=paths["image_tokenizer"], batch_size=4)


@pytest.fixture
def sampler_fault(monkeypatch):
    """The sampler raises a RuntimeError (not a ValueError) for any batch holding the POISON prompt."""
    real = sampler.sample

    def sample(model, prompts, **kw):
        if any(list(np.asarray(p.ids)) == POISON for p in prompts):
            raise RuntimeError("simulated failure inside the sampler")
        return real(model, prompts, **kw)

    monkeypatch.setattr(sampler, "sample", sample)


GOOD = [
    {"id": "cat", "task": "t2i", "text": "a cat", **FAST},
    {"id": "dog", "task": "t2i", "text": "a dog", **FAST},
    {"id": "tts", "task": "tts", "text": "hello there", **FAST},
    {"id": "text", "task": "text", "prompt_ids": [5, 6, 7], **FAST},
]


def bad_requests(paths):
    """(request, a piece of its error): one of each bad kind, each beside good requests of its task."""
    return [
        ({"task": "t2i", "text": "a dog", **FAST, "steps": 0}, "'steps' must be an integer >= 1, got 0"),  # bad value
        ({"task": "t2i", "text": 123, **FAST}, "'text' must be a string, got 123 (int)"),  # wrong type
        ({"task": "tts", "text": "a" * 131072, **FAST}, "exceeds the model's 131072 positions"),  # too long
        ({"task": "asr", "audio": str(paths["missing"]), **FAST}, "does not exist"),  # missing file
        ({"task": "vqa", "text": "What?", "image": str(paths["bad_png"]), **FAST}, "bad.png"),  # unreadable image
        ({"task": "asr", "audio": str(paths["bad_wav"]), **FAST}, "bad.wav"),  # unreadable audio
        ({"task": "text", "prompt_ids": POISON, **FAST}, "internal error, RuntimeError: simulated failure"),  # a bug
    ]


MORE_BAD = [  # more bad values and types, checked before anything runs
    ({"task": "paint", "text": "x"}, "unknown task 'paint'"),
    ("t2i", "expected an object (a dict), got str"),
    ({"task": "t2i", "text": "x", "cfg": 2.0}, "unknown field(s) ['cfg']"),
    ({"task": "t2i", "text": "x", "steps": True}, "'steps' must be an integer >= 1, got True (bool)"),
    ({"task": "t2i", "text": "x", "steps": 4.0}, "'steps' must be an integer >= 1"),
    ({"task": "t2i", "text": "x", "temperature": float("nan")}, "'temperature' must be a number >= 0, got nan"),
    ({"task": "t2i", "text": "x", "top_p": 1.5}, "'top_p' must be a number in (0, 1]"),
    ({"task": "t2i", "text": "x", "alg": "greedy"}, "'alg' must be one of"),
    ({"task": "t2i", "text": "x", "seed": -1}, "'seed' must be an integer in [0, 2^63)"),
    ({"task": "t2i", "text": "x", "id": [1]}, "'id' must be a string or an integer"),
    ({"task": "t2i", "text": "x", "image": "a.png"}, "the task takes no 'image'"),
    ({"task": "vqa", "text": "x"}, "needs 'image'"),
    ({"task": "t2i", "text": ""}, "needs 'text'"),
    ({"task": "text", "prompt_ids": [1, -2]}, "'prompt_ids' must be a non-empty list of token ids"),
    ({"task": "text", "prompt_ids": [1, 10 ** 6]}, "outside the vocabulary"),
    ({"task": "text", "text": "x", "prompt_ids": [1]}, "give 'text' or 'prompt_ids', not both"),
    ({"task": "asr", "audio": "."}, "is not a file"),
    ({"task": "tts", "text": "hi", "gen_length": 10 ** 6}, "exceeds the model's 131072 positions"),
]


@pytest.mark.parametrize("kind", range(7))
def test_each_bad_kind_fails_alone_with_its_error(pipe, paths, sampler_fault, kind):
    request, message = bad_requests(paths)[kind]
    [result] = pipe.run([request])
    assert message in result["error"]
    assert result["error"].startswith("request 0 (")  # it names the request
    assert "\n" not in result["error"] and result["ids"] == [] and result["image"] is None


@pytest.mark.parametrize("request_, message", MORE_BAD)
def test_bad_values_and_types_are_named(pipe, request_, message):
    [result] = pipe.run([request_])
    assert message in result["error"]


def test_too_long_for_device_memory_is_refused_up_front(pipe):
    text = "a" * 100_000  # fits the positions, but not a CPU's memory: 66 GB of attention scores and mask
    length = sampler.bucket(len(text) + 40) + sampler.bucket(50)
    free = free_device_memory()
    if free is None or step_bytes(pipe.model.config, 1, length, 64) < free:
        pytest.skip("this machine has the memory for it")
    [result] = pipe.run([{"task": "tts", "text": text, **FAST}])
    assert "GiB of device memory per sampler step" in result["error"] and "GiB free" in result["error"]


def test_null_means_not_given(pipe):
    """As the evaluation's requests send them: inputs a task does not take as null, top_p null = no filter."""
    request = check_request({"task": "asr", "audio": "a.wav", "text": None, "image": None, "steps": None,
                             "top_p": None}, 0)
    assert request.text is None and request.preset.steps == 25 and request.preset.top_p is None


def test_every_preset_field_and_sampler_option_is_checked():
    assert {f.name for f in dataclasses.fields(TaskPreset)} | set(SAMPLER_OPTIONS) <= set(FIELDS)


@pytest.mark.slow
def test_bad_requests_change_no_good_result(pipe, paths, sampler_fault):
    """One request of each bad kind among good ones, in the same groups: every good one gives exactly what it
    gives alone, and every bad one its own error."""
    good, bad = GOOD, bad_requests(paths)
    requests = []
    for i in range(max(len(good), len(bad))):  # interleaved, so the bad ones sit inside the good ones' batches
        requests += good[i:i + 1] + [r for r, _ in bad[i:i + 1]]
    results = pipe.run(requests)
    for request, result in zip(requests, results):
        if request in good:
            assert result["error"] is None, (request["id"], result["error"])
            [alone] = pipe.run([request])
            assert result["ids"] == alone["ids"] and result["text"] == alone["text"], request["id"]
            assert (result["image"] is None) == (alone["image"] is None)
        else:
            assert [m for r, m in bad if r is request][0] in result["error"]
    assert len(results[0]["ids"]) == 16 and results[0]["image"].shape == (256, 256, 3)


def test_stream_yields_failures_first_then_each_batch(pipe):
    requests = [GOOD[2], {"task": "tts", "text": 5}, GOOD[0]]
    order = [index for index, _ in pipe.stream(requests)]
    assert order == [1, 0, 2]
    with pytest.raises(RequestError, match="'text' must be a string"):
        pipe("tts", text=5)


def test_written_results_survive_a_crash(paths, tmp_path, monkeypatch):
    """A request that kills the run (here Ctrl-C inside the sampler) loses only what was not finished: the
    results written before it stay, each complete, with its manifest line."""
    real = sampler.sample

    def sample(model, prompts, **kw):
        if any(list(np.asarray(p.ids)) == POISON for p in prompts):
            raise KeyboardInterrupt
        return real(model, prompts, **kw)

    monkeypatch.setattr(sampler, "sample", sample)
    batch = tmp_path / "requests.jsonl"
    lines = [GOOD[0], {"id": "bad", "task": "t2i", "text": 7}, {"id": "kill", "task": "text", "prompt_ids": POISON,
                                                                 **FAST}, GOOD[2]]
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    argv = ["generate", "--model", str(paths["model"]), "--image-tokenizer", str(paths["image_tokenizer"]),
            "--requests", str(batch), "--out", str(out), "--batch-size", "1"]
    assert cli.main(argv) == 130
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    by_id = {m["id"]: m for m in manifest}
    assert set(by_id) == {"bad", "cat"}  # the groups run in order of their first request: t2i, then text, tts
    assert "'text' must be a string" in by_id["bad"]["error"] and by_id["bad"]["index"] == 1
    with Image.open(out / by_id["cat"]["image"]) as im:
        assert im.size == (256, 256)
    assert sorted(os.listdir(out)) == ["0000-cat.png", "manifest.jsonl"]  # no temporary file left behind


def test_a_requests_own_fields_override_the_flags(tmp_path):
    """With --requests the flags are every request's defaults and a request's own fields win (the more specific
    setting); a flag still beats the task's preset."""
    batch = tmp_path / "requests.jsonl"
    lines = [{"task": "t2i", "text": "a cat", "steps": 3, "chat": True}, {"text": "hello"}]
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = cli.build_parser().parse_args(["generate", "--config", "tiny", "--requests", str(batch), "--task", "tts",
                                          "--steps", "7", "--raw"])
    own, default = [check_request(r, i) for i, r in enumerate(requests_from_args(args))]
    assert (own.task, own.preset.steps, own.preset.chat) == ("t2i", 3, True)
    assert (default.task, default.preset.steps, default.preset.chat) == ("tts", 7, False)  # the tts preset has 25
    assert default.preset.gen_length == 50  # no flag, no field: the preset's


def test_manifest_lines_are_in_request_order_when_the_run_completes(paths, tmp_path):
    batch = tmp_path / "requests.jsonl"
    lines = [{**GOOD[2], "id": "a"}, {"id": "b", "task": "tts", "text": 5}, {**GOOD[3], "id": "c"}]
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", str(paths["model"]), "--requests", str(batch), "--out", str(out)]) == 1
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["index"], m["id"]) for m in manifest] == [(0, "a"), (1, "b"), (2, "c")]
    assert [m["error"] is None for m in manifest] == [True, False, True]


def test_bad_output_destinations_are_one_line_errors(paths, tmp_path, capsys):
    model = ["generate", "--model", str(paths["model"])]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(model + ["--task", "tts", "--text", "hi", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"omnidiff: error: {a_file}: exists and is not a folder" in err and "Traceback" not in err
    # a full disk: /dev/full refuses every write
    assert cli.main(model + ["--prompt-ids", "5,6,7", "--gen-length", "16", "--steps", "2", "--output", "/dev/full",
                             "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "omnidiff: error: /dev/full: cannot write: No space left on device"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main(model + ["--task", "tts", "--text", "hi", "--out", str(locked / "out")]) == 2
        assert "cannot create the output folder" in capsys.readouterr().err


def test_a_batch_file_that_is_not_utf8_is_named(tmp_path):
    batch = tmp_path / "requests.jsonl"
    batch.write_bytes(b'{"task": "tts", "text": "hi"}\n\xff\xfe\n')
    with pytest.raises(RequestError, match=r"requests.jsonl: not UTF-8 text \(byte 30\)"):
        list(iter_jsonl(batch))
