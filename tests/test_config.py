import json

import pytest

from seechat.config import BridgeConfig, SeeChatConfig, VisionConfig
from seechat.errors import ConfigError


def test_round_trip_through_json():
    cfg = SeeChatConfig(vision=VisionConfig(name_or_path="a", pool="2x2"), bridge=BridgeConfig(type="linear"))
    again = SeeChatConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"vision": {"nope": 1}}, "unknown key(s) ['nope']"),
        ({"colour": 1}, "unknown key(s) ['colour']"),
        ({"vision": {"feature_layer": "last"}}, "feature_layer must be int"),
        ({"vision": {"pool": "3x3"}}, "vision.pool must be one of"),
        ({"bridge": {"depth": 0}}, "bridge.depth must be >= 1"),
        ({"bridge": {"hidden": 0}}, "bridge.hidden must be >= 1"),
        ({"bridge": {"frozen_qformer": True}}, "needs bridge.qformer_from"),
        ({"llm": {"stop_tokens": "x"}}, "stop_tokens must be list[str]"),
        ({"format": 99}, "format 99 is not supported"),
        ({"vision": []}, "must be a mapping"),
    ],
)
def test_bad_configs_name_the_problem(data, needle):
    with pytest.raises(ConfigError) as err:
        SeeChatConfig.from_dict(data)
    assert needle in str(err.value)
