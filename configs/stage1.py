"""Stage 1 of Omni-Diffusion's recipe: visual-language pre-alignment (text-to-image and image captioning), from
Dream-v0-Base-7B with its 152064-row vocabulary grown to 176264 rows (new rows ~ N(0, 0.02)).

The reference repository ships neither per-stage data lists nor hyper-parameters (only `configs/finetune.yaml`);
the optimizer, batch (8 x 16 packs of 3072 tokens) and length (24000 updates) are those of its shipped
fine-tuning script, and the sources are the paper's kinds of data at the paths the reference's data config uses.
Prepare the sources first: `omnidiff data prepare --config configs/stage1.py`.
"""

from omnidiff_jax.configs.omni_diffusion_7b import get_config as omni_diffusion_7b
from omnidiff_jax.train.settings import add_training, source


def get_config():
    cfg = omni_diffusion_7b()
    cfg.model.param_dtype = "float32"  # fp32 master weights, bf16 compute
    cfg.model.remat_policy = "full"
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1
    add_training(cfg, workdir="runs/stage1", init="dream", init_path="checkpoints/Dream-v0-Base-7B", sources={
        "journeydb_t2i": source("journeydb_t2i", "t2i", jsonl=("datasets/jsonl/JourneyDB/JourneyDB.jsonl",)),
        "caption": source("caption", "caption", jsonl=("datasets/jsonl/caption/train.jsonl",)),
    })
    cfg.prepare.text_tokenizer = "checkpoints/Omni-Diffusion"  # the tokenizer files with the Omni specials
    cfg.prepare.image_tokenizer = "checkpoints/magvitv2"
    return cfg
