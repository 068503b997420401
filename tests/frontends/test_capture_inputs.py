"""Capture checks its example inputs: an integer tensor fed to a float layer is refused at capture
(one line naming the input) instead of a graph that fails on its first run."""
import pytest
import torch

import splice
from splice.errors import CaptureError


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids))


class _Reshaped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4))


@pytest.mark.parametrize("model,dtype", [(torch.nn.Linear(4, 4), torch.long), (_Reshaped(), torch.int32)])
def test_integer_input_for_a_float_layer(model, dtype):
    with pytest.raises(CaptureError, match=r"^capture: input '\w+' is torch\.int\d+ but feeds the float layer "
                                           r"'\w+' \(aten\.linear\); pass floating-point example inputs") as err:
        splice.capture(model, (torch.ones(2, 4, dtype=dtype),))
    assert "\n" not in str(err.value)


def test_integer_ids_through_an_embedding_and_float_inputs_capture():
    ids = torch.ones(2, 3, dtype=torch.long)
    g = splice.capture(_Embed(), (ids,))
    assert g.run(ids)[g.output_names[0]].shape == (2, 3, 4)
    x = torch.ones(2, 4)
    lin = torch.nn.Linear(4, 4)
    torch.testing.assert_close(splice.capture(lin, (x,)).run(x)["output"], lin(x))
