"""Every registered op against its reference on every backend its record declares (ONNX through
ONNX Runtime; Triton through its CPU interpreter), plus ``torch.library.opcheck``, on the record's
sample inputs; and ``docs/backends.md`` is the registry's current table."""
from pathlib import Path

import pytest
import torch

from splice.kernels import families  # noqa: F401  (registers every op)
from splice.kernels.registry import ONNX_OPSET, backends_markdown, records, translations

RECORDS = {rec.name: rec for rec in records()}
ONNX_OPS = sorted(name for name, rec in RECORDS.items() if "onnx" in rec.translations)
CASES = [(name, backend) for name, rec in RECORDS.items() for backend in rec.translations if backend != "onnx"]


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else [t.detach() for t in a]
                 if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args)


class _Call(torch.nn.Module):
    """``op(input, *stored)``: the first tensor argument is the model input, every other tensor a
    buffer (an initializer in ONNX), everything else a constant."""

    def __init__(self, op, args):
        super().__init__()
        self.op, self.layout = op, []
        first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        for i, a in enumerate(args):
            if i == first:
                self.layout.append(("input", None))
            elif isinstance(a, torch.Tensor):
                self.register_buffer(f"t{i}", a)
                self.layout.append(("tensor", f"t{i}"))
            elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                for j, t in enumerate(a):
                    self.register_buffer(f"t{i}_{j}", t)
                self.layout.append(("list", [f"t{i}_{j}" for j in range(len(a))]))
            else:
                self.layout.append(("const", a))
        self.input = args[first]

    def forward(self, x):
        args = []
        for kind, value in self.layout:
            args.append(x if kind == "input" else getattr(self, value) if kind == "tensor"
                        else [getattr(self, v) for v in value] if kind == "list" else value)
        return self.op(*args)


class _Every(torch.nn.Module):
    """Every op in one program (``_Call`` each), so one ONNX export and one ORT session check them
    all: an export costs the same fixed tens of seconds whether it holds one op or thirty."""

    def __init__(self, calls):
        super().__init__()
        self.calls = torch.nn.ModuleList(calls)

    def forward(self, *inputs):
        return tuple(call(x) for call, x in zip(self.calls, inputs))


def test_onnx_matches_reference_for_every_op():
    import onnxruntime as ort

    args = {name: _detached(RECORDS[name].sample_inputs()) for name in ONNX_OPS}
    module = _Every([_Call(RECORDS[name].op, args[name]) for name in ONNX_OPS])
    inputs = tuple(call.input for call in module.calls)
    program = torch.onnx.export(torch.export.export(module, inputs, strict=False), (), dynamo=True,
                                custom_translation_table=translations("onnx"), opset_version=ONNX_OPSET,
                                optimize=False, verbose=False)
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})
    wrong = []
    for name, got in zip(ONNX_OPS, outs):
        want = RECORDS[name].reference(*args[name]).float()
        got = torch.from_numpy(got).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            wrong.append(f"{name}: {tuple(got.shape)} vs {tuple(want.shape)}, max diff "
                         f"{(got - want).abs().max().item() if got.shape == want.shape else 'n/a'}")
    assert not wrong, "ONNX Runtime differs from the reference:\n" + "\n".join(wrong)


def _triton(rec, args):
    pytest.importorskip("triton")
    return rec.translation("triton")(*args)


@pytest.mark.parametrize("name,backend", CASES)
def test_backend_matches_reference(name, backend):
    rec = RECORDS[name]
    args = _detached(rec.sample_inputs())
    want = rec.reference(*args)
    got = {"triton": _triton}[backend](rec, args)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_opcheck(name):
    rec = RECORDS[name]
    # schema, fake-vs-real metadata, autograd registration; the (slow) AOT-dispatch replay is left to
    # the family tests that train through the ops
    torch.library.opcheck(rec.op, rec.sample_inputs(),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_record_is_complete(name):
    """Kinds and roles the IR reads, and a weight that reads back what was written, up to its format."""
    rec = RECORDS[name]
    assert rec.sample_inputs is not None
    args = _detached(rec.sample_inputs())
    assert all(isinstance(args[i], torch.Tensor) for i in rec.roles if args[i] is not None)
    if rec.weight is not None:
        w = rec.weight.read(args)
        new = rec.weight.write(args, w)
        again = list(args)
        for i, value in new.items():
            again[i] = value
        torch.testing.assert_close(rec.weight.read(tuple(again)), w, rtol=0.05, atol=0.05)


def test_backends_doc_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "backends.md"
    assert doc.read_text() == backends_markdown(), "docs/backends.md is stale: python -m splice.kernels > docs/backends.md"
