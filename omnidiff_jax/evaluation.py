"""The reference's evaluations (Omni-Diffusion `tools/evaluate_*.py`): ASR and TTS word error rate, MME score.

    ASR   LibriSpeech-format jsonl -> one "asr" request per record (adaptive length). The hypothesis is the
          generated text (ids below the first speech code, up to the first <|im_end|>: `asr_text_ids`) with
          "<|im_end|>", "<|endoftext|>" and "-" removed; the reference is messages[1].content.
    TTS   LibriTTS-format jsonl -> one "tts" request per record (adaptive length, entropy-penalty 1.2). Samples
          that produce no speech codes are skipped. The waveform is transcribed by the caller's ASR (the model's
          own ASR task, or a Whisper checkpoint); hypothesis and reference go through `normalize_english`.
    WER   both write "{i} {text}" lines to {name}_hyp.txt / {name}_ref.txt and score them as
          `compute-wer.py --char=1`: `characterize` a line, its first token is the utterance id, the others are
          upper-cased with <...> tags stripped; Levenshtein alignment with unit costs; WER = (S + D + I) / N summed
          over the utterances present in both files.
    MME   each task's (image, question, Yes/No) list -> one "vqa" request per question (8 tokens, 8 steps); the
          prediction has "<|im_end|>", "<|endoftext|>" and newlines removed, and "img\\tquestion\\tgt\\tpred" lines
          go to {task}.txt (the format of MME's eval_tool). Scoring is MME's published rule: a prediction means
          "yes" if its first four characters (lower-cased) contain "yes", else "no" if they contain "no", else
          "other"; per task, acc = right answers / questions and acc+ = images with both questions right / images;
          score = 100 (acc + acc+); Perception and Cognition totals add their tasks' scores.

The runners take callables from requests to outputs, so they do not depend on how generation is done. A request is
`{"task", "text", "image", "audio", **overrides}`, with overrides named as `omnidiff_jax.tasks.TaskPreset` fields.

Two conscious departures: the TTS normaliser is a small approximation of WeTextProcessing's English normaliser
(see `normalize_english`), and newlines inside a hypothesis become spaces, so that one utterance stays one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from omnidiff_jax.audio_io import write_wav
from omnidiff_jax.files import write_text
from omnidiff_jax.train.data import DataError, read_jsonl
from omnidiff_jax.vocab import TokenLayout

Request = dict

# Settings of the reference's evaluation scripts, as request overrides.
ASR_SETTINGS = {"adaptive": "asr", "alg": "entropy"}
TTS_SETTINGS = {"adaptive": "tts", "alg": "entropy-penalty", "repeat_penalty": 1.2}
MME_SETTINGS = {"gen_length": 8, "steps": 8, "alg": "entropy"}

TTS_INSTRUCTION = "Convert the text to speech.\n"


class EvalError(ValueError):
    """Unusable evaluation data or outputs; the message names the file, line or item at fault."""


def asr_request(audio: str) -> Request:
    """The evaluation's ASR request for one audio file."""
    return {"task": "asr", "text": None, "image": None, "audio": str(audio), **ASR_SETTINGS}


# ============================================================================================= ASR hypothesis
def asr_text_ids(ids: Iterable[int], layout: TokenLayout) -> list[int]:
    """The ids evaluate_asr.py decodes: generated ids below the first speech code, cut at the first <|im_end|>."""
    text = [int(i) for i in ids if int(i) < layout.audio_code_start]
    return text[:text.index(layout.im_end)] if layout.im_end in text else text


def clean_asr_text(text: str) -> str:
    """evaluate_asr.py's hypothesis: the decoded text with "<|im_end|>", "<|endoftext|>" and "-" removed."""
    for piece in ("<|im_end|>", "<|endoftext|>", "-"):
        text = text.replace(piece, "")
    return text


def clean_mme_pred(text: str) -> str:
    """evaluate_imageqa_mme.py's prediction: the decoded text with "<|im_end|>", "<|endoftext|>" and "\\n" removed."""
    for piece in ("<|im_end|>", "<|endoftext|>", "\n"):
        text = text.replace(piece, "")
    return text


# ============================================================================================= compute-wer
_SPACES = " \t\r\n"
_LEADING_PUNCTUATION = frozenset("!,?、。！，；？：「」︰『』《》")  # dropped where a token would start


