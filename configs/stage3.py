"""Stage 3: spoken visual interaction. The reference's shipped mixture (`configs/finetune.yaml`, every ratio 1):
LibriSpeech ASR, LibriTTS TTS, JourneyDB text-to-image, BLIP3o speech-to-image and LLaVA-OneVision spoken VQA,
from stage 2's last checkpoint."""

import ml_collections

from omnidiff_jax.configs.stage2 import get_config as stage2
from omnidiff_jax.train.settings import source


def get_config():
    cfg = stage2()
    cfg.init.kind, cfg.init.path = "checkpoint", "runs/stage2"
    cfg.train.workdir = "runs/stage3"
    sources = cfg.data.sources
    cfg.data.sources = ml_collections.ConfigDict({
        "librispeech_asr": sources.librispeech_asr,
        "libritts_tts": sources.libritts_tts,
        "journeydb_t2i": sources.journeydb_t2i,
        "blip3o_s2i": source("blip3o_s2i", "s2i", prefix="datasets/BLIP3o/", jsonl=(
            "datasets/jsonl/JourneyDB/BLIP3o_JourneyDB_GiGaSPK_A2I_system_prompt.jsonl",)),
        "llava_svqa": source("llava_svqa", "svqa", jsonl=(
            "datasets/jsonl/LLaVA-OneVision-Data-TTS-GiGaSPK/allava_instruct_laion4v_system_prompt.jsonl",)),
    })
    return cfg
