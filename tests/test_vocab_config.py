"""Token id layout and configs: the released layout's ids (as Omni-Diffusion `tokenizer.py` and
`tools/finetune_dream_v4_51_3.py` add them), tiny layouts consistent with it."""

import numpy as np
import pytest

from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.vocab import TokenLayout


def test_released_layout_ids():
    t = TokenLayout()
    assert (t.eos, t.pad, t.mask, t.im_start, t.im_end) == (151643, 151643, 151666, 151644, 151645)
    assert t.special("<|beginoftext|>") == 151665
    assert (t.begin_of_image, t.end_of_image, t.image_tag) == (151667, 151668, 151682)
    assert (t.begin_of_audio, t.end_of_audio, t.context_of_audio, t.audio_tag) == (151684, 151685, 151686, 151687)
    assert (t.audio_code_start, t.image_code_start, t.vocab_size) == (151688, 168072, 176264)
    assert t.vocab_size % 8 == 0


def test_code_round_trips_and_classification():
    t = TokenLayout()
    ids = np.concatenate([t.audio_ids([0, 16383]), t.image_ids([0, 8191]), [5, t.mask]])
    assert ids.tolist()[:4] == [151688, 168071, 168072, 176263]
    assert t.audio_codes(ids).tolist() == [0, 16383]
    assert t.image_codes(ids).tolist() == [0, 8191]
    assert [t.kind(int(i)) for i in ids] == ["audio", "audio", "image", "image", "text", "special"]
    with pytest.raises(ValueError, match="speech code 16384 is outside"):
        t.audio_ids([16384])
    with pytest.raises(ValueError, match="image code -1 is outside"):
        t.image_ids([-1])
    with pytest.raises(ValueError, match="token id 176264 is outside"):
        t.kind(176264)
    with pytest.raises(ValueError, match="unknown special token"):
        t.special("<|nope|>")


@pytest.mark.parametrize("name", ["tiny", "small", "omni_diffusion_7b"])
def test_configs_are_consistent(name):
    cfg = get_config(name)
    model, layout = dream_config(cfg), token_layout(cfg)
    assert model.vocab_size == layout.vocab_size
    assert (model.mask_token_id, model.pad_token_id) == (layout.mask, layout.pad)


def test_real_config_values():
    m = dream_config(get_config("omni_diffusion_7b"))
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size) == (3584, 28, 28, 4, 18944)
    assert (m.vocab_size, m.rope_theta, m.rms_norm_eps, m.mask_token_id, m.pad_token_id) == (
        176264, 1e6, 1e-6, 151666, 151643)
    assert m.head_dim == 128


def test_inconsistent_config_is_rejected():
    cfg = get_config("tiny")
    cfg.model.vocab_size = 999
    with pytest.raises(ValueError, match="vocab_size 999 does not match its token layout"):
        dream_config(cfg)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        dream_config(get_config("tiny")).replace(num_kv_heads=3)
