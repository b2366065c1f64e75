"""Training data: the six README layouts through the chat template, the reference corruption (bit-exact against
our PyTorch transcription), mask rates, packing, mixture semantics, determinism, iterator resume, bad input."""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch_ref import train_loss as ref

from omnidiff_jax.config import get_config, token_layout
from omnidiff_jax.text_tokenizer import ByteTokenizer
from omnidiff_jax.train import data, prepare

LAYOUT = token_layout(get_config("tiny"))
TEXT = ByteTokenizer(LAYOUT.num_text)
ENC = TEXT.encode


def fake_image(paths, size):
    """(size / 16)^2 codes, a function of the file name: MAGVIT's shape without MAGVIT."""
    return [(np.arange((size // 16) ** 2) * 7 + 29 * sum(p.encode())) % LAYOUT.num_image_codes for p in paths]


def fake_codes(paths):
    return [(np.arange(5) * 3 + 29 * sum(p.encode())) % LAYOUT.num_audio_codes for p in paths]


def fake_features(paths):
    """int(name) frames of 560 features; the values name the file and the frame."""
    out = []
    for p in paths:
        n = int(p.rsplit("/", 1)[-1].split(".")[0])
        out.append(np.arange(n)[:, None] + np.zeros((1, data.FEATURE_DIM), np.float32) + n / 100)
    return out


TOKENIZERS = prepare.Tokenizers(TEXT, fake_image, fake_codes, fake_features)
SIZES = (64, 32)  # user images -> 16 codes, others -> 4 codes

# The six task layouts of Omni-Diffusion's `README.md`, with audio file names giving frame counts.
LAYOUTS = {
    "asr": {"messages": [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"},
                         {"role": "assistant", "content": "hello world"}], "audios": ["3.wav"]},
    "tts": {"messages": [{"role": "user", "content": "Convert the text to speech.\nhi"},
                         {"role": "assistant", "content": "<|audio|>"}], "audios": ["a.wav"]},
    "t2i": {"messages": [{"role": "user", "content": "Generate an image based on the provided text description."
                                                     "\na cat"},
                         {"role": "assistant", "content": "<|image|>"}], "images": ["cat.png"]},
    "vqa": {"messages": [{"role": "user", "content": "What is it?\n<|image|>"},
                         {"role": "assistant", "content": "a dog"}], "images": ["dog.png"]},
    "s2i": {"messages": [{"role": "system", "content": "Please generate an image based on the input audio."},
                         {"role": "user", "content": "<|audio|>"},
                         {"role": "assistant", "content": "<|image|>"}], "audios": ["2.wav"], "images": ["x.png"]},
    "svqa": {"messages": [{"role": "system", "content": "Please response the input audio based on the given image."},
                          {"role": "user", "content": "<|audio|>\n<|image|>"},
                          {"role": "assistant", "content": "a red car\n<|audio|>"}],
             "audios": ["4.wav", "b.wav"], "images": ["car.png"]},
}


def write_tiny_dataset(root, count=3):
    """Prepared t2i / tts / vqa sources for configs/train_tiny.py under `root` (fake media tokenizers)."""
    words = ["cat", "dog", "sun", "car", "tree", "boat", "fish", "bird"][:count]
    records = {
        "t2i": [{"messages": [{"role": "user", "content": f"draw {w}"},
                              {"role": "assistant", "content": "<|image|>"}], "images": [f"{w}.png"]} for w in words],
        "tts": [{"messages": [{"role": "user", "content": f"say {w}"},
                              {"role": "assistant", "content": "<|audio|>"}], "audios": [f"{w}.wav"]} for w in words],
        "vqa": [{"messages": [{"role": "user", "content": "what?\n<|image|>"},
                              {"role": "assistant", "content": w}], "images": [f"{w}.png"]} for w in words],
    }
    (root / "raw").mkdir(parents=True)
    for w in words:
        (root / "raw" / f"{w}.png").write_bytes(b"")
        (root / "raw" / f"{w}.wav").write_bytes(b"")
    for name, recs in records.items():
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
        prepare.prepare_source([jsonl], root / name, LAYOUT, TOKENIZERS, prefix=str(root / "raw"),
                               image_sizes=SIZES, progress=False)
    return records


def turn(role, body, supervised):
    """Expected ids/targets of one ChatML turn, written out by hand from the reference's ChatML."""
    head = [LAYOUT.im_start, *ENC(role), *ENC("\n")]
    end = [LAYOUT.im_end, *ENC("\n")]
    ids = head + body + end
    return ids, [-100] * len(head) + (body + end if supervised else [-100] * (len(body) + len(end)))


def image(name, size):
    return [LAYOUT.begin_of_image, *LAYOUT.image_ids(fake_image([name], size)[0]), LAYOUT.end_of_image]


def user_audio(frames):
    return [LAYOUT.begin_of_audio] + [LAYOUT.context_of_audio] * (frames + 4) + [LAYOUT.end_of_audio]


def speech(name):
    return [LAYOUT.begin_of_audio, *LAYOUT.audio_ids(fake_codes([name])[0]), LAYOUT.end_of_audio]


EXPECTED = {
    "asr": [turn("user", ENC("Convert the speech to text.\n") + user_audio(3), False),
            turn("assistant", ENC("hello world"), True)],
    "tts": [turn("user", ENC("Convert the text to speech.\nhi"), False), turn("assistant", speech("a.wav"), True)],
    "t2i": [turn("user", ENC(LAYOUTS["t2i"]["messages"][0]["content"]), False),
            turn("assistant", image("cat.png", 32), True)],
    "vqa": [turn("user", ENC("What is it?\n") + image("dog.png", 64), False), turn("assistant", ENC("a dog"), True)],
    "s2i": [turn("system", ENC("Please generate an image based on the input audio."), False),
            turn("user", user_audio(2), False), turn("assistant", image("x.png", 32), True)],
    "svqa": [turn("system", ENC("Please response the input audio based on the given image."), False),
             turn("user", user_audio(4) + ENC("\n") + image("car.png", 64), False),
             turn("assistant", ENC("a red car\n") + speech("b.wav"), True)],
}


def tokenize(record: dict) -> dict:
    rec = data.parse_record(json.dumps(record), "test")
    requests = data.media_requests(rec, SIZES)
    media = {}
    for r in requests:
        media[r] = TOKENIZERS.run(r.kind, r.size, [r.path])[0]
    return data.ChatTemplate(TEXT, LAYOUT).tokenize(rec, media, SIZES)


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_readme_layouts_tokenize_to_the_supervised_spans(task):
    sample = tokenize(LAYOUTS[task])
    ids = [i for turn_ids, _ in EXPECTED[task] for i in turn_ids]
    targets = [t for _, turn_targets in EXPECTED[task] for t in turn_targets]
    np.testing.assert_array_equal(sample["input_ids"], ids)
    np.testing.assert_array_equal(sample["targets"], targets)
    frames = {"asr": [3], "s2i": [2], "svqa": [4]}.get(task)
    if frames is None:
        assert "audio_starts" not in sample
        return
    np.testing.assert_array_equal(sample["audio_lengths"], frames)
    for start, n in zip(sample["audio_starts"], frames):  # each span: BOA, T + 4 context slots, EOA
        assert sample["input_ids"][start - 1] == LAYOUT.begin_of_audio
        assert (sample["input_ids"][start:start + n + 4] == LAYOUT.context_of_audio).all()
        assert sample["input_ids"][start + n + 4] == LAYOUT.end_of_audio
    assert sample["audio_frames"].shape == (sum(frames), data.FEATURE_DIM)


def test_human_and_gpt_roles_follow_the_reference():
    """'human'/'gpt' template as user/assistant, but images are 512-class only for the literal role 'user'."""
    record = {"messages": [{"role": "human", "content": "<|image|>"}, {"role": "gpt", "content": "ok"}],
              "images": ["a.png"]}
    sample = tokenize(record)
    ids = turn("user", image("a.png", 32), False)[0] + turn("assistant", ENC("ok"), True)[0]
    np.testing.assert_array_equal(sample["input_ids"], ids)


def test_corruption_matches_the_reference_draw_for_draw():
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    samples = [tokenize(LAYOUTS[t]) for t in sorted(LAYOUTS)]
    with_eos = dict(samples[0])  # a sample that already holds <|endoftext|> gets no tail
    with_eos["input_ids"] = np.concatenate([with_eos["input_ids"], [LAYOUT.eos]]).astype(np.int32)
    with_eos["targets"] = np.concatenate([with_eos["targets"], [LAYOUT.eos]]).astype(np.int32)
    samples.append(with_eos)
    for seed in range(40):
        sample = samples[seed % len(samples)]
        ids, targets = sample["input_ids"].tolist(), sample["targets"].tolist()
        random.seed(seed)
        torch.manual_seed(seed)
        want_ids, want_labels = ref.corrupt(ids, targets, eos=LAYOUT.eos, mask=LAYOUT.mask)
        random.seed(seed)  # the same draws, taken in the reference's order, fed to our corruption
        torch.manual_seed(seed)
        tail = 0 if LAYOUT.eos in ids else random.randint(1, 16)
        torch.rand(1)
        eligible = np.flatnonzero(np.array(targets + [LAYOUT.eos] * tail) != -100)
        n = eligible[-1] - eligible[0] + 1
        t, r = torch.rand(n).numpy(), torch.rand(n).numpy()
        got_ids, got_labels, _ = corruption.apply(sample["input_ids"], sample["targets"], tail, t, r)
        assert got_ids.tolist() == want_ids and got_labels.tolist() == want_labels


def test_mask_rates_and_tail_lengths():
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    body = np.arange(200, dtype=np.int32) % LAYOUT.num_text
    sample = {"input_ids": body, "targets": np.concatenate([np.full(50, -100), body[50:]]).astype(np.int32)}
    rng = np.random.default_rng(0)
    normal = tail_masked = tail_total = 0
    tails = []
    for _ in range(400):
        out = corruption(sample, rng)
        tail = len(out["input_ids"]) - 200
        tails.append(tail)
        assert (out["input_ids"][:50] == body[:50]).all() and (out["labels"][:50] == -100).all()
        masked = out["input_ids"] == LAYOUT.mask
        np.testing.assert_array_equal(out["labels"] != -100, masked)  # exactly the masked tokens keep a label
        normal += masked[50:200].sum()
        tail_masked += masked[200:].sum()
        tail_total += tail
    for got, n, p in ((normal, 400 * 150, 0.5005), (tail_masked, tail_total, 0.3003)):
        assert abs(got / n - p) < 5 * np.sqrt(p * (1 - p) / n), (got / n, p)
    assert min(tails) == 1 and max(tails) == 16 and abs(np.mean(tails) - 8.5) < 0.5


def test_per_sample_noise_masks_every_level_up_to_all():
    """noise="per_sample": one masking level per sample, so fully masked answers occur; the reference's per-token
    draw practically never masks a 150-token answer whole."""
    body = np.arange(200, dtype=np.int32) % LAYOUT.num_text
    sample = {"input_ids": body, "targets": np.concatenate([np.full(50, -100), body[50:]]).astype(np.int32)}
    rng = np.random.default_rng(1)
    fractions = {}
    for noise in ("per_token", "per_sample"):
        corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos, noise=noise)
        fractions[noise] = np.array([(corruption(sample, rng)["input_ids"][50:200] == LAYOUT.mask).mean()
                                     for _ in range(300)])
        out = corruption(sample, rng)
        probs = out["mask_prob"][50:200]
        assert (len(set(probs.tolist())) == 1) == (noise == "per_sample")
    assert fractions["per_token"].max() < 0.7 and fractions["per_token"].min() > 0.3
    assert fractions["per_sample"].max() > 0.95 and fractions["per_sample"].min() < 0.05
    assert abs(fractions["per_sample"].mean() - 0.5) < 0.06
    with pytest.raises(ValueError, match="noise must be"):
        data.Corruption(LAYOUT.mask, LAYOUT.eos, noise="per_word")


def corrupted_stream(count, seed=0):
    rng = np.random.default_rng(seed)
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    out = []
    for k in range(count):
        n = int(rng.integers(5, 40)) if k != 7 else 70  # sample 7 exceeds the pack
        ids = rng.integers(0, LAYOUT.num_text, n).astype(np.int32)
        targets = np.where(np.arange(n) < n // 2, -100, ids).astype(np.int32)
        out.append(corruption({"input_ids": ids, "targets": targets}, rng))
    return out


def test_packing_matches_the_reference_buffer():
    samples = corrupted_stream(30)
    spec = data.PackSpec(64, LAYOUT.pad)
    it = data.PackIterator(grain_list([(0, s) for s in samples]), spec, [0])
    packer = ref.Packer(64, LAYOUT.pad)
    want = [p for s in samples if (p := packer.add(s["input_ids"].tolist(), s["labels"].tolist()))]
    got = list(it)
    assert len(got) == len(want) > 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["input_ids"], w["input_ids"][0])
        np.testing.assert_array_equal(g["labels"], w["labels"][0])
        np.testing.assert_array_equal(g["positions"], w["position_ids"][0])
        np.testing.assert_array_equal(g["valid"], w["attention_mask"][0] == 1)
    assert it.dropped["too_long"] == packer.dropped == 1
    seg = np.cumsum(got[0]["positions"] == 0) - 1  # the pad tail joins the last segment
    n = got[0]["valid"].sum()
    assert seg[n:].min() == seg[n - 1] == seg.max()


def grain_list(items):
    import grain

    return grain.MapDataset.source(items)


def test_packs_are_single_task_and_carry_speech_features():
    samples = [tokenize(LAYOUTS[t]) for t in ("asr", "t2i", "asr", "s2i", "t2i")]
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    rng = np.random.default_rng(1)
    items = [(0 if "audio_starts" in s else 1, corruption(s, rng)) for s in samples]
    spec = data.PackSpec(256, LAYOUT.pad, max_audios=4, max_audio_frames=8)
    it = data.PackIterator(grain_list(items + items), spec, [3, 5])
    pack = next(it)  # source 0's buffer (asr, asr, s2i) overflows first
    assert pack["task"] == 3
    starts = [s + off for s, off in zip([items[0][1]["audio_starts"][0], items[2][1]["audio_starts"][0],
                                         items[3][1]["audio_starts"][0]],
                                        [0, len(items[0][1]["input_ids"]),
                                         len(items[0][1]["input_ids"]) + len(items[2][1]["input_ids"])])]
    for k, (start, frames) in enumerate(zip(starts, [3, 3, 2])):
        assert (pack["audio_index"][start:start + frames + 4] == k).all()
        np.testing.assert_array_equal(pack["audio_row"][start:start + frames + 4], np.arange(frames + 4))
        np.testing.assert_array_equal(pack["audio_frames"][start + 4:start + 4 + frames, 0],
                                      np.arange(frames, dtype=np.float32) + np.float32(frames / 100))
    assert (pack["audio_index"] >= 0).sum() == 3 + 4 + 3 + 4 + 2 + 4


def make_sources(tmp_path, sizes, prefix="src"):
    sources = []
    for k, n in enumerate(sizes):
        folder = tmp_path / f"{prefix}{k}"
        jsonl = tmp_path / f"{prefix}{k}.jsonl"
        jsonl.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"s{k} q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
            for i in range(n)))
        prepare.prepare_source([jsonl], folder, LAYOUT, TOKENIZERS, shard_size=7, progress=False)
        sources.append(folder)
    return sources


def test_mixture_ratios_num_and_epochs(tmp_path):
    folders = make_sources(tmp_path, [10, 6, 8])
    sources = [data.Source("a", data.open_source(folders[0]), ratio=0.5),
               data.Source("b", data.open_source(folders[1]), ratio=2.0),
               data.Source("c", data.open_source(folders[2]), num=3)]
    assert [s.epoch_size for s in sources] == [5, 12, 3]  # floor(ratio * n), capped at num
    mixed = data.mixture(sources, seed=5)
    epoch = [mixed[i] for i in range(5 + 12 + 3)]
    counts = np.bincount([k for k, _ in epoch], minlength=3)
    np.testing.assert_array_equal(counts, [5, 12, 3])
    texts = lambda items, k: [bytes(s["input_ids"].tolist()) for j, s in items if j == k]  # noqa: E731
    assert len(set(texts(epoch, 0))) == 5  # the first half of a shuffled source
    b = texts(epoch, 1)
    assert len(set(b)) == 6 and all(b.count(x) == 2 for x in b)  # ratio 2: every item twice
    second = [mixed[i] for i in range(20, 40)]
    assert [bytes(s["input_ids"].tolist()) for _, s in second] != [bytes(s["input_ids"].tolist()) for _, s in epoch]
    assert sorted(bytes(s["input_ids"].tolist()) for _, s in second) == sorted(
        bytes(s["input_ids"].tolist()) for _, s in epoch)  # a reshuffle of the same epoch


def test_pipeline_determinism_resume_and_process_split(tmp_path):
    folders = make_sources(tmp_path, [12, 9])
    sources = [data.Source(f"s{k}", data.open_source(f), task=k) for k, f in enumerate(folders)]
    spec = data.PackSpec(48, LAYOUT.pad)
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    make = lambda i=0, n=1: data.pack_iterator(sources, spec, corruption, seed=3, process_index=i,  # noqa: E731
                                               process_count=n)
    a, b = make(), make()
    first = [next(a) for _ in range(6)]
    for x, y in zip(first, [next(b) for _ in range(6)]):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    state = json.loads(json.dumps(a.get_state()))  # through JSON, as the checkpoint stores it
    assert state["buffers"]
    expected = [next(a) for _ in range(8)]
    c = make()
    c.set_state(state)
    for x, y in zip(expected, [next(c) for _ in range(8)]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other = data.pack_iterator(sources, spec, corruption, seed=4)
    assert not np.array_equal(next(other)["input_ids"], first[0]["input_ids"])
    whole, p0, p1 = make(), make(0, 2), make(1, 2)  # two processes read alternate elements of one stream
    for i in range(6):
        for part, j in ((p0, 2 * i), (p1, 2 * i + 1)):
            np.testing.assert_array_equal(part.samples[i][1]["input_ids"], whole.samples[j][1]["input_ids"])


def test_prepare_skips_bad_records_and_resumes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ok.png").write_bytes(b"png")
    lines = [json.dumps(LAYOUTS["t2i"] | {"images": ["ok.png"]}),
             "{not json",
             json.dumps(LAYOUTS["t2i"] | {"images": ["missing.png"]}),
             json.dumps(LAYOUTS["t2i"] | {"images": ["ok.png", "ok.png"]}),  # 1 tag, 2 files
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps(LAYOUTS["vqa"] | {"images": ["ok.png"]})]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    calls = []
    counting = prepare.Tokenizers(TEXT, lambda p, s: calls.append(len(p)) or fake_image(p, s))
    out = tmp_path / "out"
    totals = prepare.prepare_source([jsonl], out, LAYOUT, counting, prefix=str(raw), shard_size=2,
                                    image_sizes=SIZES, progress=False)
    assert totals["samples"] == 2 and totals["records"] == 6
    assert totals["skipped"] == {"bad_record": 3, "missing_file": 1, "tokenizer_error": 0}
    errors = json.loads((out / "shard-00001.json").read_text())["errors"]
    assert any("not found" in e and "missing.png" in e for e in errors)
    assert len(data.open_source(out)) == 2
    errors = []
    assert [n for n, _ in data.read_jsonl(jsonl, str(raw), on_error=errors.append)] == [1, 3, 6]
    assert len(errors) == 3 and "t.jsonl:2" in str(errors[0])
    with pytest.raises(data.DataError, match=r"t\.jsonl:2"):
        prepare.prepare_source([jsonl], tmp_path / "strict", LAYOUT, counting, prefix=str(raw), shard_size=2,
                               image_sizes=SIZES, strict=True, progress=False)
    (out / "shard-00002.array_record").unlink()  # as if killed before the last shard
    calls.clear()
    again = prepare.prepare_source([jsonl], out, LAYOUT, counting, prefix=str(raw), shard_size=2,
                                   image_sizes=SIZES, progress=False)
    assert again == totals and calls == [1]  # only the missing shard was tokenized again
    with pytest.raises(data.DataError, match="prepared with"):
        prepare.prepare_source([jsonl], out, LAYOUT, counting, shard_size=3, progress=False)


def test_tokenizer_failures_are_isolated(tmp_path):
    (tmp_path / "good.png").write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"")

    def flaky(paths, size):
        if any("bad" in p for p in paths):
            raise ValueError("cannot decode")
        return fake_image(paths, size)

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(LAYOUTS["t2i"] | {"images": [name]}) + "\n" for name in
                             ("good.png", "bad.png", "good.png")))
    totals = prepare.prepare_source([jsonl], tmp_path / "out", LAYOUT, prepare.Tokenizers(TEXT, flaky),
                                    prefix=str(tmp_path), image_sizes=SIZES, progress=False)
    assert totals["samples"] == 2 and totals["skipped"]["tokenizer_error"] == 1
    with pytest.raises(data.DataError, match="no tokenizer"):
        prepare.prepare_source([jsonl], tmp_path / "none", LAYOUT, prepare.Tokenizers(TEXT),
                               prefix=str(tmp_path), progress=False)


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected a JSON object"),
    ('{"messages": []}', "non-empty"),
    ('{"messages": [{"role": "user"}]}', "role, content"),
    ('{"messages": [{"role": "user", "content": "<|audio|>"}]}', "1 <|audio|> placeholder"),
    ('{"messages": [{"role": "user", "content": "x"}], "images": "a.png"}', "list of paths"),
])
def test_bad_records_name_the_problem(line, message):
    with pytest.raises(data.DataError, match=message) as e:
        data.parse_record(line, "f.jsonl:9")
    assert "f.jsonl:9" in str(e.value)


