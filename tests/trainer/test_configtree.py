from dataclasses import dataclass, field
from typing import Literal

import pytest

from models.configtree import ConfigError, apply_overrides, from_dict, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    maybe: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"steps": 5, "inner": {"lr": 1, "sizes": [1, 2]}})
    assert cfg.steps == 5 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.sizes == [1, 2] and cfg.name == "x"
    assert to_dict(cfg)["inner"] == {"lr": 1.0, "kind": "a", "sizes": [1, 2]}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stepz": 3}, "unknown config key 'stepz'; did you mean 'steps'?"),
        ({"inner": {"lrr": 3}}, "unknown config key 'inner.lrr'; did you mean 'inner.lr'?"),
        ({"steps": "many"}, "'steps' must be of type int"),
        ({"steps": True}, "'steps' must be a number"),
        ({"flag": "yes"}, "'flag' must be true or false"),
        ({"inner": {"kind": "c"}}, "'inner.kind' must be one of 'a', 'b'"),
        ({"inner": 3}, "'inner' must be a mapping"),
        ({"inner": {"sizes": [1, "x"]}}, "'inner.sizes[1]' must be of type int"),
    ],
)
def test_errors_name_the_key_and_fix(values, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, values)
    assert message in str(e.value)


def test_dotted_overrides_parse_yaml_values():
    tree = apply_overrides({"inner": {"lr": 1.0}}, ["steps=50", "inner.lr=3e-4", "maybe=null", "inner.sizes=[4, 5]"])
    cfg = from_dict(Outer, tree)
    assert cfg.steps == 50 and cfg.inner.lr == 3e-4 and cfg.maybe is None and cfg.inner.sizes == [4, 5]
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="'steps' is a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])