def characterize(line: str) -> list[str]:
    """compute-wer's `--char=1` split of a line.

    Letters of category Lo (CJK, kana, Hangul) are one token each; any other character starts a token that runs
    over the following ASCII non-space characters (a token starting with "<" ends at its ">"), so English is
    word level with attached punctuation kept. Spaces, unassigned characters and the listed punctuation marks
    are skipped where a token would start.
    """
    tokens = []
    i = 0
    while i < len(line):
        char = line[i]
        category = unicodedata.category(char)
        if char in _LEADING_PUNCTUATION or char in _SPACES or category in ("Zs", "Cn"):
            i += 1
        elif category == "Lo":
            tokens.append(char)
            i += 1
        else:
            stop = ">" if char == "<" else " "
            j = i + 1
            while j < len(line) and ord(line[j]) < 128 and line[j] not in _SPACES and line[j] != stop:
                j += 1
            if j < len(line) and line[j] == ">":  # a <tag> keeps its closing bracket
                j += 1
            tokens.append(line[i:j])
            i = j
    return tokens


def strip_tags(token: str) -> str:
    """Removes every <...> span (an unclosed "<" removes the rest of the token)."""
    return re.sub(r"<[^>]*>?", "", token)


def normalize_tokens(tokens: Iterable[str]) -> list[str]:
    """compute-wer's default normalisation: upper-case, strip <...> tags, drop tokens left empty."""
    return [t for t in (strip_tags(token.upper()) for token in tokens) if t]


def parse_line(line: str) -> tuple[str, list[str]] | None:
    """(utterance id, normalised words) of a "{id} {text}" line, or None for a line with no tokens."""
    tokens = characterize(line)
    return (tokens[0], normalize_tokens(tokens[1:])) if tokens else None


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
    """An alignment's counts: reference words N, substitutions S, deletions D, insertions I."""

    words: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def correct(self) -> int:
        return self.words - self.substitutions - self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """(S + D + I) / N; 0 when there are no reference words (as compute-wer)."""
        return self.errors / self.words if self.words else 0.0

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(self.words + other.words, self.substitutions + other.substitutions,
                           self.deletions + other.deletions, self.insertions + other.insertions)

    def summary(self) -> str:
        """compute-wer's line: "WER 12.50 % N=8 C=7 S=1 D=0 I=0"."""
        return (f"WER {100 * self.wer:.2f} % N={self.words} C={self.correct} S={self.substitutions} "
                f"D={self.deletions} I={self.insertions}")


def align(ref: Sequence[str], hyp: Sequence[str]) -> ErrorCounts:
    """Levenshtein alignment of word lists with unit costs, counted along compute-wer's backtrace.

    Each cell takes a deletion, replaced by an insertion only if that is strictly cheaper, replaced in turn by the
    diagonal (match or substitution) only if that is strictly cheaper still; so among equal-cost alignments the
    counts are the reference's (e.g. "a b" -> "b a" is D=1 I=1, not S=2).
    """
    rows, cols = len(ref) + 1, len(hyp) + 1
    dist = [[0] * cols for _ in range(rows)]
    move = [[""] * cols for _ in range(rows)]
    for i in range(1, rows):
        dist[i][0], move[i][0] = i, "D"
    for j in range(1, cols):
        dist[0][j], move[0][j] = j, "I"
    for i in range(1, rows):
        for j in range(1, cols):
            best, kind = dist[i - 1][j] + 1, "D"
            if dist[i][j - 1] + 1 < best:
                best, kind = dist[i][j - 1] + 1, "I"
            differ = ref[i - 1] != hyp[j - 1]
            if dist[i - 1][j - 1] + differ < best:
                best, kind = dist[i - 1][j - 1] + differ, "S" if differ else "C"
            dist[i][j], move[i][j] = best, kind
    counts = {"S": 0, "D": 0, "I": 0, "C": 0}
    i, j = rows - 1, cols - 1
    while i or j:
        kind = move[i][j]
        counts[kind] += 1
        i -= kind != "I"
        j -= kind != "D"
    return ErrorCounts(len(ref), counts["S"], counts["D"], counts["I"])


