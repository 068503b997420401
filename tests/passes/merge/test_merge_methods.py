"""The merge methods mergekit lacks (besides fisher/regmean/permute): each against its paper's
reference formulation on the zoo, plus their one-line errors. ``pcb`` against a transcription of
the reference code's ``PCB_merge`` (sort-based); ``rmm`` reconstructs every source model exactly
with a full basis and switches between them; ``darex`` beats DARE's 1/(1−p) rescale at extreme
drop rates; ``ota`` weights by the given second moments and grafts by saliency."""
import pytest
import torch
from safetensors.torch import save_file

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.ir.graph import set_attr

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def family():
    """A base and three 'fine-tuned' copies (shifted, so task vectors have a mean), and inputs."""
    built = zoo.build("llama", seed=0)
    base = splice.capture(built.model, built.example_inputs)
    tuned = []
    for seed in range(3):
        g, gen = base.copy(), torch.Generator().manual_seed(seed)
        for target, t in base.tensors().items():
            if t.is_floating_point():
                scale = 0.05 * t.detach().abs().mean()
                set_attr(g.gm, target, t.detach() + scale * (0.5 + torch.randn(t.shape, generator=gen)))
        tuned.append(g)
    kw = built.make_inputs(2, 64, seed=1)
    held = built.make_inputs(2, 64, seed=2)
    return base, tuned, [tuple(kw[n] for n in base.input_names)], tuple(held[n] for n in base.input_names)


def _t(g, name=NAME):
    return g.tensor(name).detach()