def test_prepare_redoes_shards_whose_inputs_changed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(b"a")
    jsonl = tmp_path / "t.jsonl"
    lines = [json.dumps(LAYOUTS["t2i"] | {"images": ["a.png"]}), json.dumps(LAYOUTS["t2i"] | {"images": ["b.png"]}),
             json.dumps(LAYOUTS["vqa"] | {"images": ["a.png"]})]
    jsonl.write_text("\n".join(lines) + "\n")
    calls = []
    counting = prepare.Tokenizers(TEXT, lambda p, s: calls.append(sorted(p)) or fake_image(p, s))
    run = lambda: prepare.prepare_source([jsonl], tmp_path / "out", LAYOUT, counting, prefix=str(raw),  # noqa: E731
                                         shard_size=1, image_sizes=SIZES, progress=False)
    assert run()["skipped"]["missing_file"] == 1 and len(calls) == 2
    calls.clear()
    assert run()["samples"] == 2 and calls == []  # nothing changed: nothing redone
    (raw / "b.png").write_bytes(b"b")  # the missing image appears
    totals = run()
    assert totals["samples"] == 3 and totals["skipped"]["missing_file"] == 0 and calls == [[str(raw / "b.png")]]
    calls.clear()
    os.utime(raw / "a.png", ns=(1, 1))  # a media file changes: both records naming it are redone
    assert run()["samples"] == 3 and sorted(calls) == [[str(raw / "a.png")], [str(raw / "a.png")]]
    calls.clear()
    jsonl.write_bytes(jsonl.read_bytes() + b'{"messages": "\xff"}\n')  # a record appended, not UTF-8
    totals = run()
    assert totals["records"] == 4 and totals["skipped"]["bad_record"] == 1 and calls == []
    assert "t.jsonl:4: not UTF-8 text" in json.loads((tmp_path / "out" / "shard-00003.json").read_text())["errors"][0]
    jsonl.write_text(lines[0] + "\n")  # records removed: their shards go
    assert run()["records"] == 1 and len(list((tmp_path / "out").glob("shard-*.array_record"))) == 1
    assert len(data.open_source(tmp_path / "out")) == 1
    calls.clear()
    other = prepare.Tokenizers(TEXT, counting.image, identity="another image tokenizer")  # tokenizers change
    prepare.prepare_source([jsonl], tmp_path / "out", LAYOUT, other, prefix=str(raw), shard_size=1,
                           image_sizes=SIZES, progress=False)
    assert calls == [[str(raw / "a.png")]]