@dataclasses.dataclass(frozen=True)
class WerReport:
    """Corpus counts, per-utterance counts (in reference order), and the TTS samples skipped for lack of speech."""

    total: ErrorCounts
    utterances: dict[str, ErrorCounts]
    skipped: tuple[str, ...] = ()

    @property
    def wer(self) -> float:
        return self.total.wer

    def to_json(self) -> dict:
        return {"wer": self.wer, **dataclasses.asdict(self.total), "utterances": {
            k: dataclasses.asdict(v) for k, v in self.utterances.items()}, "skipped": list(self.skipped)}


def score_lines(ref_lines: Iterable[str], hyp_lines: Iterable[str]) -> WerReport:
    """compute-wer on two sets of "{id} {text}" lines: every reference line whose id has a hypothesis is aligned
    (a repeated hypothesis id keeps its last line); the totals are summed over those utterances."""
    hyps = dict(parsed for parsed in map(parse_line, hyp_lines) if parsed)
    total, utterances = ErrorCounts(), {}
    for parsed in map(parse_line, ref_lines):
        if parsed is None or parsed[0] not in hyps:
            continue
        counts = align(parsed[1], hyps[parsed[0]])
        utterances[parsed[0]] = counts
        total += counts
    return WerReport(total, utterances)


def score_files(ref_path: str | os.PathLike, hyp_path: str | os.PathLike) -> WerReport:
    """compute-wer.py --char=1 REF HYP."""
    lines = []
    for path in (ref_path, hyp_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such transcript file")
        lines.append(Path(path).read_text(encoding="utf-8").splitlines())
    return score_lines(*lines)


# ============================================================================================= TTS normaliser
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"), (100, "hundred"))
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}
_NUMBER = re.compile(r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:(?P<ord>st|nd|rd|th)\b|\.(?P<frac>\d+))?(?P<pct>%)?")


def number_words(n: int) -> str:
    """Cardinal in English words: 1205 -> "one thousand two hundred five"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f" {_ONES[n % 10]}" if n % 10 else "")
    scale, name = next((scale, name) for scale, name in _SCALES if n >= scale)
    head, rest = divmod(n, scale)
    return f"{number_words(head)} {name}" + (f" {number_words(rest)}" if rest else "")


def ordinal_words(n: int) -> str:
    """Ordinal in English words: 21 -> "twenty first", 40 -> "fortieth"."""
    *head, last = number_words(n).split(" ")
    last = _IRREGULAR_ORDINALS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " ".join([*head, last])


def _spell_number(match: re.Match) -> str:
    n = int(match["int"].replace(",", ""))
    if match["ord"]:
        words = ordinal_words(n)
    elif match["frac"]:
        words = f"{number_words(n)} point " + " ".join(_ONES[int(d)] for d in match["frac"])
    else:
        words = number_words(n)
    return f" {words}{' percent' if match['pct'] else ''} "


def normalize_english(text: str) -> str:
    """The TTS evaluation's text normalisation, approximated.

    The reference runs WeTextProcessing's English normaliser (a WFST grammar for numbers, dates, money, measures,
    abbreviations...) and then `re.sub(r"\\W+", " ", ·)`. Here: "&" -> "and"; integers (with thousands commas),
    decimals, ordinals (1st, 22nd) and percentages -> words; lower-case; every run of non-word characters -> one
    space. Years, money, times and abbreviations are not verbalised as WeTextProcessing would ("1990" becomes
    "one thousand nine hundred ninety"), so WER against the reference's numbers is close, not equal; hypothesis and
    reference get the same treatment either way.
    """
    text = _NUMBER.sub(_spell_number, text.replace("&", " and "))
    return re.sub(r"\W+", " ", text.lower()).strip()


# ============================================================================================= MME
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_GROUPS = {"Perception": PERCEPTION, "Cognition": COGNITION}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class MMEQuestion:
    """One MME question: its task, image file, question text and ground truth ("Yes" or "No")."""

    task: str
    image: str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class MMEAnswer:
    """A scored line of an MME results file: task, image name, question, ground truth, prediction."""

    task: str
    image_name: str
    question: str
    answer: str
    pred: str


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield number, line


def _fields(path: Path, number: int, line: str, names: tuple[str, ...]) -> list[str]:
    fields = line.split("\t")
    if len(fields) != len(names):
        raise EvalError(f"{path}:{number}: expected {len(names)} tab-separated fields ({', '.join(names)}), "
                        f"got {len(fields)}: {line[:120]!r}")
    return fields


def _question(task: str, image: Path, question: str, answer: str, where: str) -> MMEQuestion:
    if answer.strip().lower() not in ("yes", "no"):
        raise EvalError(f"{where}: the ground truth must be Yes or No, got {answer!r}")
    if not image.is_file():
        raise FileNotFoundError(f"{where}: image {image} does not exist")
    return MMEQuestion(task, str(image), question, answer.strip())


def read_mme(folder: str | os.PathLike) -> list[MMEQuestion]:
    """MME's questions, in file order, from either layout:

    - the release folder: `<task>/questions_answer_pairs/<stem>.txt` with images in `<task>/images/<stem>.*`, or
      `<task>/<stem>.txt` beside `<task>/<stem>.*`; each txt holds "question\\tanswer" lines for its image;
    - the reference script's: `eval_tool/Your_Results/<task>.txt` with "image\\tquestion\\tanswer" lines and the
      images in `images/<task>/`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such MME folder")
    questions = []
    lists = folder / "eval_tool" / "Your_Results"
    if lists.is_dir():
        for path in sorted(lists.glob("*.txt")):
            for number, line in _lines(path):
                image, question, answer = _fields(path, number, line, ("image", "question", "answer"))
                questions.append(_question(path.stem, folder / "images" / path.stem / image, question, answer,
                                           f"{path}:{number}"))
    else:
        for task in sorted(p for p in folder.iterdir() if p.is_dir()):
            pairs = task / "questions_answer_pairs"
            texts, image_dir = (pairs, task / "images") if pairs.is_dir() else (task, task)
            images = {p.stem: p for p in image_dir.glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES}
            for path in sorted(texts.glob("*.txt")):
                if path.stem not in images:
                    raise FileNotFoundError(f"{path}: no image named {path.stem}.* in {image_dir}")
                for number, line in _lines(path):
                    question, answer = _fields(path, number, line, ("question", "answer"))
                    questions.append(_question(task.name, images[path.stem], question, answer, f"{path}:{number}"))
    if not questions:
        raise EvalError(f"{folder}: no MME questions found (expected <task>/questions_answer_pairs/*.txt, "
                        "<task>/*.txt beside the images, or eval_tool/Your_Results/*.txt)")
    return questions


