from __future__ import annotations

import numpy as np
import pytest

from mpack.errors import ConfigError
from mpack.inputs import export_sizes, parity_cases, random_feeds
from mpack.specs import TensorSpec, parse_input_spec, with_dynamic_batch


def test_parse_symbolic_and_examples():
    spec = parse_input_spec("tokens:batch,seq=16:int64")
    assert spec == TensorSpec("tokens", ("batch", "seq"), "int64")
    assert spec.examples == {"seq": 16}
    assert parse_input_spec("pixels:1,3,32,32").dtype == "float32"
    assert parse_input_spec("x:4:fp16").dtype == "float16"


@pytest.mark.parametrize("text", ["x", ":3", "x:", "x:3:nope", "x:0", "x:a=b", "1x:3", "x:3:float32:extra"])
def test_parse_rejects(text):
    with pytest.raises(ConfigError):
        parse_input_spec(text)


def test_dynamic_batch_makes_axis0_symbolic():
    assert with_dynamic_batch(parse_input_spec("x:2,3")).shape == ("batch", 3)
    assert with_dynamic_batch(parse_input_spec("x:n,3")).shape == ("n", 3)


def test_parity_cases_vary_every_symbolic_dim():
    specs = [parse_input_spec("tokens:batch,seq=10:int64"), parse_input_spec("mask:batch,seq:bool")]
    cases = parity_cases(specs, (1, 4))
    assert [c.sizes for c in cases] == [{"batch": 1, "seq": 10}, {"batch": 4, "seq": 15}]
    assert export_sizes(specs) == {"batch": 2, "seq": 10}  # never 1: torch.export would specialise it


def test_random_feeds_are_seeded_and_typed():
    specs = [parse_input_spec("x:batch,3"), parse_input_spec("ids:batch,5:int64"), parse_input_spec("m:batch:bool")]
    a = random_feeds(specs, {"batch": 2}, seed=3)
    b = random_feeds(specs, {"batch": 2}, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["x"].shape == (2, 3) and a["x"].dtype == np.float32
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0
    assert a["m"].dtype == np.bool_


def test_mask_inputs_are_zero_or_one():
    feeds = random_feeds([parse_input_spec("attention_mask:batch,seq:int64")], {"batch": 3, "seq": 9}, seed=1)
    mask = feeds["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1} and (mask[:, 0] == 1).all()


def test_fixed_batch_still_varies_other_symbolic_dims():
    cases = parity_cases([parse_input_spec("tokens:1,seq=16:int64")], (1, 4))
    assert [c.sizes for c in cases] == [{"seq": 16}, {"seq": 24}]
    assert [c.label for c in parity_cases([parse_input_spec("x:1,3")])] == ["static"]
