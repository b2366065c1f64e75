"""Evaluation: compute-wer's tokenisation and alignment, the ASR/TTS text clean-up, MME reading and scoring, and the
runners and CLI end to end with deterministic stand-in generators on tests/data. Expected values are counted
by hand in the comments."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from omnidiff_jax import cli
from omnidiff_jax import evaluation as ev
from omnidiff_jax.audio_io import load_audio
from omnidiff_jax.vocab import OMNI_DIFFUSION as LAYOUT


# ============================================================================================= compute-wer
@pytest.mark.parametrize("line, tokens", [
    ("utt7 hello world\n", ["utt7", "hello", "world"]),
    ("u1 我爱你 ok", ["u1", "我", "爱", "你", "ok"]),                      # CJK: one token per character
    ("u2 你好，世界！", ["u2", "你", "好", "世", "界"]),                    # CJK punctuation dropped
    ("u3 hello, world! ,again", ["u3", "hello,", "world!", "again"]),      # ASCII punctuation kept inside a word,
                                                                           # dropped where a token starts
    ("u4 <unk><noise>word", ["u4", "<unk>", "<noise>", "word"]),           # a tag ends at its ">"
    ("u5 café au\u3000lait", ["u5", "caf", "é", "au", "lait"]),            # a non-ASCII letter splits a run
])
def test_characterize(line, tokens):
    assert ev.characterize(line) == tokens


def test_line_normalisation():
    assert ev.parse_line("x1 Hello <unk> wor<noise>ld <|mask|> ok") == ("x1", ["HELLO", "WORLD", "OK"])
    assert ev.parse_line("x2") == ("x2", [])
    assert ev.parse_line(" \n") is None
    assert ev.strip_tags("AB<C") == "AB"  # an unclosed tag runs to the end of the token


@pytest.mark.parametrize("ref, hyp, sub, dele, ins", [
    ("a b c d", "a x c d e", 1, 0, 1),
    ("a b c", "a c", 0, 1, 0),
    ("a b c", "x y z", 3, 0, 0),
    ("", "a b", 0, 0, 2),
    ("a b", "", 0, 2, 0),
    ("a b", "b a", 0, 1, 1),  # cost 2 either way; the reference's backtrace prefers D+I to S+S
    ("the cat sat on the mat", "the cat sat on mat", 0, 1, 0),
])
def test_align_counts(ref, hyp, sub, dele, ins):
    counts = ev.align(ref.split(), hyp.split())
    assert (counts.words, counts.substitutions, counts.deletions, counts.insertions) == (
        len(ref.split()), sub, dele, ins)


def test_corpus_wer_over_utterances_in_both():
    refs = ["1 the cat sat", "2 on the mat", "3 never transcribed", "4 我 爱 你"]
    hyps = ["2 on a mat", "1 the cat sat down", "4 我爱他", "9 stray line"]
    report = ev.score_lines(refs, hyps)
    # 1: I=1 (N=3); 2: S=1 (N=3); 4: 你 -> 他 S=1 (N=3); 3 has no hypothesis, 9 no reference
    assert list(report.utterances) == ["1", "2", "4"]
    assert report.total == ev.ErrorCounts(9, 2, 0, 1)
    assert report.wer == pytest.approx(3 / 9)
    assert report.total.summary() == "WER 33.33 % N=9 C=7 S=2 D=0 I=1"


def test_total_errors_match_jiwer():
    jiwer = pytest.importorskip("jiwer")
    pairs = [("he hoped there would be stew for dinner", "he hoped there'd be stew for dinner"),
             ("turnips and carrots and bruised potatoes", "turnips carrots and and bruised potato"),
             ("stuff it into you his belly counselled him", "stuff it in to you his belly council him"),
             ("after early nightfall", "after the early night fall the"),
             ("a b c d e f", "f e d c b a")]
    report = ev.score_lines([f"{i} {r}" for i, (r, _) in enumerate(pairs)],
                            [f"{i} {h}" for i, (_, h) in enumerate(pairs)])
    refs = [" ".join(ev.normalize_tokens(r.split())) for r, _ in pairs]
    hyps = [" ".join(ev.normalize_tokens(h.split())) for _, h in pairs]
    for counts, r, h in zip(report.utterances.values(), refs, hyps):
        out = jiwer.process_words(r, h)
        assert counts.errors == out.substitutions + out.deletions + out.insertions
    assert report.wer == pytest.approx(jiwer.wer(refs, hyps))


# ============================================================================================= text clean-up
def test_asr_hypothesis():
    audio, image = LAYOUT.audio_code_start, LAYOUT.image_code_start
    ids = [10, 20, audio + 3, 30, image + 5, LAYOUT.eos, LAYOUT.im_end, 40, LAYOUT.im_end]
    assert ev.asr_text_ids(ids, LAYOUT) == [10, 20, 30, LAYOUT.eos]  # codes dropped, cut at the first <|im_end|>
    assert ev.asr_text_ids([7, 8], LAYOUT) == [7, 8]
    assert ev.clean_asr_text("a well-known dog<|im_end|><|endoftext|><|endoftext|>") == "a wellknown dog"
    assert ev.clean_mme_pred("Yes\n<|im_end|><|endoftext|>") == "Yes"


@pytest.mark.parametrize("text, expected", [
    ("Chapter 21.", "chapter twenty one"),
    ("Mr. Smith's 3.14 & 1,205 men!", "mr smith s three point one four and one thousand two hundred five men"),
    ("the 1st, 22nd and 40th", "the first twenty second and fortieth"),
    ("15% of 1000000", "fifteen percent of one million"),
    ("  Well -- \"yes,\" he said;  ", "well yes he said"),
])
def test_normalize_english(text, expected):
    assert ev.normalize_english(text) == expected


# ============================================================================================= MME
@pytest.mark.parametrize("pred, label", [
    ("Yes", "yes"), ("no.", "no"), ("No, it is not", "no"), ("yes it", "yes"), ("none", "no"),
    ("I think yes", "other"), ("maybe", "other"), ("", "other"), (" yes", "yes"), ("not sure", "no"),
])
def test_mme_label(pred, label):
    assert ev.mme_label(pred) == label


@pytest.fixture
def mme_folder(tmp_path, assets):
    """Release layout: existence (questions_answer_pairs + images/) and code_reasoning (txt beside image)."""
    root = tmp_path / "MME"
    (root / "existence" / "questions_answer_pairs").mkdir(parents=True)
    (root / "existence" / "images").mkdir()
    shutil.copy(assets / "vqa_0.png", root / "existence" / "images" / "img1.png")
    shutil.copy(assets / "svqa_0.jpg", root / "existence" / "images" / "img2.jpg")
    (root / "existence" / "questions_answer_pairs" / "img1.txt").write_text(
        "Is there a cat in this image?\tYes\nIs there a dog in this image?\tNo\n")
    (root / "existence" / "questions_answer_pairs" / "img2.txt").write_text(
        "Is it red?\tYes\r\nIs it blue?\tNo\r\n")
    (root / "code_reasoning").mkdir()
    shutil.copy(assets / "vqa_0.png", root / "code_reasoning" / "c1.png")
    (root / "code_reasoning" / "c1.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    return root


PREDS = {"Is there a cat in this image?": "Yes<|im_end|>",   # gt Yes: right
         "Is there a dog in this image?": "No.\n",           # gt No: right
         "Is it red?": "yes, it is",                         # gt Yes: right
         "Is it blue?": "Yes",                               # gt No: wrong
         "Does it print 3?": "I think so",                   # gt Yes: "other", wrong
         "Does it print 4?": "No<|endoftext|>"}              # gt No: right


def test_run_mme_eval_scores_by_hand(mme_folder, tmp_path):
    seen = []

    def answer(requests):  # the stand-in generator: checks it gets real images and the reference's settings
        seen.append(len(requests))
        for r in requests:
            assert r["task"] == "vqa" and r["gen_length"] == 8 and r["steps"] == 8 and r["alg"] == "entropy"
            with open(r["image"], "rb") as f:
                assert f.read(4) in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\xff\xd8\xff\xdb")
        return [PREDS[r["text"]] for r in requests]

    out = tmp_path / "out"
    scores = ev.run_mme_eval(mme_folder, answer, out, batch_size=4)
    assert seen == [4, 2]
    # existence: 3/4 right, one image with both right out of 2 -> 75 + 50; code_reasoning: 1/2, 0/1 -> 50 + 0
    assert scores.tasks["existence"] == ev.MMETaskScore(4, 3, 2, 1, 0)
    assert scores.tasks["code_reasoning"] == ev.MMETaskScore(2, 1, 1, 0, 1)
    assert scores.tasks["existence"].score == pytest.approx(125.0)
    assert scores.groups == pytest.approx({"Perception": 125.0, "Cognition": 50.0})
    assert (out / "existence.txt").read_text().splitlines() == [
        "img1.png\tIs there a cat in this image?\tYes\tYes", "img1.png\tIs there a dog in this image?\tNo\tNo.",
        "img2.jpg\tIs it red?\tYes\tyes, it is", "img2.jpg\tIs it blue?\tNo\tYes"]
    assert json.loads((out / "mme_scores.json").read_text())["groups"] == {"Perception": 125.0, "Cognition": 50.0}
    with pytest.raises(FileExistsError):
        ev.run_mme_eval(mme_folder, answer, out)
    # MME's own results format reads back to the same scores
    assert ev.score_mme(ev.read_mme_results(out)) == scores


def test_mme_eval_tool_layout_and_bad_input(tmp_path, assets):
    root = tmp_path / "mme"
    (root / "eval_tool" / "Your_Results").mkdir(parents=True)
    (root / "images" / "count").mkdir(parents=True)
    shutil.copy(assets / "vqa_0.png", root / "images" / "count" / "a.png")
    lists = root / "eval_tool" / "Your_Results" / "count.txt"
    lists.write_text("a.png\tAre there two cats?\tYes\na.png\tAre there three cats?\tNo\n")
    image = str(root / "images" / "count" / "a.png")
    assert [(q.task, q.image, q.answer) for q in ev.read_mme(root)] == [("count", image, "Yes"), ("count", image, "No")]

    lists.write_text("a.png\tAre there two cats?\tMaybe\n")
    with pytest.raises(ev.EvalError, match=r"count.txt:1: the ground truth must be Yes or No"):
        ev.read_mme(root)
    lists.write_text("b.png\tAre there two cats?\tYes\n")
    with pytest.raises(FileNotFoundError, match="b.png does not exist"):
        ev.read_mme(root)
    with pytest.raises(ev.EvalError, match="3 questions"):
        ev.score_mme([ev.MMEAnswer("t", "a", "q", "Yes", "yes")] * 3)
    with pytest.raises(ev.EvalError, match="must be adjacent"):
        ev.score_mme([ev.MMEAnswer("t", "a", "q", "Yes", "yes"), ev.MMEAnswer("t", "b", "q", "No", "no")])


# ============================================================================================= ASR / TTS runners
@pytest.fixture
def asr_jsonl(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"},
                           {"role": "assistant", "content": ref}], "audios": [wav]}
             for wav, ref in (("asr_0.wav", "the cat sat on a mat"), ("s2i_0.wav", "a well known dog barked"),
                              ("svqa_0.wav", "hello world"))]
    path = tmp_path / "test.clean.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


RAW_ASR = {"asr_0.wav": "the cat sat on the mat<|im_end|>", "s2i_0.wav": "a well-known dog", "svqa_0.wav": ""}


def test_run_asr_eval_on_assets(asr_jsonl, assets, tmp_path):
    samples = ev.read_asr_jsonl(asr_jsonl, prefix=str(assets))
    assert samples[1] == ev.AsrSample(str(assets / "s2i_0.wav"), "a well known dog barked")
    batches = []

    def transcribe(requests):
        batches.append(len(requests))
        for r in requests:
            assert r["task"] == "asr" and r["adaptive"] == "asr" and r["text"] is None
            assert load_audio(r["audio"])[0].size > 16000 * 0.9  # the real asset, readable at 16 kHz
        return [RAW_ASR[r["audio"].rsplit("/", 1)[-1]] for r in requests]

    out = tmp_path / "asr"
    report = ev.run_asr_eval(samples, transcribe, out, name="test.clean", batch_size=2)
    assert batches == [2, 1]
    # 0: a -> the, S=1 of 6; 1: A WELLKNOWN DOG vs A WELL KNOWN DOG BARKED, S=1 D=2 of 5; 2: D=2 of 2
    assert report.total == ev.ErrorCounts(13, 2, 4, 0)
    assert report.wer == pytest.approx(6 / 13)
    assert (out / "test.clean_hyp.txt").read_text() == "0 the cat sat on the mat\n1 a wellknown dog\n2 \n"
    assert (out / "test.clean_ref.txt").read_text().splitlines()[1] == "1 a well known dog barked"
    assert json.loads((out / "test.clean_wer.json").read_text())["deletions"] == 4
    assert ev.score_files(out / "test.clean_ref.txt", out / "test.clean_hyp.txt").total == report.total
    with pytest.raises(FileExistsError, match="test.clean_hyp.txt"):
        ev.run_asr_eval(samples, transcribe, out, name="test.clean")
    assert ev.run_asr_eval(samples, transcribe, out, name="test.clean", overwrite=True).total == report.total


def test_run_tts_eval_skips_samples_without_speech(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "Convert the text to speech.\n" + text},
                           {"role": "assistant", "content": "<|audio|>"}], "audios": [f"/data/{name}.wav"]}
             for name, text in (("a", "Chapter 21. "), ("b", "I paid 5 dollars."), ("c", "Silence"))]
    path = tmp_path / "tts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples = ev.read_tts_jsonl(path)
    assert samples[0] == ev.TtsSample("Chapter 21.", "a")

    def synthesize(requests):
        assert all(r["task"] == "tts" and r["alg"] == "entropy-penalty" and r["repeat_penalty"] == 1.2
                   for r in requests)
        tone = np.sin(np.arange(22050) * 0.05).astype(np.float32) * 0.3
        return [None if r["text"] == "Silence" else (tone, 22050) for r in requests]

    heard = {"a.wav": " Chapter twenty-one ", "b.wav": "I paid five dollar."}

    def transcribe(paths):
        assert all(sf.info(p).samplerate == 22050 and sf.info(p).frames == 22050 for p in paths)
        return [heard[p.rsplit("/", 1)[-1]] for p in paths]

    out = tmp_path / "tts"
    report = ev.run_tts_eval(samples, synthesize, transcribe, out, name="tts")
    assert report.skipped == ("c",) and not (out / "audio" / "c.wav").exists()
    # a: "chapter twenty one" both sides; b: DOLLARS -> DOLLAR, S=1 of 4
    assert report.total == ev.ErrorCounts(7, 1, 0, 0)
    assert (out / "tts_hyp.txt").read_text() == "0 chapter twenty one\n1 i paid five dollar\n"


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: an ASR record needs an audio"):
        ev.read_asr_jsonl(path)
    with pytest.raises(FileNotFoundError):
        ev.read_asr_jsonl(tmp_path / "missing.jsonl")


# ============================================================================================= CLI
class FakePipeline:
    """Stands in for omnidiff_jax.pipeline.Pipeline (the lead's), with the agreed interface."""

    loaded = []

    @classmethod
    def load(cls, model_path, **components):
        cls.loaded.append((model_path, components))
        return cls()

    def run(self, requests):
        return [{"text": RAW_ASR[r["audio"].rsplit("/", 1)[-1]], "audio_codes": [], "image_codes": [], "wav": None,
                 "sample_rate": None, "warnings": []} for r in requests]


def test_cli(asr_jsonl, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "omnidiff_jax.pipeline", types.SimpleNamespace(Pipeline=FakePipeline))
    out = tmp_path / "cli"
    assert cli.main(["eval", "asr", "--model", "ckpt", "--component", "image_tokenizer=magvit", str(asr_jsonl),
                     "--out", str(out), "--prefix", str(assets), "--limit", "2"]) == 0
    assert FakePipeline.loaded == [("ckpt", {"image_tokenizer": "magvit"})]
    assert "WER 36.36 % N=11 C=7 S=2 D=2 I=0 over 2 utterances" in capsys.readouterr().out
    assert cli.main(["eval", "wer", str(out / "test.clean_ref.txt"), str(out / "test.clean_hyp.txt")]) == 0
    assert "Overall -> WER 36.36 % N=11" in capsys.readouterr().out
    assert cli.main(["eval", "asr", "--model", "m", "--component", "oops", str(asr_jsonl), "--out", str(out),
                     "--overwrite"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert cli.main(["eval", "mme", "--model", "m", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such MME folder" in capsys.readouterr().err