def test_empty_source_and_damaged_shards_are_errors(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("{not json\n")
    with pytest.raises(data.DataError, match=r"0 samples from 1 record.*bad_record.*t\.jsonl:1"):
        prepare.prepare_source([jsonl], tmp_path / "out", LAYOUT, TOKENIZERS, progress=False)
    with pytest.raises(data.DataError, match="holds 0 samples"):
        data.open_source(tmp_path / "out")
    folder = make_sources(tmp_path, [3])[0]
    with pytest.raises(data.DataError, match="source a yields 0 samples"):
        data.Source("a", data.open_source(folder), ratio=0.1)
    shard = folder / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(data.DataError, match=f"{shard}: not a readable shard"):
        data.open_source(folder)


def test_a_source_whose_samples_never_fit_is_an_error(tmp_path):
    folders = []
    for name, answer in (("short", "a"), ("long", "a much longer answer")):
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                          {"role": "assistant", "content": answer}]}) + "\n"
                                 for i in range(3)))
        prepare.prepare_source([jsonl], tmp_path / name, LAYOUT, TOKENIZERS, progress=False)
        folders.append(tmp_path / name)
    sources = [data.Source("short", data.open_source(folders[0])), data.Source("long", data.open_source(folders[1]))]
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos, tail_max=1)  # one eos appended: lengths known exactly
    fits = len(sources[0].samples[0]["input_ids"]) + 1  # the short samples fit, the long ones do not
    it = data.pack_iterator(sources, data.PackSpec(fits, LAYOUT.pad), corruption, seed=0)
    with pytest.raises(data.DataError, match=r"source long: none of its samples fits a pack \(3 read, the last "
                                             r"too_long: data.seq_len"):
        for _ in range(100):
            next(it)
    fits = len(sources[1].samples[0]["input_ids"]) + 1
    it = data.pack_iterator(sources, data.PackSpec(fits, LAYOUT.pad), corruption, seed=0)
    for _ in range(20):
        next(it)
    assert it.dropped["too_long"] == 0
