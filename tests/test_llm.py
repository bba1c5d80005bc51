"""The Python API's arguments: a dtype given by name loads the model in it, as generate.py --dtype does; a name it
does not know, or an unknown strategy, is a one-line ValueError naming the choices, raised before anything loads."""
import pytest
import torch

from llm import LLM
from runner import DTYPES


def test_dtype_by_name_loads_the_model_in_it():
    llm = LLM(strategy="full", max_batch_size=1, max_seq_length=64, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.generate(["Hello"], max_new_tokens=2)[0]["tokens"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp32"), "unknown dtype 'fp32': choose one of " + ", ".join(DTYPES)),
    (dict(strategy="nosuch"), "unknown strategy 'nosuch': choose one of"),
])
def test_bad_arguments_name_the_choices(kwargs, message, monkeypatch):
    monkeypatch.setattr("llm.load_model", lambda *a: pytest.fail("loaded a model for arguments it should refuse"))
    with pytest.raises(ValueError, match=message):
        LLM(device="cpu", **kwargs)
