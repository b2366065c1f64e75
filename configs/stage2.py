"""Stage 2: speech-text alignment. Stage 1's mixture plus ASR (LibriSpeech train-clean-100) and TTS (LibriTTS
train-clean-100), from stage 1's last checkpoint. User speech enters through the frozen SenseVoiceSmall encoder
and a freshly initialised projector (up to 8 clips of at most 30 s per pack)."""

from omnidiff_jax.configs.stage1 import get_config as stage1
from omnidiff_jax.train.settings import source


def get_config():
    cfg = stage1()
    cfg.init.kind, cfg.init.path = "checkpoint", "runs/stage1"
    cfg.train.workdir = "runs/stage2"
    cfg.data.sources.librispeech_asr = source(
        "librispeech_asr", "asr", jsonl=("datasets/jsonl/fixie-ai/librispeech_asr/train.100.clean.jsonl",))
    cfg.data.sources.libritts_tts = source(
        "libritts_tts", "tts", jsonl=("datasets/jsonl/mythicinfinity/libritts/train.clean.100.jsonl",))
    cfg.data.max_audios, cfg.data.max_audio_frames = 8, 500  # 500 LFR frames = 30 s
    cfg.speech.path = "checkpoints/SenseVoiceSmall"
    cfg.prepare.speech_tokenizer = "checkpoints/glm-4-voice-tokenizer"
    return cfg
