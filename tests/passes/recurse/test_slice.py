"""``recurse.slice``: N blocks as N / loops shared blocks looped — the shared weights stored once
(artifact and ONNX), per-loop LoRA from the residuals' SVD (full rank: the original model back,
exactly; lower ranks: closer than without), folding un-shares exactly, and the one-line errors."""
import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, first_output, input_grid, max_diff

import splice
from splice.errors import SpliceError
from splice.ir.blocks import block_tensors, stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _worst(a, b, grid) -> float:
    return max(max_diff(a, b, inputs) for inputs in grid)


def _relative(a, b, grid) -> float:
    """‖a − b‖ / ‖a‖ of the two graphs' first outputs over ``grid``."""
    pairs = [(first_output(a, x), first_output(b, x)) for x in grid]
    return float(sum((p - q).norm() ** 2 for p, q in pairs) ** 0.5 / sum(p.norm() ** 2 for p, _ in pairs) ** 0.5)


def _sliced(spec: str, model: str = "llama"):
    zm, g = captured(model)
    return zm, g, splice.Pipeline([spec]).run(g, probe=False).graph


def test_blocks_share_one_copy_of_their_weights(tmp_path):
    zm, g, out = _sliced("recurse.slice:loops=2")
    blocks = stack(out, "test")
    reads = {a.target for n in blocks[1].nodes for a in n.all_input_nodes if a.op == "get_attr"}
    assert len(blocks) == 2 and reads == set(block_tensors(out, blocks[0]).values())
    per_block = sum(g.tensor(t).numel() for t in block_tensors(g, stack(g, "test")[1]).values())
    assert g.num_params() - out.num_params() == per_block
    averaged = (g.tensor("model.layers.0.mlp.up_proj.weight") + g.tensor("model.layers.1.mlp.up_proj.weight")) / 2
    torch.testing.assert_close(out.tensor("model.layers.0.mlp.up_proj.weight"), averaged)
    onnx_a, onnx_b = splice.export_onnx(g, tmp_path / "a.onnx"), splice.export_onnx(out, tmp_path / "b.onnx")
    from splice.runtime.onnx import onnx_bytes

    saved = onnx_bytes(onnx_a) - onnx_bytes(onnx_b)
    assert saved >= 4 * per_block * 0.98, (saved, 4 * per_block)  # the block's fp32 weights, once
    assert splice.parity(out, onnx_b, input_grid(zm, g)) <= 1e-4


def test_loop_loras_restore_the_residuals():
    """A per-loop LoRA of full rank restores its layer's original weight exactly; lower ranks bring
    the outputs closer to the original model's than sharing alone."""
    zm, g = captured("llama")
    out = _sliced("recurse.slice:loops=2,lora_rank=32")[2]
    for i in (0, 1):
        path = f"model.layers.{i}.self_attn.k_proj"  # 64 -> 32: rank 32 is full
        lora = out.tensor(f"{path}.adapters.loop.B") @ out.tensor(f"{path}.adapters.loop.A")
        torch.testing.assert_close(out.tensor("model.layers.0.self_attn.k_proj.weight") + lora,
                                   g.tensor(f"{path}.weight"), atol=1e-5, rtol=0)
    grid = input_grid(zm, g)[:2]
    errors = [_relative(g, _sliced(spec)[2], grid) for spec in
              ("recurse.slice:loops=2", "recurse.slice:loops=2,lora_rank=8", "recurse.slice:loops=2,lora_rank=32")]
    assert errors[0] > errors[1] > errors[2], errors


def test_stepwise_and_lower_inits_pick_blocks():
    _, g, lower = _sliced("recurse.slice:loops=2,init=lower")
    _, _, step = _sliced("recurse.slice:loops=2,init=stepwise")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(lower.tensor(name), g.tensor(name)) and torch.equal(step.tensor(name), g.tensor(name))


def test_folding_loop_loras_unshares_exactly():
    zm, g, out = _sliced("recurse.slice:loops=2,lora_rank=8")
    folded = splice.Pipeline(["adapter.fold"]).run(out, probe=False).graph
    assert _worst(out, folded, input_grid(zm, g)[:2]) <= 1e-5


def test_hf_export_of_a_shared_stack_is_refused(tmp_path):
    from splice.runtime.hf import export_hf

    _, _, out = _sliced("recurse.slice:loops=2")
    with pytest.raises(SpliceError, match=r"^--hf: 'model\.layers\.0\..*' is shared by blocks model\.layers\.0 and "
                                          r"model\.layers\.1"):
        export_hf(out, tmp_path / "hf")


def test_bad_input():
    assert_one_line_error(["recurse.slice:loops=3"], r"^recurse.slice: loops=3 does not divide the 2 blocks of 'model.layers'")
    assert_one_line_error(["recurse.slice:lora_rank=65"], r"^recurse.slice: lora_rank=65 exceeds min\(in, out\) = 64")
    assert_bad_option("recurse.slice:loops=1", "loops must be >= 2")
    assert_bad_option("recurse.slice:init=middle", "init must be one of average, stepwise, lower")
