"""Merging: parameters paired by graph structure (different module names merge; another architecture
is refused naming the first mismatch), each method's formula on the zoo, mergekit YAML parity where
mergekit is installed (logits ≤ 1e-5 with gradients and filters), seeded DARE/DELLA, the merged
graph's save/load, ONNX and ``--hf`` output, and the one-line errors."""
import pytest
import torch
import yaml
from zoo_graphs import assert_error, input_grid, run_cli

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.passes.merge._common import evaluate_setting, layer_positions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DETERMINISTIC = ("linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "nearswap",
                 "model_stock", "sce", "karcher", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl",
                 "passthrough")
SHARED_ONLY = {"model_stock": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
               "sce": {"select_topk": [0.3, 0.8]}, "karcher": {"max_iter": 5}, "ram": {"epsilon": [0.001, 0.01]},
               "ramplus_tl": {"r": 0.5, "alpha": [0.1, 0.4]}}  # methods without per-model parameters


class Renamed(torch.nn.Module):
    """The same model under other module names (``inner.model.layers…``)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def llamas():
    built = [zoo.build("llama", seed=s) for s in range(3)]
    return built, [splice.capture(b.model, built[0].example_inputs) for b in built]


@pytest.fixture(scope="module")
def hf_dirs(llamas, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-inputs")
    for i, b in enumerate(llamas[0]):
        b.model.save_pretrained(root / f"m{i}")
    return root


def _tensor(g, name="model.layers.1.mlp.up_proj.weight"):
    return g.tensor(name).detach()


def test_parameters_pair_by_structure_not_name(llamas):
    built, (g0, g1, _) = llamas
    renamed = splice.capture(Renamed(built[1].model), built[0].example_inputs)
    assert "inner.model.layers.1.mlp.up_proj.weight" in renamed.tensors()
    a = splice.merge([g0, g1], "linear", weight=0.5)
    b = splice.merge([g0, renamed], "linear", weight=0.5)
    for inputs in input_grid(built[0], g0)[:2]:
        torch.testing.assert_close(a.run(*inputs)["logits"], b.run(*inputs)["logits"], atol=1e-6, rtol=0)


def test_another_architecture_is_refused_naming_the_mismatch(llamas):
    _, (g0, _, _) = llamas
    gpt2 = zoo.build("gpt2")
    other = splice.capture(gpt2.model, gpt2.example_inputs)
    with pytest.raises(ConfigError, match=r"^merge.linear: model 1 is not the architecture of model 0: parameter "
                                          r"'transformer.wpe.weight' of model 1 does not match"):
        splice.merge([g0, other], "linear", weight=0.5)


def test_formulas(llamas):
    _, (g0, g1, g2) = llamas
    w0, w1, w2 = _tensor(g0), _tensor(g1), _tensor(g2)
    lin = splice.merge([g0, g1], "linear", model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(_tensor(lin), (w0 + 3 * w1) / 4)
    ta = splice.merge([g1, g2], "task_arithmetic", base=g0, weight=0.5, **{"lambda": 2.0})
    torch.testing.assert_close(_tensor(ta), w0 + 2.0 * 0.5 * ((w1 - w0) + (w2 - w0)))
    assert torch.equal(_tensor(splice.merge([g1], "slerp", base=g0, t=0.0)), w0)
    torch.testing.assert_close(_tensor(splice.merge([g1], "slerp", base=g0, t=1.0)), w1)
    theta = torch.acos(torch.nn.functional.cosine_similarity(w0.flatten(), w1.flatten(), 0))
    want = (torch.sin(0.7 * theta) * w0 + torch.sin(0.3 * theta) * w1) / torch.sin(theta)
    torch.testing.assert_close(_tensor(splice.merge([g1], "slerp", base=g0, t=0.3)), want)
    ties = _tensor(splice.merge([g1, g2], "ties", base=g0, weight=1.0, density=1.0))
    d1, d2 = w1 - w0, w2 - w0
    elected = torch.where(d1 + d2 >= 0, 1.0, -1.0)
    a1, a2 = (d1.sign() == elected).float(), (d2.sign() == elected).float()
    torch.testing.assert_close(ties, w0 + (d1 * a1 + d2 * a2) / (a1 + a2).clamp(min=1))


def test_weights_equal_in_every_input_are_merged_too(llamas):
    """As mergekit: a weight the same in every input (a norm gain) is merged like any other (summed
    by an unnormalized linear merge, scaled by passthrough); only buffers (RoPE frequencies) stay."""
    _, (g0, g1, _) = llamas
    norm, freq = "model.norm.weight", "model.rotary_emb.inv_freq"
    assert torch.equal(g0.tensor(norm), g1.tensor(norm))
    summed = splice.merge([g0, g1], "linear", weight=1.0, normalize=False)
    torch.testing.assert_close(summed.tensor(norm), 2 * g0.tensor(norm))
    assert torch.equal(summed.tensor(freq), g0.tensor(freq))
    scaled = splice.merge([g0], "passthrough", scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])
    torch.testing.assert_close(scaled.tensor("model.layers.1.self_attn.o_proj.weight"),
                               0.5 * g0.tensor("model.layers.1.self_attn.o_proj.weight"))
    assert torch.equal(scaled.tensor(norm), g0.tensor(norm))
    # a tensor no model moved from the base: multislerp keeps it (mergekit raises "weighted sum is zero")
    same = splice.merge([g0, g0, g1], "multislerp", base=g0, weight=1.0)
    assert torch.equal(same.tensor(norm), g0.tensor(norm))


def test_parameter_settings_follow_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == 0.5
    conds = [{"filter": "mlp", "value": 0.3}, {"value": [0.1, 0.9]}]
    assert evaluate_setting(conds, "model.layers.0.mlp.up_proj.weight", 1.0) == 0.3
    assert evaluate_setting(conds, "model.layers.0.self_attn.q_proj.weight", 1.0) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "norm.weight", 0) is None
    assert layer_positions(["m.layers.0.w", "m.layers.2.w", "m.embed.w"]) == {"m.layers.0.w": 0.0,
                                                                             "m.layers.2.w": 1.0, "m.embed.w": 0.0}


def test_dare_and_della_are_seeded_and_keep_their_density(llamas):
    _, (g0, g1, g2) = llamas
    for method in ("dare_linear", "della_linear"):
        kw = dict(weight=1.0, density=0.3)
        a, b = (splice.merge([g1], method, base=g0, seed=7, **kw) for _ in range(2))
        c = splice.merge([g1], method, base=g0, seed=8, **kw)
        assert torch.equal(_tensor(a), _tensor(b)) and not torch.equal(_tensor(a), _tensor(c))
        delta, full = _tensor(a) - _tensor(g0), _tensor(g1) - _tensor(g0)
        kept = float((delta != 0).float().mean())
        assert abs(kept - 0.3) < 0.03, (method, kept)
        torch.testing.assert_close(delta.abs().sum(), full.abs().sum(), rtol=1e-4, atol=0)  # L1 rescale


def test_merged_graph_saves_exports_and_writes_hf(llamas, hf_dirs, tmp_path, capsys):
    built, (g0, _, _) = llamas
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(hf_dirs / "m0"),
                                      "models": [{"model": str(hf_dirs / f"m{i}"),
                                                  "parameters": {"weight": 0.5, "density": 0.5}} for i in (1, 2)]}))
    rc, out, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "art", "--hf", tmp_path / "hf")
    assert rc == 0, err
    merged = splice.load(tmp_path / "art")
    entry = merged.history[-1]
    assert entry["pass"] == "merge.ties" and len(entry["report"]["inputs"]) == 3
    assert all(len(i["weights_sha256"]) == 64 for i in entry["report"]["inputs"])
    grid = input_grid(built[0], g0)
    assert splice.parity(merged, splice.export_onnx(merged, tmp_path / "m.onnx"), grid) <= 1e-4
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        for inputs in grid[:2]:
            theirs = hf(**dict(zip(merged.input_names, inputs)), use_cache=False).logits
            torch.testing.assert_close(merged.run(*inputs)["logits"], theirs, atol=1e-5, rtol=0)


def _frankenmerge(root) -> dict:
    """Five layers from three models, one slice scaled by a filtered, per-source ``scale``."""
    scale = {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(root / "m0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "m1"), "layer_range": [1, 2], "parameters": scale}]},
        {"sources": [{"model": str(root / "m2"), "layer_range": [0, 2]}]}]}


def _recipe(method: str, root) -> dict:
    """A recipe exercising layer gradients and filter conditionals."""
    if method == "passthrough":
        return _frankenmerge(root)
    models = [{"model": str(root / "m1"), "parameters": {"weight": [0.2, 1.0], "density": 0.6}},
              {"model": str(root / "m2"), "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}],
                                                         "density": 0.5}}]
    recipe = {"merge_method": method, "base_model": str(root / "m0"), "models": models, "dtype": "float32"}
    if method in SHARED_ONLY:
        for m in models:
            m["parameters"] = {}
        recipe["parameters"] = SHARED_ONLY[method]
        if method == "karcher":
            del recipe["base_model"]
    if method in ("nuslerp", "multislerp"):
        for m in models:
            m["parameters"].pop("density")
    if method == "nuslerp":
        recipe["parameters"] = {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}],
                                "nuslerp_row_wise": True}
    if method == "linear":
        del recipe["base_model"]
        for m in models:
            m["parameters"].pop("density")
    if method in ("slerp", "nearswap", "arcee_fusion"):
        recipe["models"] = [{"model": str(root / "m0")}, {"model": str(root / "m1")}]
        recipe["parameters"] = {"slerp": {"t": [0.1, 0.9]}, "nearswap": {"t": 0.01}, "arcee_fusion": {}}[method]
    if method == "breadcrumbs":
        recipe["parameters"] = {"gamma": [{"filter": "self_attn", "value": 0.05}, {"value": 0.01}]}
    return recipe


FAST_PARITY = ("slerp", "ties", "breadcrumbs", "passthrough")  # gradients, filters, consensus, slices in CI


@pytest.mark.parametrize("method", [m if m in FAST_PARITY else pytest.param(m, marks=pytest.mark.slow)
                                    for m in DETERMINISTIC])
def test_mergekit_parity(method, llamas, hf_dirs, tmp_path, capsys):
    mergekit = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install splice[test])")
    from mergekit.config import MergeConfiguration

    built, (g0, _, _) = llamas
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(method, hf_dirs)))
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    mergekit.run_merge(config, str(tmp_path / "mk"), mergekit.MergeOptions())  # what mergekit-yaml runs
    rc, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "sp")
    assert rc == 0, err
    ours = splice.load(tmp_path / "sp")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32).eval()
    with torch.no_grad():
        for inputs in input_grid(built[0], g0)[:2]:
            want = theirs(**dict(zip(ours.input_names, inputs)), use_cache=False).logits
            torch.testing.assert_close(ours.run(*inputs)["logits"], want, atol=1e-5, rtol=0)


def test_bad_input(llamas, hf_dirs, tmp_path, capsys):
    _, (g0, g1, _) = llamas
    with pytest.raises(ConfigError, match="^splice.merge: unknown merge method 'tie'; did you mean 'ties'"):
        splice.merge([g0, g1], "tie")
    with pytest.raises(ConfigError, match=r"^merge.linear: the weights sum to 0 and normalize=true \(tensor '"):
        splice.merge([g0, g1], "linear", model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ConfigError, match="^merge.ties: needs a base model"):
        splice.merge([g0, g1], "ties", weight=1.0)
    with pytest.raises(ConfigError, match=r"^merge.ties: density must be in \(0, 1\], got 1.5"):
        splice.merge([g1], "ties", base=g0, weight=1.0, density=1.5)
    with pytest.raises(ConfigError, match=r"^merge.slerp: t must be in \[0, 1\], got 2.0"):
        splice.merge([g1], "slerp", base=g0, t=2)
    with pytest.raises(ConfigError, match="^merge.slerp: takes exactly 1 model"):
        splice.merge([g1, g1], "slerp", base=g0, t=0.5)
    with pytest.raises(ConfigError, match="^merge.linear: parameter 'weight' is required"):
        splice.merge([g0, g1], "linear")
    with pytest.raises(ConfigError, match=r"^merge.linear: input 'model 1' holds splice.qlinear at 'model.layers.0"):
        splice.merge([g0, g1.apply("quantize.rtn:bits=4,group_size=32")], "linear", weight=1.0)
    bad = tmp_path / "bad.yaml"
    for doc, needles in [
        ({"merge_method": "tie", "models": ["a"]}, ["merge_method", "did you mean 'ties'"]),
        ({"merge_method": "ties", "base_modle": "a", "models": ["a"]}, ["base_modle", "did you mean 'base_model'"]),
        ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": 0.5}}]},
         ["models[0].parameters", "no parameter 'densty'", "did you mean 'density'"]),
        ({"merge_method": "ties", "models": ["a"], "slices": []}, ["models", "exactly one of models and slices"]),
        ({"merge_method": "ties", "modules": {}}, ["modules", "not supported yet"]),
        ({"merge_method": "linear", "models": [str(hf_dirs / "m0"), str(tmp_path / "nowhere")],
          "parameters": {"weight": 1.0}}, ["nowhere", "no such file"]),
    ]:
        bad.write_text(yaml.safe_dump(doc))
        assert_error(capsys, ["merge", bad, "-o", tmp_path / "o"], *needles, absent=[tmp_path / "o"])
    bad.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(hf_dirs / "m0"), str(hf_dirs / "m1")],
                                   "parameters": {"weight": 0}}))
    assert_error(capsys, ["merge", bad, "-o", tmp_path / "o"], "sum to 0", absent=[tmp_path / "o"])
    bad.write_text(yaml.safe_dump({"merge_method": "rmm", "base_model": str(hf_dirs / "m0"),
                                   "models": [str(hf_dirs / "m1"), str(hf_dirs / "m2")]}))
    assert_error(capsys, ["merge", bad, "-o", tmp_path / "o", "--hf", tmp_path / "h"],  # names the op it cannot write
                 "--hf writes float transformers weights", "splice.basis_weight", "merge.rmm_select:fold=true",
                 absent=[tmp_path / "o", tmp_path / "h"])


@pytest.fixture(scope="module")
def calib(llamas):
    from zoo_graphs import calibration

    built, graphs = llamas
    return calibration(built[0], graphs[0], n=4, seq=32)


def _layer_inputs(model, samples, name="model.layers.0.mlp.up_proj"):
    """Every row of the input of ``name`` in the eager model over ``samples``, [rows, in]."""
    rows = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids, mask in samples:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return torch.cat(rows)


def test_regmean_solves_the_least_squares_merge(llamas, calib):
    built, (g0, g1, _) = llamas
    merged = splice.merge([g0, g1], "regmean", calibration=calib, alpha=1.0)
    name = "model.layers.0.mlp.up_proj.weight"
    w = merged.tensor(name).detach().double()
    pairs = [(g.tensor(name).detach().double(), (x.T @ x).double())
             for g, x in ((g0, _layer_inputs(built[0].model, calib)), (g1, _layer_inputs(built[1].model, calib)))]
    residual = sum((w - wi) @ gram for wi, gram in pairs)  # Σᵢ (W − Wᵢ) XᵢᵀXᵢ = 0 at the optimum
    assert float(residual.norm()) < 1e-5 * float(sum(wi @ gram for wi, gram in pairs).norm())
    lin = splice.merge([g0, g1], "linear", weight=1.0)
    assert torch.equal(merged.tensor("model.norm.weight"), lin.tensor("model.norm.weight"))  # non-linears: average


def test_fisher_weights_each_parameter_by_its_fisher(llamas, calib):
    _, (g0, g1, _) = llamas
    from splice.passes.merge.fisher import normalized_fisher

    merged = splice.merge([g0, g1], "fisher", calibration=calib, epsilon=1e-8)
    name = "model.layers.1.mlp.down_proj.weight"
    f0, f1 = (normalized_fisher(g, calib, "t")[name] + 1e-8 for g in (g0, g1))
    want = (f0 * g0.tensor(name) + f1 * g1.tensor(name)) / (f0 + f1)
    torch.testing.assert_close(merged.tensor(name), want.detach())
    with pytest.raises(ConfigError, match="^merge.fisher: needs calibration data"):
        splice.merge([g0, g1], "fisher")


def test_the_templates_masks_survive(llamas):
    from splice.ir.sparsity import check_masks

    _, (g0, g1, _) = llamas
    pruned = g0.apply("prune.magnitude:sparsity=0.5")
    merged = splice.merge([pruned, g1], "linear", weight=1.0)
    assert merged.masks.keys() == pruned.masks.keys() and not check_masks(merged)


def test_passthrough_stacks_slices_and_writes_hf(llamas, hf_dirs, tmp_path, capsys):
    built, (g0, _, _) = llamas
    recipe = tmp_path / "f.yaml"
    recipe.write_text(yaml.safe_dump(_frankenmerge(hf_dirs)))
    rc, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "art", "--hf", tmp_path / "hf")
    assert rc == 0, err
    merged = splice.load(tmp_path / "art")
    assert merged.history[-1]["report"]["layers"] == 5
    assert "model.layers.4.mlp.up_proj.weight" in merged.tensors()
    torch.testing.assert_close(merged.tensor("model.layers.2.self_attn.o_proj.weight"),
                               0.5 * llamas[1][1].tensor("model.layers.1.self_attn.o_proj.weight"))
    grid = input_grid(built[0], g0)  # ONNX parity of passthrough: the registry matrix (test_passes.py)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 5
    with torch.no_grad():
        theirs = hf(**dict(zip(merged.input_names, grid[0])), use_cache=False).logits
    torch.testing.assert_close(merged.run(*grid[0])["logits"], theirs, atol=1e-5, rtol=0)


def _sliced(method: str, root) -> dict:
    """Slices with several sources each: the classic slerp recipe (two whole stacks, gradients per
    filter), and TIES over two slices of other layer ranges with per-source and per-slice parameters."""
    m = [str(root / f"m{i}") for i in range(3)]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": m[0], "dtype": "float32",
                "slices": [{"sources": [{"model": m[0], "layer_range": [0, 2]}, {"model": m[1], "layer_range": [0, 2]}]}],
                "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                     {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}
    return {"merge_method": "ties", "base_model": m[0], "dtype": "float32", "parameters": {"density": 0.7}, "slices": [
        {"sources": [{"model": m[0], "layer_range": [0, 1]},
                     {"model": m[1], "layer_range": [1, 2], "parameters": {"weight": 0.7, "density": 0.5}},
                     {"model": m[2], "layer_range": [0, 1], "parameters": {"weight": 0.4}}]},
        {"sources": [{"model": m[0], "layer_range": [0, 2]}, {"model": m[2], "layer_range": [0, 2]}],
         "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.5}]}}]}


@pytest.mark.parametrize("method", ["slerp", "ties"])
def test_mergekit_parity_slices(method, llamas, hf_dirs, tmp_path, capsys):
    mergekit = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install splice[test])")
    from mergekit.config import MergeConfiguration
    from transformers import AutoModelForCausalLM

    built, (g0, _, _) = llamas
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_sliced(method, hf_dirs)))
    mergekit.run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text())), str(tmp_path / "mk"),
                       mergekit.MergeOptions())
    rc, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "sp", "--hf", tmp_path / "hf")
    assert rc == 0, err
    ours = splice.load(tmp_path / "sp")
    assert ours.history[-1]["report"]["layers"] == (2 if method == "slerp" else 3)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        for inputs in input_grid(built[0], g0)[:2]:
            kwargs = dict(zip(ours.input_names, inputs))
            logits = ours.run(*inputs)["logits"]
            torch.testing.assert_close(logits, theirs(**kwargs, use_cache=False).logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits, reloaded(**kwargs, use_cache=False).logits, atol=1e-5, rtol=0)


def test_bad_slices(llamas, hf_dirs, tmp_path, capsys):
    _, (g0, g1, g2) = llamas
    with pytest.raises(ConfigError, match=r"^merge.passthrough: slices\[0\] layer_range \[0, 3\] is outside 'model 0'"):
        splice.merge([g0], "passthrough", slices=[{"sources": [{"input": 0, "layer_range": [0, 3]}]}])
    with pytest.raises(ConfigError, match=r"^merge.linear: slices\[0\]: every source needs the same number of "
                                          r"layers, got \[2, 1\]$"):
        splice.merge([g0, g1], "linear", slices=[{"sources": [{"input": 0, "layer_range": [0, 2]},
                                                               {"input": 1, "layer_range": [0, 1]}]}])
    with pytest.raises(ConfigError, match=r"^merge.ties: slices\[0\]: the base model 'base' is not one of its sources"):
        splice.merge([g1, g2], "ties", base=g0, slices=[{"sources": [{"input": 0, "layer_range": [0, 2]},
                                                                      {"input": 1, "layer_range": [0, 2]}]}])
    bad = tmp_path / "s.yaml"
    doc = _frankenmerge(hf_dirs)
    doc["slices"][0]["sources"].append({"model": str(hf_dirs / "m1"), "layer_range": [0, 2]})
    bad.write_text(yaml.safe_dump(doc))
    assert_error(capsys, ["merge", bad, "-o", tmp_path / "o"], "merge.passthrough: slices[0]: takes exactly 1 model",
                 absent=[tmp_path / "o"])
    doc["slices"][0]["residual_weight"] = 0.5
    bad.write_text(yaml.safe_dump(doc))
    assert_error(capsys, ["merge", bad, "-o", tmp_path / "o"], "slices[0].residual_weight", "not supported",
                 absent=[tmp_path / "o"])


def test_recipe_gives_each_model_its_calibration(hf_dirs, tmp_path, capsys, byte_tokenizer):
    texts = []
    for i, text in enumerate(["the quick brown fox " * 60, "def f(x):\n    return x\n" * 60]):
        texts.append(tmp_path / f"d{i}.txt")
        texts[-1].write_text(text)
    recipe = tmp_path / "f.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [
        {"model": str(hf_dirs / "m0"), "calibration": str(texts[0])},
        {"model": str(hf_dirs / "m1"), "calibration": str(texts[1])}]}))
    rc, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "own")
    assert rc == 0, err
    shared = tmp_path / "s.yaml"
    shared.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [str(hf_dirs / "m0"), str(hf_dirs / "m1")]}))
    assert_error(capsys, ["merge", shared, "-o", tmp_path / "o"], "needs calibration data", absent=[tmp_path / "o"])
    rc, _, err = run_cli(capsys, "merge", shared, "--calib", texts[0], "-o", tmp_path / "shared")
    assert rc == 0, err
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(splice.load(tmp_path / "own").tensor(name), splice.load(tmp_path / "shared").tensor(name))
    bad = tmp_path / "b.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [
        {"model": str(hf_dirs / "m0"), "calibration": 3}, str(hf_dirs / "m1")]}))
    assert_error(capsys, ["merge", bad, "-o", tmp_path / "o"], "models[0].calibration", "calibration source",
                 absent=[tmp_path / "o"])
