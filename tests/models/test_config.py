"""The tagged ``model:`` section: defaults, presets, one clear line per error (unknown family or
kind, a field of another kind, an old flat key, a bad per-layer pattern), per-layer overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.attention.layer import AttentionConfig
from models.config import LayerOverride, ModelConfig
from models.configtree import ConfigError, load_yaml
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_tiny_preset_and_valid():
    DecoderConfig().validate()
    assert ModelConfig.from_dict(load_yaml(CONFIGS / "tiny.yaml")["model"]) == DecoderConfig()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(mixer=AttentionConfig(n_heads=8, n_kv_heads=3)), r"model.mixer.n_heads \(8\) must be a multiple of model.mixer.n_kv_heads \(3\).*\[1, 2, 4, 8\]"),
        (dict(d_model=100, mixer=AttentionConfig(n_heads=8, n_kv_heads=8)), r"model.d_model \(100\) must be divisible by model.mixer.n_heads \(8\), or set model.mixer.head_dim; e.g. d_model=96"),
        (dict(d_model=24, mixer=AttentionConfig(n_heads=8, n_kv_heads=8)), r"head dimension \(3\) must be even"),
        (dict(vocab_size=0), r"model.vocab_size must be a positive integer, got 0"),
        (dict(ffn=SwiGLUConfig(d_ff=-4)), r"model.ffn.d_ff must be a positive integer"),
        (dict(norm_eps=0.0), r"model.norm_eps must be > 0"),
        (dict(mixer=AttentionConfig(backend="xformers")), r"model.mixer.backend 'xformers' is unknown; choose one of \['cudnn', 'flash', 'flex', 'math', 'sdpa'\]"),
        (dict(mixer=AttentionConfig(window=0)), r"model.mixer.window must be >= 1"),
    ],
)
def test_validate_names_the_field_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig(**fields).validate()


def test_validate_lists_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        DecoderConfig(vocab_size=0, n_layers=0, norm_eps=-1.0).validate()
    text = str(info.value)
    assert "model.vocab_size" in text and "model.n_layers" in text and "model.norm_eps" in text


@pytest.mark.parametrize(
    "section,message",
    [
        ({"family": "t9"}, r"^'model.family' 't9' is unknown; choose one of \[.*'decoder'.*\]$"),
        ({"mixer": {"kind": "mamba"}}, r"^'model.mixer.kind' 'mamba' is unknown; choose one of \[.*'attention'.*'retention'.*\]$"),
        ({"ffn": "moe_xl"}, r"^'model.ffn.kind' 'moe_xl' is unknown; choose one of \[.*'swiglu'.*\]$"),
        ({"ffn": {"d_ff": 64}}, r"^'model.ffn.kind' needs a 'kind'; choose one of"),
        ({"ffn": {"kind": "swiglu", "n_heads": 4}}, r"^'model.ffn.n_heads' is not a field of model.ffn kind 'swiglu'; its fields are kind, d_ff$"),
        ({"mixer": {"kind": "attention", "d_ff": 4}}, r"^'model.mixer.d_ff' is not a field of model.mixer kind 'attention'; its fields are kind, n_heads, n_kv_heads, head_dim, window, backend, qk_norm_eps$"),
        ({"n_heads": 8}, r"^'model.n_heads' has moved: it is now 'model.mixer.n_heads'$"),
        ({"d_ff": 8}, r"^'model.d_ff' has moved: it is now 'model.ffn.d_ff'$"),
        ({"attention_backend": "flex"}, r"^'model.attention_backend' has moved: it is now 'model.mixer.backend'$"),
        ({"n_kv_head": 2}, r"^'model.n_kv_head' is not a field of model family 'decoder'.*"),
        ({"mixer": {"kind": "attention", "n_headz": 2}}, r"did you mean 'model.mixer.n_heads'"),
        ({"d_model": "256"}, r"'model.d_model' must be of type int"),
    ],
)
def test_config_errors_are_one_clear_line(section, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig.from_dict({"family": "decoder", **section})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"layers": "0:x", "mixer": {"window": 2}}, r"'model.layer_overrides\[0\].layers' = '0:x' is not a layer selector; use a slice such as \"0:2\" or \"::2\", an index, or a list of indices, within 8 layers"),
        ({"layers": 9, "ffn": {"d_ff": 8}}, r"'model.layer_overrides\[0\].layers' = 9 is not a layer selector"),
        ({"layers": "5:2", "ffn": {"d_ff": 8}}, r"'model.layer_overrides\[0\].layers' = '5:2' selects no layer of 8"),
        ({"layers": "::0", "ffn": {"d_ff": 8}}, r"is not a layer selector"),
        ({"layers": [1, 99], "ffn": {"d_ff": 8}}, r"is not a layer selector"),
        ({"layers": "0:2"}, r"'model.layer_overrides\[0\]' changes nothing: give it a 'mixer' or an 'ffn'"),
        ({"layers": "0:2", "ffn": {"kind": "swiglu", "window": 3}}, r"'model.layer_overrides\[0\].ffn.window' is not a field of model.layer_overrides\[0\].ffn kind 'swiglu'"),
        ({"layers": "0:2", "mixer": {"kind": "nope"}}, r"'model.layer_overrides\[0\].mixer.kind' 'nope' is unknown"),
    ],
)
def test_bad_layer_patterns_are_one_clear_line(override, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_dict({"family": "decoder", "layer_overrides": [override]})
    assert str(info.value).count("\n") <= 1  # "invalid model config:" + the one problem


def test_layer_overrides_merge_in_order_and_reach_the_modules():
    config = ModelConfig.from_dict(
        {
            "family": "decoder",
            "n_layers": 6,
            "layer_overrides": [
                {"layers": "::2", "mixer": {"window": 3}},
                {"layers": [0, -1], "ffn": {"d_ff": 64}},
                {"layers": "0:1", "mixer": {"n_kv_heads": 2}},
            ],
        }
    )
    layers = config.layers()
    assert [m.window for m in layers.mixers] == [3, None, 3, None, 3, None]
    assert [m.n_kv_heads for m in layers.mixers] == [2, 4, 4, 4, 4, 4]  # merged onto layer 0's window
    assert layers.mixers[0].window == 3
    assert [f.d_ff for f in layers.ffns] == [64, 1024, 1024, 1024, 1024, 64]
    model = build_model(config)
    assert [model.layers[str(i)].mixer.window for i in range(6)] == [3, None, 3, None, 3, None]
    assert model.layers["0"].mixer.wk.weight.shape[0] == 2 * 32 and model.layers["1"].mixer.wk.weight.shape[0] == 4 * 32
    assert model.layers["5"].ffn.w1.weight.shape[0] == 64 and model.layers["4"].ffn.w1.weight.shape[0] == 1024


def test_an_override_problem_names_the_override():
    with pytest.raises(ValueError, match=r"model.layer_overrides\[0\].mixer.n_heads \(8\) must be a multiple of model.layer_overrides\[0\].mixer.n_kv_heads \(3\)"):
        ModelConfig.from_dict({"family": "decoder", "layer_overrides": [{"layers": "1", "mixer": {"n_kv_heads": 3}}]})


def test_a_bare_kind_name_means_its_defaults():
    config = ModelConfig.from_dict({"family": "decoder", "mixer": "attention", "ffn": "swiglu"})
    assert config.mixer == AttentionConfig() and config.ffn == SwiGLUConfig()


def test_round_trip_through_a_dict():
    from models.configtree import to_dict

    config = DecoderConfig(layer_overrides=[LayerOverride(layers="1:3", mixer={"window": 4})])
    tree = to_dict(config)
    assert tree["mixer"]["kind"] == "attention" and tree["family"] == "decoder"
    assert ModelConfig.from_dict(tree) == config


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_is_a_valid_run_config(preset):
    """Every shipped preset: its model section builds a config of the family it names, and the
    whole run config passes the cross-section validation `pretrain train` runs."""
    from pretrain.config import load_config

    tree = load_yaml(CONFIGS / f"{preset}.yaml")
    model = ModelConfig.from_dict(tree["model"])
    assert model.family == tree["model"].get("family", "decoder")
    assert load_config(preset).model == model
