"""Every op as the custom op ``torch.ops.raid_fast.<name>``: torch.library.opcheck (schema, fake
tensors against the real kernel, autograd registration, AOT dispatch) on compact and permuted
layouts, and the results equal the reference."""

import pytest
import torch
import torch.nn.functional as F

import raid_fast  # noqa: F401  (registers the ops)
from raid_fast.ops.schema import SCHEMAS
from raid_fast.ref.cost_volume import cost_volume_ref
from raid_fast.ref.similarity import cosine_topk_ref
from tests.utils import make_lists, unit


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.flip(0).contiguous().flip(0)[::1]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _cases():
    g = torch.Generator().manual_seed(0)
    q, t = unit(9, 12), unit(40, 12)
    lo = torch.tensor([0, 0, 5, 5, 10, 10, 20, 20, 30])
    hi = lo + 10
    group = torch.arange(40) // 8
    excl = torch.tensor([0, 1, -1, 2, 3, 4, -1, 0, 1])
    offsets, tokens = make_lists([5, 0, 7, 3, 9, 4], 12)
    probes = torch.tensor([[0, 2], [1, -1], [5, 3], [4, 0], [2, 1], [3, -1]])
    qi = unit(6, 12)
    sem = F.normalize(torch.randn(3, 4, 12, generator=g), dim=-1)
    bias = torch.zeros(3, 4)
    bias[1, 3] = float("-inf")
    x = torch.randn(30, 5, generator=g)
    offs = torch.tensor([0, 12, 12, 30])
    cents = torch.randn(3, 4, 5, generator=g)
    idx = torch.randint(0, 4, (30,), generator=g)
    return {
        "cosine_topk": [
            (q, t, 5),
            (q, t, 4, lo, hi, group, excl, True),
            (q * 3.0, t * 0.5, 6, None, None, None, None, False),
        ],
        "ivf_topk": [(qi, probes, offsets, tokens, 4), (qi, probes, offsets, tokens, 3, None, None)],
        "ivf_topk_cost_volume": [(qi, probes, offsets, tokens, 4, None, None, 1, 2, 3, 1.5)],
        "cost_volume": [(torch.rand(2, 6, 4, generator=g), 2, 3, 2.0)],
        "probe_prototypes": [
            (torch.randn(2, 5, 12, generator=g), sem, bias, torch.tensor([1, 0]), 2, 0),
            (torch.randn(2, 5, 12, generator=g), sem, bias, None, 3, 3, torch.randn(2, 12, generator=g), sem[:, 0]),
        ],
        "kmeans_assign": [(x, offs, 18, cents)],
        "kmeans_update": [(x, offs, 18, idx, 4, True)],
        "kmeans_step": [(x, offs, 18, cents, False)],
        "kmeans_plusplus": [(x, offs, 18, 4, torch.rand(3, 4, generator=g, dtype=torch.float64))],
    }


CASES = _cases()


def test_every_op_has_cases():
    assert set(CASES) == set(SCHEMAS)


@pytest.mark.parametrize("layout", ["compact", "permuted"])
@pytest.mark.parametrize(("name", "case"), [(n, i) for n, cases in CASES.items() for i in range(len(cases))])
def test_opcheck(name, case, layout):
    args = CASES[name][case]
    if layout == "permuted":
        args = tuple(_permuted(a) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        assert any(torch.is_tensor(a) and not a.is_contiguous() for a in args)
    torch.library.opcheck(getattr(torch.ops.raid_fast, name).default, args)


def test_opcheck_with_grad_inputs():
    q, t = unit(5, 8).requires_grad_(), unit(20, 8).requires_grad_()
    torch.library.opcheck(torch.ops.raid_fast.cosine_topk.default, (q, t, 3))
    dist, _ = torch.ops.raid_fast.cosine_topk(q, t, 3)
    assert not dist.requires_grad


def test_custom_op_results_equal_the_reference():
    q, t = unit(9, 12), unit(40, 12)
    dist, idx = torch.ops.raid_fast.cosine_topk(q, t, 5)
    ref_dist, ref_idx = cosine_topk_ref(q, t, 5)
    torch.testing.assert_close(dist, ref_dist)
    assert torch.equal(idx, ref_idx)
    d = torch.rand(2, 6, 4)
    torch.testing.assert_close(torch.ops.raid_fast.cost_volume(d, 2, 3, 2.0), cost_volume_ref(d, 2, 3, 2.0))


def test_op_never_returns_its_input():
    sem = F.normalize(torch.randn(3, 4, 12), dim=-1)
    ids = torch.tensor([1, 0])
    out_ids, *_ = torch.ops.raid_fast.probe_prototypes(torch.randn(2, 5, 12), sem, torch.zeros(3, 4), ids, 2, 0)
    assert torch.equal(out_ids, ids)
    assert out_ids.untyped_storage().data_ptr() != ids.untyped_storage().data_ptr()
