"""Pass configs: validation, the CLI grammar, recipes, registry errors."""
import pytest

from splice.errors import ConfigError, SpliceError
from splice.ir.select import parse_targets
from splice.passes.base import get_pass, list_passes
from splice.passes.spec import format_spec, load_recipe, parse_spec


def test_parse_and_format():
    info, cfg = parse_spec("quantize.rtn:bits=3,group_size=64,symmetric=false,targets=linear|!lm_head")
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.targets) == (3, 64, False, "linear|!lm_head")
    assert format_spec(info, cfg) == "quantize.rtn:bits=3,group_size=64,symmetric=false,targets=linear|!lm_head"


@pytest.mark.parametrize("spec,msg", [
    ("quantize.rnt", "did you mean 'quantize.rtn'"),
    ("quantize.rtn:bitz=4", "unknown option 'bitz'; did you mean 'bits'"),
    ("quantize.rtn:bits=9", "quantize.rtn: bits must be 2..8, got 9"),
    ("quantize.rtn:bits=four", "bits expects an integer"),
    ("quantize.rtn:group_size=-3", "quantize.rtn: group_size must be positive"),
    ("quantize.rtn:symmetric=maybe", "symmetric expects true/false"),
    ("quantize.rtn:targets=re:(", "bad regex"),
    ("quantize.rtn:bits", "expected key=value"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(spec)


def test_configs_are_frozen():
    _, cfg = parse_spec("quantize.rtn")
    with pytest.raises(Exception):
        cfg.bits = 3


def test_recipe(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - quantize.rtn:bits=8\n  - quantize.rtn: {bits: 4, targets: embedding}\n")
    steps = load_recipe(r)
    assert [c.bits for _, c in steps] == [8, 4] and steps[1][1].targets == "embedding"
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - quantize.rtn:bits=8\n  - [unclosed\n")
    with pytest.raises(SpliceError, match=r"bad\.yaml:\d+: YAML syntax error"):
        load_recipe(bad)
    opt = tmp_path / "opt.yaml"
    opt.write_text("passes:\n  - quantize.rtn: {bits: 12}\n")
    with pytest.raises(ConfigError, match="pass #1: quantize.rtn: bits must be 2..8"):
        load_recipe(opt)


def test_targets_grammar():
    sel = parse_targets("linear|!lm_head")
    assert sel.matches("linear", "model.layers.0.mlp.up_proj")
    assert not sel.matches("linear", "lm_head")
    assert not sel.matches("embedding", "model.embed_tokens")
    glob = parse_targets("model.layers.*.mlp.*")
    assert glob.matches("linear", "model.layers.3.mlp.down_proj") and not glob.matches("linear", "model.layers.3.self_attn.q_proj")
    assert parse_targets("q_proj|v_proj").matches("linear", "model.layers.0.self_attn.v_proj")
    assert parse_targets(r"re:.*\.(q|k)_proj").matches("linear", "a.k_proj")


def test_registry_lists_every_pass_with_reference():
    names = [p.name for p in list_passes()]
    assert "quantize.rtn" in names
    assert all(get_pass(n).reference.startswith("https://") for n in names)
