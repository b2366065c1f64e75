"""Key maps and config reader for the GLM-4-Voice speech decoder (`THUDM/glm-4-voice-decoder`).

The release is a folder of `config.yaml` (hyperpyyaml), `flow.pt` and `hift.pt` (torch-saved state dicts, read with
`torch_file`, i.e. `torch.load(weights_only=True)`). Every key of tests/data/keys/glm4voice_flow.txt and
glm4voice_hift.txt maps here. Linear weights are transposed (attention projections reshaped to explicit heads),
Conv1d weights [O, I, k] become [k, I, O], ConvTranspose1d weights [I, O, k] become [k, O, I] for Flax's
`transpose_kernel=True`. HiFT's weight-normed convolutions are folded (w = v g / ||v||, in the stored layout, so the
ConvTranspose's dim 0 is its input channels); both the `weight_g`/`weight_v` keys of the released file and the
`parametrizations.weight.original0/1` keys of torch's newer API are accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

from omnidiff_jax.convert.keymap import CONV1D, IDENTITY, LINEAR, KeyMap, Rule, Transform, heads_bias, heads_in, \
    heads_out, weight_norm
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.models.flow import HOP_LENGTH, SAMPLE_RATE, FlowConfig
from omnidiff_jax.models.hift import HiFTConfig

CONV_TRANSPOSE1D = Transform("conv_transpose1d", lambda w: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0))


def _dense(src: str, dst: str, weight: Transform = LINEAR, bias: Transform | None = IDENTITY) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", weight)]
    if bias is not None:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias", bias))
    return rules


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _resnet(src: str, dst: str) -> list[Rule]:
    rules = _dense(f"{src}.mlp.1", f"{dst}/mlp") + _dense(f"{src}.res_conv", f"{dst}/res_conv", CONV1D)
    for block in ("block1", "block2"):
        rules += _dense(f"{src}.{block}.block.0", f"{dst}/{block}/conv", CONV1D)
        rules += _norm(f"{src}.{block}.block.1", f"{dst}/{block}/norm")
    return rules


def _transformer(src: str, dst: str, cfg: FlowConfig) -> list[Rule]:
    h, d = cfg.attention_heads, cfg.attention_head_dim
    rules = _norm(f"{src}.norm1", f"{dst}/norm1") + _norm(f"{src}.norm3", f"{dst}/norm3")
    for name in ("to_q", "to_k", "to_v"):
        rules += _dense(f"{src}.attn1.{name}", f"{dst}/{name}", heads_out(h, d), None)
    rules += _dense(f"{src}.attn1.to_out.0", f"{dst}/to_out", heads_in(h, d))
    rules += _dense(f"{src}.ff.net.0.proj", f"{dst}/ff_proj") + _dense(f"{src}.ff.net.2", f"{dst}/ff_out")
    return rules


def _stage(src: str, dst: str, cfg: FlowConfig) -> list[Rule]:
    """A U-Net stage: `{src}.0` resnet, `{src}.1.{k}` transformer blocks."""
    rules = _resnet(f"{src}.0", f"{dst}/resnet")
    for k in range(cfg.transformer_blocks):
        rules += _transformer(f"{src}.1.{k}", f"{dst}/transformer_{k}", cfg)
    return rules


def flow_keymap(cfg: FlowConfig) -> KeyMap:
    """`flow.pt` -> `Flow` parameters (encoder layers and mid blocks stacked for nn.scan)."""
    h, d = cfg.encoder_heads, cfg.input_size // cfg.encoder_heads
    rules = [Rule("input_embedding.weight", "input_embedding/embedding")]
    rules += _dense("spk_embed_affine_layer", "spk_embed_affine_layer") + _dense("encoder_proj", "encoder_proj")
    enc, layer = "encoder", "encoder.encoders.{i}"
    rules += _dense(f"{enc}.embed.out.0", "encoder/embed") + _norm(f"{enc}.embed.out.1", "encoder/embed_norm")
    rules += _norm(f"{enc}.after_norm", "encoder/after_norm")
    for name in ("linear_q", "linear_k", "linear_v"):
        rules += _dense(f"{layer}.self_attn.{name}", f"encoder/layers/self_attn/{name}", heads_out(h, d),
                        heads_bias(h, d))
    rules += _dense(f"{layer}.self_attn.linear_pos", "encoder/layers/self_attn/linear_pos", heads_out(h, d), None)
    rules += _dense(f"{layer}.self_attn.linear_out", "encoder/layers/self_attn/linear_out", heads_in(h, d))
    rules += [Rule(f"{layer}.self_attn.{p}", f"encoder/layers/self_attn/{p}") for p in ("pos_bias_u", "pos_bias_v")]
    rules += _dense(f"{layer}.feed_forward.w_1", "encoder/layers/w_1") + _dense(
        f"{layer}.feed_forward.w_2", "encoder/layers/w_2")
    rules += _norm(f"{layer}.norm_mha", "encoder/layers/norm_mha") + _norm(f"{layer}.norm_ff", "encoder/layers/norm_ff")
    # Length regulator: nn.Sequential of [conv, GroupNorm, Mish] x L, then a 1x1 conv.
    for n in range(cfg.regulator_layers):
        rules += _dense(f"length_regulator.model.{3 * n}", f"length_regulator/conv_{n}", CONV1D)
        rules += _norm(f"length_regulator.model.{3 * n + 1}", f"length_regulator/norm_{n}")
    rules += _dense(f"length_regulator.model.{3 * cfg.regulator_layers}", "length_regulator/proj", CONV1D)
    est, dst = "decoder.estimator", "estimator"
    rules += _dense(f"{est}.time_mlp.linear_1", f"{dst}/time_linear_1")
    rules += _dense(f"{est}.time_mlp.linear_2", f"{dst}/time_linear_2")
    last = len(cfg.channels) - 1
    for s in range(len(cfg.channels)):
        rules += _stage(f"{est}.down_blocks.{s}", f"{dst}/down_{s}", cfg)
        rules += _stage(f"{est}.up_blocks.{s}", f"{dst}/up_{s}", cfg)
        if s == last:  # plain Conv1d(k3) closes the last stage of each side
            rules += _dense(f"{est}.down_blocks.{s}.2", f"{dst}/downsample_{s}", CONV1D)
            rules += _dense(f"{est}.up_blocks.{s}.2", f"{dst}/upsample_{s}", CONV1D)
        else:  # Downsample1D / Upsample1D wrap theirs as `.conv`
            rules += _dense(f"{est}.down_blocks.{s}.2.conv", f"{dst}/downsample_{s}", CONV1D)
            rules += _dense(f"{est}.up_blocks.{s}.2.conv", f"{dst}/upsample_{s}", CONV_TRANSPOSE1D)
    rules += _stage(f"{est}.mid_blocks.{{i}}", f"{dst}/mid", cfg)
    rules += _dense(f"{est}.final_block.block.0", f"{dst}/final_block/conv", CONV1D)
    rules += _norm(f"{est}.final_block.block.1", f"{dst}/final_block/norm")
    rules += _dense(f"{est}.final_proj", f"{dst}/final_proj", CONV1D)
    return KeyMap(tuple(rules))


def _weight_normed(src: str, dst: str, layout: Transform) -> list[Rule]:
    """A weight-normed layer under either key style, plus its plain bias."""
    fold = weight_norm(layout)
    return [Rule((f"{src}.weight_v", f"{src}.weight_g"), f"{dst}/kernel", fold),
            Rule((f"{src}.parametrizations.weight.original1", f"{src}.parametrizations.weight.original0"),
                 f"{dst}/kernel", fold),
            Rule(f"{src}.bias", f"{dst}/bias")]


def _resblock(src: str, dst: str, n: int) -> list[Rule]:
    rules = []
    for j in range(n):
        rules += _weight_normed(f"{src}.convs1.{j}", f"{dst}/convs1_{j}", CONV1D)
        rules += _weight_normed(f"{src}.convs2.{j}", f"{dst}/convs2_{j}", CONV1D)
        rules += [Rule(f"{src}.activations{a}.{j}.alpha", f"{dst}/activations{a}_{j}/alpha") for a in (1, 2)]
    return rules


def hift_keymap(cfg: HiFTConfig) -> KeyMap:
    """`hift.pt` -> `HiFT` parameters, weight norm folded."""
    rules = _dense("m_source.l_linear", "l_linear") + _dense("f0_predictor.classifier", "f0_predictor/classifier")
    for n in range(5):  # condnet = [conv, ELU] x 5
        rules += _weight_normed(f"f0_predictor.condnet.{2 * n}", f"f0_predictor/condnet_{n}", CONV1D)
    rules += _weight_normed("conv_pre", "conv_pre", CONV1D) + _weight_normed("conv_post", "conv_post", CONV1D)
    for i in range(len(cfg.upsample_rates)):
        rules += _weight_normed(f"ups.{i}", f"ups_{i}", CONV_TRANSPOSE1D)
        rules += _dense(f"source_downs.{i}", f"source_downs_{i}", CONV1D)
        rules += _resblock(f"source_resblocks.{i}", f"source_resblocks_{i}",
                           len(cfg.source_resblock_dilation_sizes[i]))
    k = len(cfg.resblock_kernel_sizes)
    for j in range(len(cfg.upsample_rates) * k):
        rules += _resblock(f"resblocks.{j}", f"resblocks_{j}", len(cfg.resblock_dilation_sizes[j % k]))
    return KeyMap(tuple(rules))


# --------------------------------------------------------------------------------------------------- config.yaml

class _Ref(str):
    """A hyperpyyaml `!ref <name>` awaiting resolution."""


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, _suffix, node):  # !new:pkg.Class, !name:..., !apply:...: keep the arguments, drop the tag
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    for prefix in ("!new:", "!name:", "!apply:"):
        Loader.add_multi_constructor(prefix, tagged)
    Loader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))
    return Loader


def _resolve(node, top: dict, path: Path):
    if isinstance(node, _Ref):
        m = re.fullmatch(r"\s*<([\w.]+)>\s*", node)
        if not m or m.group(1) not in top:
            raise CheckpointError(f"{path}: cannot resolve !ref {node!r}")
        return _resolve(top[m.group(1)], top, path)
    if isinstance(node, dict):
        return {k: _resolve(v, top, path) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, top, path) for v in node]
    return node


class _Section:
    """One mapping of the config; reading a missing key or an unsupported value raises naming file and key."""

    def __init__(self, data, name: str, path: Path):
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: `{name}` is not a mapping")
        self.data, self.name, self.path = data, name, path

    def __getitem__(self, key: str):
        if key not in self.data:
            raise CheckpointError(f"{self.path}: `{self.name}.{key}` is missing")
        return self.data[key]

    def sub(self, key: str) -> "_Section":
        return _Section(self[key], f"{self.name}.{key}" if self.name else key, self.path)

    def expect(self, key: str, *allowed, default=None):
        value = self.data.get(key, default)
        if value not in allowed:
            raise CheckpointError(f"{self.path}: `{self.name}.{key}` is {value!r}; this port supports "
                                  + " or ".join(repr(a) for a in allowed))


def read_decoder_config(path: str | Path) -> tuple[FlowConfig, HiFTConfig]:
    """Parses the decoder's `config.yaml` (hyperpyyaml tags and `!ref`s understood) into our configs, rejecting any
    value this port does not implement."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a glm-4-voice-decoder folder holds config.yaml, flow.pt, hift.pt)")
    try:
        raw = yaml.load(path.read_text(), Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a decoder config (top level is not a mapping)")
    raw = _resolve(raw, raw, path)
    top = _Section(raw, "", path)
    flow, hift = top.sub("flow"), top.sub("hift")
    enc, reg, dec = flow.sub("encoder"), flow.sub("length_regulator"), flow.sub("decoder")
    cfm, est = dec.sub("cfm_params"), dec.sub("estimator")
    if "content" in cfm.data:  # !new:omegaconf.DictConfig {content: {...}}
        cfm = cfm.sub("content")
    for key, value in (("normalize_before", True), ("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                       ("selfattention_layer_type", "block_rel_selfattn"), ("use_cnn_module", False),
                       ("macaron_style", False)):
        enc.expect(key, value)
    enc.expect("static_chunk_size", 0, default=0)
    enc.expect("use_dynamic_chunk", False, default=False)
    enc.expect("input_size", flow["input_size"])
    enc.expect("output_size", flow["input_size"])
    reg.expect("channels", flow["output_size"])
    dec.expect("spk_emb_dim", flow["output_size"])
    dec.expect("n_spks", 1)
    cfm.expect("solver", "euler")
    cfm.expect("t_scheduler", "cosine")
    est.expect("in_channels", 4 * flow["output_size"])
    est.expect("out_channels", flow["output_size"])
    est.expect("act_fn", "gelu")
    istft, f0 = hift.sub("istft_params"), hift.sub("f0_predictor")
    hift.expect("in_channels", flow["output_size"])
    f0.expect("in_channels", flow["output_size"])
    f0.expect("num_class", 1)
    try:
        flow_cfg = FlowConfig(
            vocab_size=flow["vocab_size"], input_size=flow["input_size"], output_size=flow["output_size"],
            spk_embed_dim=flow["spk_embed_dim"], input_frame_rate=float(flow["input_frame_rate"]),
            encoder_heads=enc["attention_heads"], encoder_ffn=enc["linear_units"], encoder_layers=enc["num_blocks"],
            block_size=enc["block_size"], regulator_layers=len(reg["sampling_ratios"]),
            channels=tuple(est["channels"]), attention_heads=est["num_heads"],
            attention_head_dim=est["attention_head_dim"], transformer_blocks=est["n_blocks"],
            mid_blocks=est["num_mid_blocks"], cfg_rate=float(cfm["inference_cfg_rate"]))
        hift_cfg = HiFTConfig(
            in_channels=hift["in_channels"], base_channels=hift["base_channels"], nb_harmonics=hift["nb_harmonics"],
            sampling_rate=hift["sampling_rate"], nsf_alpha=float(hift["nsf_alpha"]),
            nsf_sigma=float(hift["nsf_sigma"]), nsf_voiced_threshold=float(hift["nsf_voiced_threshold"]),
            upsample_rates=tuple(hift["upsample_rates"]), upsample_kernel_sizes=tuple(hift["upsample_kernel_sizes"]),
            n_fft=istft["n_fft"], hop_len=istft["hop_len"],
            resblock_kernel_sizes=tuple(hift["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(d) for d in hift["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=tuple(hift["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=tuple(tuple(d) for d in hift["source_resblock_dilation_sizes"]),
            lrelu_slope=float(hift["lrelu_slope"]), audio_limit=float(hift["audio_limit"]),
            f0_channels=f0["cond_channels"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unsupported decoder config ({e})") from None
    if hift_cfg.samples_per_frame != HOP_LENGTH:
        raise CheckpointError(f"{path}: hift upsamples {hift_cfg.samples_per_frame}x (upsample_rates x hop_len), but "
                              f"the flow's mel frames are {HOP_LENGTH} samples apart")
    if hift_cfg.sampling_rate != SAMPLE_RATE:
        raise CheckpointError(f"{path}: hift.sampling_rate is {hift_cfg.sampling_rate}; the flow's mel is "
                              f"{SAMPLE_RATE} Hz")
    return flow_cfg, hift_cfg