def mme_label(pred: str) -> str:
    """MME's reading of a prediction: "yes", "no" or "other", from its first four lower-cased characters."""
    head = pred.lower()[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@dataclasses.dataclass(frozen=True)
class MMETaskScore:
    """One task's counts; acc, acc+ and score = 100 (acc + acc+) follow from them."""

    questions: int
    correct: int
    images: int
    both_correct: int
    other: int  # predictions read as neither yes nor no

    @property
    def acc(self) -> float:
        return self.correct / self.questions

    @property
    def acc_plus(self) -> float:
        return self.both_correct / self.images

    @property
    def score(self) -> float:
        return 100 * (self.acc + self.acc_plus)


@dataclasses.dataclass(frozen=True)
class MMEScores:
    """Per-task scores and the Perception / Cognition totals over the tasks present."""

    tasks: dict[str, MMETaskScore]

    @property
    def groups(self) -> dict[str, float]:
        return {group: sum(self.tasks[t].score for t in names if t in self.tasks)
                for group, names in MME_GROUPS.items()}

    def to_json(self) -> dict:
        return {"groups": self.groups, "tasks": {t: {**dataclasses.asdict(s), "acc": s.acc, "acc_plus": s.acc_plus,
                                                     "score": s.score} for t, s in self.tasks.items()}}


def score_mme(answers: Iterable[MMEAnswer]) -> MMEScores:
    """MME's rule. Within a task the questions come in consecutive pairs, two per image (as MME's calculation.py
    reads them); a pair naming two different images, or an odd count, is an error."""
    by_task: dict[str, list[MMEAnswer]] = {}
    for a in answers:
        by_task.setdefault(a.task, []).append(a)
    scores = {}
    for task, rows in by_task.items():
        if len(rows) % 2:
            raise EvalError(f"MME task {task!r}: {len(rows)} questions, but MME asks two per image")
        bad = [a for a in rows if a.answer.lower() not in ("yes", "no")]
        if bad:
            raise EvalError(f"MME task {task!r}: ground truth {bad[0].answer!r} on {bad[0].image_name!r} is not Yes/No")
        right = [mme_label(a.pred) == a.answer.lower() for a in rows]
        for first, second in zip(rows[0::2], rows[1::2]):
            if first.image_name != second.image_name:
                raise EvalError(f"MME task {task!r}: questions on {first.image_name!r} and {second.image_name!r} "
                                "are paired; each image's two questions must be adjacent")
        scores[task] = MMETaskScore(len(rows), sum(right), len(rows) // 2,
                                    sum(a and b for a, b in zip(right[0::2], right[1::2])),
                                    sum(mme_label(a.pred) == "other" for a in rows))
    return MMEScores(scores)


def read_mme_results(folder: str | os.PathLike) -> list[MMEAnswer]:
    """The "image\\tquestion\\tgt\\tpred" lines of every <task>.txt in `folder` (MME eval_tool's results format)."""
    paths = sorted(Path(folder).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no <task>.txt results files")
    return [MMEAnswer(path.stem, *_fields(path, number, line, ("image", "question", "gt", "pred")))
            for path in paths for number, line in _lines(path)]


# ============================================================================================= datasets
@dataclasses.dataclass(frozen=True)
class AsrSample:
    """An ASR evaluation item: the audio file and its reference transcript."""

    audio: str
    reference: str


@dataclasses.dataclass(frozen=True)
class TtsSample:
    """A TTS evaluation item: the text to speak (also the reference) and the name of its output wav."""

    text: str
    name: str


def _records(path: str | os.PathLike, prefix: str):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such jsonl file")
    records = list(read_jsonl(path, prefix, strict=True))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_asr_jsonl(path: str | os.PathLike, prefix: str = "") -> list[AsrSample]:
    """LibriSpeech-format records: audios[0] is the speech, messages[1].content the transcript; audio paths are
    joined to `prefix` (the reference reads them relative to the working directory)."""
    samples = []
    for number, record in _records(path, prefix):
        if len(record.messages) < 2 or not record.audios:
            raise DataError(f"{path}:{number}: an ASR record needs an audio and two messages (the second holds the "
                            "transcript)")
        samples.append(AsrSample(record.audios[0], record.messages[1][1]))
    return samples


def read_tts_jsonl(path: str | os.PathLike, prefix: str = "") -> list[TtsSample]:
    """LibriTTS-format records: the text is messages[0].content without "Convert the text to speech.\\n", stripped;
    the output wav is named after audios[0]."""
    samples = []
    for number, record in _records(path, prefix):
        if not record.audios:
            raise DataError(f"{path}:{number}: a TTS record needs its target audio in 'audios' (it names the output)")
        samples.append(TtsSample(record.messages[0][1].replace(TTS_INSTRUCTION, "").strip(),
                                 Path(record.audios[0]).stem))
    names = [s.name for s in samples]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: several records' audios share the file name(s) {repeated[:5]}; outputs would clash")
    return samples


# ============================================================================================= runners
def _batched(fn: Callable[[list], Sequence], items: list, batch_size: int, what: str) -> list:
    """fn over items in batches of `batch_size`, with a progress bar; fn must return one output per item."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    out = []
    with tqdm(total=len(items), desc=what, unit="request") as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            got = list(fn(batch))
            if len(got) != len(batch):
                raise EvalError(f"{what}: {len(got)} outputs came back for {len(batch)} requests")
            out += got
            bar.update(len(batch))
    return out


def _output_folder(out_dir: str | os.PathLike, names: Iterable[str], overwrite: bool) -> Path:
    """Creates `out_dir`; refuses (before any work) if a file the run writes exists, unless `overwrite`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{out}: {', '.join(taken[:5])} exist(s); pass overwrite to replace them")
    return out


def _wer_files(name: str) -> list[str]:
    return [f"{name}_hyp.txt", f"{name}_ref.txt", f"{name}_hyp_ref.json", f"{name}_wer.json"]


def _score_and_write(out: Path, name: str, pairs: list[tuple[str, str]], skipped: tuple[str, ...] = ()) -> WerReport:
    """Writes the reference's hyp/ref files and hyp_ref.json, scores them, writes {name}_wer.json."""
    pairs = [(" ".join(hyp.splitlines()), " ".join(ref.splitlines())) for hyp, ref in pairs]
    hyp_lines = [f"{i} {hyp}" for i, (hyp, _) in enumerate(pairs)]
    ref_lines = [f"{i} {ref}" for i, (_, ref) in enumerate(pairs)]
    hyp_file, ref_file, pairs_file, wer_file = (out / n for n in _wer_files(name))
    write_text(hyp_file, "".join(line + "\n" for line in hyp_lines))
    write_text(ref_file, "".join(line + "\n" for line in ref_lines))
    write_text(pairs_file, json.dumps(pairs, indent=4, ensure_ascii=False))
    report = dataclasses.replace(score_lines(ref_lines, hyp_lines), skipped=skipped)
    write_text(wer_file, json.dumps(report.to_json(), indent=2))
    return report


def run_asr_eval(samples: Sequence[AsrSample], transcribe: Callable[[list[Request]], Sequence[str]],
                 out_dir: str | os.PathLike, name: str = "asr", batch_size: int = 8,
                 overwrite: bool = False) -> WerReport:
    """evaluate_asr.py + compute-wer: `transcribe` maps ASR requests to generated text (decoded from
    `asr_text_ids`); writes {name}_hyp.txt, _ref.txt, _hyp_ref.json and _wer.json in `out_dir`."""
    out = _output_folder(out_dir, _wer_files(name), overwrite)
    texts = _batched(transcribe, [asr_request(s.audio) for s in samples], batch_size, "asr")
    return _score_and_write(out, name, [(clean_asr_text(t), s.reference) for t, s in zip(texts, samples)])


def run_tts_eval(samples: Sequence[TtsSample],
                 synthesize: Callable[[list[Request]], Sequence[tuple[np.ndarray, int] | None]],
                 transcribe: Callable[[list[str]], Sequence[str]], out_dir: str | os.PathLike, name: str = "tts",
                 batch_size: int = 8, overwrite: bool = False) -> WerReport:
    """evaluate_libritts.py + compute-wer.

    `synthesize` maps TTS requests to (waveform, sample rate), or None where no speech codes were generated (the
    sample is skipped, as in the reference); the waveforms go to `out_dir/audio/{name}.wav`; `transcribe` maps
    wav paths to text. Hypotheses (stripped) and references go through `normalize_english`.
    """
    wavs = [f"audio/{s.name}.wav" for s in samples]
    out = _output_folder(out_dir, _wer_files(name) + wavs, overwrite)
    (out / "audio").mkdir(exist_ok=True)
    requests = [{"task": "tts", "text": s.text, "image": None, "audio": None, **TTS_SETTINGS} for s in samples]
    speech = _batched(synthesize, requests, batch_size, "tts")
    kept, skipped = [], []
    for sample, wav, result in zip(samples, wavs, speech):
        if result is None:
            skipped.append(sample.name)
            continue
        write_wav(out / wav, *result)
        kept.append((sample, str(out / wav)))
    texts = _batched(transcribe, [path for _, path in kept], batch_size, "transcribe")
    pairs = [(normalize_english(t.strip()), normalize_english(s.text)) for t, (s, _) in zip(texts, kept)]
    return _score_and_write(out, name, pairs, tuple(skipped))


def run_mme_eval(folder: str | os.PathLike, answer: Callable[[list[Request]], Sequence[str]],
                 out_dir: str | os.PathLike, batch_size: int = 8, overwrite: bool = False) -> MMEScores:
    """evaluate_imageqa_mme.py + MME's calculation: `answer` maps VQA requests to generated text; writes
    `out_dir/<task>.txt` ("image\\tquestion\\tgt\\tpred" lines) and `out_dir/mme_scores.json`."""
    questions = read_mme(folder)
    tasks = sorted({q.task for q in questions})
    out = _output_folder(out_dir, [f"{t}.txt" for t in tasks] + ["mme_scores.json"], overwrite)
    requests = [{"task": "vqa", "text": q.question, "image": q.image, "audio": None, **MME_SETTINGS}
                for q in questions]
    preds = _batched(answer, requests, batch_size, "mme")
    answers = [MMEAnswer(q.task, Path(q.image).name, q.question, q.answer, clean_mme_pred(p).replace("\t", " "))
               for q, p in zip(questions, preds)]
    for task in tasks:
        write_text(out / f"{task}.txt", "".join(f"{a.image_name}\t{a.question}\t{a.answer}\t{a.pred}\n"
                                                for a in answers if a.task == task))
    scores = score_mme(answers)
    write_text(out / "mme_scores.json", json.dumps(scores.to_json(), indent=2))
    return scores
