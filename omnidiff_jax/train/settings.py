"""The training sections of a config (init, data, train, optim, prepare) with the reference's values as defaults.

Reference values (Omni-Diffusion `finetune.sh` + `ds_config_zero2.json`): packs of 3072
tokens, 8 devices x 1 pack x 16 accumulation steps per update, 24000 updates, AdamW lr 1e-5, betas 0.9/0.95,
eps 1e-8, no weight decay, clip 1.0, log warmup over ceil(0.03 x steps) updates then cosine to 0.1 x lr, seed 956.
"""

from __future__ import annotations

import ml_collections


def source(path: str, task: str, jsonl: tuple[str, ...] = (), prefix: str = "", ratio: float = 1.0,
           num: int = -1) -> ml_collections.ConfigDict:
    """One mixture source: `path` is its prepared folder (under data.root), `jsonl` the raw files `omnidiff data
    prepare` reads (media paths joined to `prefix`), `ratio`/`num` as the reference (num -1: no cap)."""
    return ml_collections.ConfigDict(dict(path=path, task=task, jsonl=list(jsonl), prefix=prefix, ratio=ratio,
                                          num=num))


def add_training(cfg: ml_collections.ConfigDict, *, sources: dict, workdir: str, steps: int = 24000,
                 seq_len: int = 3072, micro_batch: int = 8, grad_accum: int = 16,
                 init: str = "random", init_path: str = "") -> ml_collections.ConfigDict:
    """Adds the training sections to a model config (from `omnidiff_jax.configs.base.model_config`)."""
    cfg.init = ml_collections.ConfigDict(dict(kind=init, path=init_path, seed=0))
    cfg.data = ml_collections.ConfigDict(dict(
        root="data", sources=ml_collections.ConfigDict(sources), seq_len=seq_len,
        max_audios=0,  # user-speech clips per pack (0: no speech input); static shape of the feature buffer
        max_audio_frames=0,  # longest clip in LFR frames; longer samples are dropped and counted
        seed=956, tail_max=16, mask_eps=1e-3, special_ratio=0.6,
        streams=0,  # independent pack streams (0: one per process); fixed, batches are the same on any process count
        noise="per_token"))  # or "per_sample": one masking level per sample (data.Corruption)
    cfg.train = ml_collections.ConfigDict(dict(
        workdir=workdir, steps=steps, micro_batch=micro_batch, grad_accum=grad_accum,
        accumulate="mean",  # "sum" reproduces the reference's gradient (grad_accum x the mean)
        objective="reference",  # or "inverse_t": 1/t-weighted masked CE (Dream/MDLM style)
        seed=956, log_every=1, checkpoint_every=600, keep_checkpoints=3,
        peak_tflops=0.0))  # per device, for MFU; 0 looks the device up
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0, warmup_ratio=0.03,
        total_steps=cfg.train.get_ref("steps"), cos_min_ratio=0.1, warmup_type="log", freeze_pad_row=True))
    cfg.speech = ml_collections.ConfigDict(dict(path=""))  # SenseVoice + projector weights, for user speech
    cfg.prepare = ml_collections.ConfigDict(dict(
        text_tokenizer="", image_tokenizer="", speech_tokenizer="", cmvn="",
        user_image_size=512, image_size=256, batch_size=32, shard_size=1024, strict=False))
    return cfg