def _reference_pcb(tvs: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference repository's ``PCB_merge`` on ``[n, d]`` task vectors (sort-based clamps)."""
    def clamp(x, lo, hi):
        d = x.shape[1]
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * lo)].unsqueeze(1), s[:, int(d * (1 - hi) - 1)].unsqueeze(1))

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    n = tvs.shape[0]
    mag = clamp(tvs.abs(), 0.0001, 0.0001)
    task = torch.exp(n * normalize(mag) ** 2) * torch.tanh(tvs * tvs.sum(dim=0))
    scale = normalize(clamp(task, 1 - ratio, 0))
    return (tvs.sign() * mag * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


def test_pcb_matches_the_reference_code(family):
    base, tuned, _, _ = family
    merged = splice.merge(tuned, "pcb", base=base, ratio=0.2, **{"lambda": 1.5})
    tvs = torch.stack([(_t(g) - _t(base)).reshape(-1) for g in tuned])
    want = _t(base) + 1.5 * _reference_pcb(tvs, 0.2).reshape(_t(base).shape)
    torch.testing.assert_close(_t(merged), want, atol=1e-6, rtol=1e-5)


def test_widen_scores_magnitude_and_direction(family):
    base, tuned, _, _ = family
    one = splice.merge(tuned[:1], "widen", base=base)  # one model: every score is 1, the model itself
    torch.testing.assert_close(_t(one), _t(tuned[0]))
    a = splice.merge(tuned, "widen", base=base)
    b = splice.merge(tuned[::-1], "widen", base=base)  # symmetric in the models
    torch.testing.assert_close(_t(a), _t(b))
    emb = next(t for t in base.tensors() if "embed" in t or "lm_head" in t)  # a token's row is a unit:
    changed = base.copy()
    set_attr(changed.gm, emb, _t(base, emb).clone().index_fill_(0, torch.tensor([3]), 1.0))
    out = splice.merge([changed, base], "widen", base=base)  # one changed row moves only that row
    rows = (_t(out, emb) != _t(base, emb)).any(dim=1).nonzero().flatten().tolist()
    assert rows == [3]


def test_delta_weighted_and_mwa_formulas(family):
    base, tuned, _, _ = family
    d = torch.stack([_t(g) - _t(base) for g in tuned])
    want = _t(base) + (d.abs() / d.abs().sum(dim=0) * d).sum(dim=0)
    torch.testing.assert_close(_t(splice.merge(tuned, "delta_weighted", base=base)), want)
    losses = [{"metric": 1.0}, {"metric": 2.0}, {"metric": 4.0}]
    uniform = splice.merge(tuned, "mwa", model_parameters=losses, penalty=0.0)
    torch.testing.assert_close(_t(uniform), sum(_t(g) for g in tuned) / 3)
    by_loss = splice.merge(tuned, "mwa", model_parameters=losses, penalty=2.0)
    w = torch.tensor([1.0, 1 / 4, 1 / 16])
    torch.testing.assert_close(_t(by_loss), sum(wi * _t(g) for wi, g in zip(w / w.sum(), tuned)))
    by_step = splice.merge(tuned, "mwa", model_parameters=losses, by="step", penalty=1.0)
    torch.testing.assert_close(_t(by_step), sum(wi * _t(g) for wi, g in zip([1 / 7, 2 / 7, 4 / 7], tuned)))


def test_darex_rescale_beats_dare_at_extreme_drop(family):
    base, tuned, calib, held = family
    fixed = splice.merge(tuned[:1], "darex", base=base, density=0.1, q=0.5, seed=3)
    delta, kept = _t(tuned[0]) - _t(base), _t(fixed) - _t(base)
    nz = kept != 0
    torch.testing.assert_close(kept[nz], delta[nz] / 0.5)  # kept entries divided by q
    assert 0.07 < float(nz.float().mean()) < 0.13
    want = tuned[0].run(*held)["logits"]

    def error(g):
        return float((g.run(*held)["logits"] - want).norm() / want.norm())

    dare = splice.merge(tuned[:1], "darex", base=base, density=0.05, q=0.05, seed=0)  # DARE: q = 1 − p
    darex = splice.merge(tuned[:1], "darex", base=base, density=0.05, calibration=calib, seed=0)
    assert error(darex) < error(dare)


def test_ota_weights_by_second_moments_and_grafts(family, tmp_path):
    base, tuned, _, _ = family
    v = [{t: torch.rand(x.shape, generator=torch.Generator().manual_seed(i)) for t, x in base.tensors().items()
          if x.is_floating_point()} for i in range(2)]
    files = []
    for i, moments in enumerate(v):
        save_file(moments, tmp_path / f"v{i}.safetensors")
        files.append({"preconditioner": str(tmp_path / f"v{i}.safetensors")})
    merged = splice.merge(tuned[:2], "ota", base=base, model_parameters=files, epsilon=1e-12)
    p = [m[NAME].sqrt() for m in v]
    want = (p[0] * _t(tuned[0]) + p[1] * _t(tuned[1])) / (p[0] + p[1])
    torch.testing.assert_close(_t(merged), want, atol=1e-6, rtol=1e-5)
    grafted = splice.merge(tuned[:1], "ota", base=base, model_parameters=files[:1], density=0.3)
    delta = _t(tuned[0]) - _t(base)
    keep = (_t(grafted) - _t(base)) != 0
    saliency = v[0][NAME] * delta.square()
    assert abs(float(keep.float().mean()) - 0.3) < 0.01
    assert float(saliency[keep].min()) >= float(saliency[~keep].max())
    with pytest.raises(ConfigError, match="^merge.ota: preconditioner '.*nowhere': no such file"):
        splice.merge(tuned[:1], "ota", base=base, preconditioner=str(tmp_path / "nowhere"))


def test_rmm_reconstructs_every_model_and_switches(family, tmp_path):
    base, tuned, _, held = family
    full = splice.merge(tuned, "rmm", base=base, k=3, task=1)
    assert full.op_counts()["splice.basis_weight"] == len([t for t in base.tensors().values() if t.is_floating_point()])
    for i, g in enumerate(tuned):
        chosen = full.apply(f"merge.rmm_select:task={i}")
        torch.testing.assert_close(chosen.run(*held)["logits"], g.run(*held)["logits"], atol=1e-5, rtol=0)
    folded = full.apply("merge.rmm_select:task=2,fold=true")
    assert "splice.basis_weight" not in folded.op_counts()
    torch.testing.assert_close(folded.run(*held)["logits"], tuned[2].run(*held)["logits"], atol=1e-5, rtol=0)
    full.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert torch.equal(back.run(*held)["logits"], full.run(*held)["logits"])
    errors = [float((splice.merge(tuned, "rmm", base=base, k=k).run(*held)["logits"]
                     - tuned[0].run(*held)["logits"]).abs().max()) for k in (1, 2)]
    assert errors[0] > errors[1] > 0  # a smaller basis reconstructs worse
    with pytest.raises(ConfigError, match=r"^merge.rmm_select: task must be in \[0, 2\], got 5"):
        full.apply("merge.rmm_select:task=5")
    with pytest.raises(ConfigError, match=r"^quantize.rtn: '.*' computes its weight with splice::basis_weight; "):
        full.apply("quantize.rtn:bits=4")  # a reversible merge quantizes once folded
    with pytest.raises(ConfigError, match="^merge.rmm_select: requires merge.rmm earlier"):
        base.apply("merge.rmm_select:task=0")
    with pytest.raises(ConfigError, match="^merge.rmm_select: the graph holds no reversible merge"):
        folded.apply("merge.rmm_select:task=0")  # folded: plain weights again


@pytest.mark.parametrize(("method", "kwargs", "message"), [
    ("darex", {"density": 0.2, "q": 0.1}, r"q must be in \[density, 1\] = \[0.2, 1\], got 0.1"),
    ("darex", {"density": 1.5, "q": 1.0}, r"density must be in \(0, 1\], got 1.5"),
    ("mwa", {"metric": 0.0}, r"metric must be in \(0, ∞\), got 0.0"),
    ("mwa", {"metric": 1.0, "by": "epoch"}, r"by must be in \{loss, step\}, got epoch"),
    ("pcb", {"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),
    ("rmm", {"k": 0}, r"k must be in \[1, ∞\), got 0"),
    ("rmm", {"task": 3}, r"task must index one of the 2 merged models, got 3"),
    ("widen", {"score_calibration_value": -1.0}, r"score_calibration_value must be in \[0, ∞\), got -1.0"),
])
def test_bad_parameters(family, method, kwargs, message):
    base, tuned, _, _ = family
    with pytest.raises(ConfigError, match=rf"^merge.{method}: {message}"):
        if method == "mwa":
            splice.merge(tuned[:2], method, **kwargs)
        else:
            splice.merge(tuned[:2], method, base=base, **kwargs)
    with pytest.raises(ConfigError, match="^merge.delta_weighted: needs a base model"):
        splice.merge(tuned[:2], "delta_weighted")


def test_each_model_reads_its_own_calibration(family, tmp_path, capsys):
    base, tuned, calib, held = family
    from splice.passes.merge.fisher import normalized_fisher

    other = [tuple(t.flip(-1) for t in calib[0])]  # another batch for the second model
    merged = splice.merge(tuned[:2], "fisher", model_calibration=[calib, other], epsilon=1e-8)
    f0 = normalized_fisher(tuned[0], calib, "t")[NAME] + 1e-8
    f1 = normalized_fisher(tuned[1], other, "t")[NAME] + 1e-8
    torch.testing.assert_close(_t(merged), (f0 * _t(tuned[0]) + f1 * _t(tuned[1])) / (f0 + f1))
    shared = splice.merge(tuned[:2], "fisher", calibration=calib, epsilon=1e-8)
    assert not torch.equal(_t(shared), _t(merged))
