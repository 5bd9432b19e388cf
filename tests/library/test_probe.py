"""The prototype probe of hierarchical retrieval (normalise, score, top-P, gather): every backend
against the torch reference."""

import pytest
import torch
import torch.nn.functional as F

from raid_fast import _dispatch
from raid_fast.ref.probe import probe_prototypes_ref
from tests.utils import backend_params, device_of


def make_prototypes(c, s, d, used, seed=0):
    """[C, S, D] unit prototypes with rows >= used[c] zero, and the matching bias [C, S]."""
    gen = torch.Generator().manual_seed(seed)
    sem = F.normalize(torch.randn(c, s, d, generator=gen), dim=-1)
    slots = torch.arange(s)[None, :] < torch.tensor(used)[:, None]  # [C, S]
    sem = sem * slots[..., None]
    bias = torch.zeros(c, s).masked_fill(~slots, float("-inf"))
    return sem, bias


def probe_backends():
    return [p for p in backend_params("probe_prototypes") if p.id != "torch"]


# (B, L, D, S, slots used per class, P): P = S, P beyond a class's slots (-1 probes), L = 1, odd D,
# D = 384 with S = 50, more slots than one block of 64
CASES = [
    (2, 20, 16, 6, [6, 3], 2),
    (3, 7, 60, 9, [9, 9, 4], 9),
    (1, 1, 3, 5, [2], 4),
    (2, 37, 384, 50, [50, 41], 5),
    (1, 40, 32, 100, [100], 7),
]


@pytest.mark.triton
@pytest.mark.parametrize("backend", probe_backends())
@pytest.mark.parametrize("b,n_pos,d,s,used,p", CASES, ids=[f"B{c[0]}-L{c[1]}-D{c[2]}-S{c[3]}-P{c[5]}" for c in CASES])
def test_probe_matches_reference(backend, b, n_pos, d, s, used, p):
    dev = device_of(backend)
    sem, bias = make_prototypes(len(used), s, d, used)
    q = 3 * torch.randn(b, n_pos, d)
    ids = torch.arange(b) % len(used)
    got_ids, qn, probes, proto = _dispatch.call(
        "probe_prototypes", q.to(dev), sem.to(dev), bias.to(dev), ids.to(dev), p, backend=backend
    )
    _, ref_qn, ref_probes, ref_proto = probe_prototypes_ref(q, sem, bias, ids, p)
    assert torch.equal(got_ids.cpu(), ids)
    assert qn.shape == (b * n_pos, d) and probes.shape == (b, n_pos, p) and proto.shape == (b, n_pos, d)
    assert torch.allclose(qn.cpu(), ref_qn, atol=1e-6, rtol=1e-5)
    # random scores have no ties: the same prototypes in the same (descending) order
    assert torch.equal(probes.cpu(), ref_probes)
    assert torch.equal(proto.cpu(), ref_proto)
    unused = ref_probes == -1
    assert bool(unused.any()) == any(p > u for u in (used[i] for i in ids.tolist()))


@pytest.mark.triton
@pytest.mark.parametrize("backend", probe_backends())
def test_probe_strided_queries_and_ties(backend):
    dev = device_of(backend)
    sem, bias = make_prototypes(2, 4, 16, [4, 4])
    sem[1, 2] = sem[1, 0]  # a duplicate prototype: an exact tie goes to the smaller slot
    grid = torch.randn(2, 16, 3, 5)  # [B, D, H, W] as a backbone gives it
    q = grid.flatten(2).transpose(1, 2)  # [B, 15, 16], non-contiguous
    q[1, 4] = sem[1, 0] * 2
    ids = torch.tensor([0, 1])
    _, qn, probes, proto = _dispatch.call(
        "probe_prototypes", q.to(dev), sem.to(dev), bias.to(dev), ids.to(dev), 3, backend=backend
    )
    _, ref_qn, ref_probes, ref_proto = probe_prototypes_ref(q.contiguous(), sem, bias, ids, 3)
    assert torch.allclose(qn.cpu(), ref_qn, atol=1e-6)
    # every token of image 1 sees the tie of slots 0 and 2: compare the scores of the probes taken
    sims = torch.einsum("bld,bsd->bls", ref_qn.view(2, 15, 16), sem[ids]) + bias[ids][:, None, :]  # [B, L, S]
    local = probes.cpu() - (ids * 4).view(2, 1, 1)
    ref_local = ref_probes - (ids * 4).view(2, 1, 1)
    assert torch.allclose(sims.gather(2, local), sims.gather(2, ref_local), atol=1e-6)
    # the tied pair comes out smaller slot first; untied image 0 matches exactly
    assert probes.cpu()[1, 4, :2].tolist() == [4 + 0, 4 + 2]
    assert torch.equal(probes.cpu()[0], ref_probes[0])
    assert torch.equal(proto.cpu(), ref_proto)


@pytest.mark.triton
@pytest.mark.parametrize("backend", probe_backends())
def test_probe_no_queries(backend):
    dev = device_of(backend)
    sem, bias = make_prototypes(1, 4, 8, [4])
    _, qn, probes, proto = _dispatch.call(
        "probe_prototypes",
        torch.zeros(0, 5, 8, device=dev),
        sem.to(dev),
        bias.to(dev),
        torch.zeros(0, dtype=torch.int64, device=dev),
        2,
        backend=backend,
    )
    assert qn.shape == (0, 8) and probes.shape == (0, 5, 2) and proto.shape == (0, 5, 8)


@pytest.mark.triton
@pytest.mark.parametrize("backend", probe_backends())
@pytest.mark.parametrize("n_cls,n_pos", [(3, 20), (20, 5), (1, 7), (4, 0)], ids=["C3", "C20", "C1", "no-tokens"])
def test_probe_routes_by_cls(backend, n_cls, n_pos):
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(5)
    d, s = 24, 6
    sem, bias = make_prototypes(n_cls, s, d, [s - (c % 2) for c in range(n_cls)])
    class_protos = F.normalize(torch.randn(n_cls, d, generator=gen), dim=-1)
    b = 5
    q = torch.randn(b, n_pos, d, generator=gen)
    # CLS tokens near given prototypes, at several scales, one of them a non-contiguous view
    want = torch.arange(b) % n_cls
    query_cls = (class_protos[want] + 0.1 * torch.randn(b, d, generator=gen)) * torch.tensor([1.0, 5, 0.2, 30, 1])[
        :, None
    ]
    query_cls = torch.stack([query_cls, -query_cls], 2)[:, :, 0]  # [B, D] with stride (2D, 2)
    assert not query_cls.is_contiguous()
    args = (q, sem, bias, None, 3, 0, query_cls, class_protos)
    got = _dispatch.call("probe_prototypes", *(a.to(dev) if torch.is_tensor(a) else a for a in args), backend=backend)
    ref = probe_prototypes_ref(*args)
    assert torch.equal(ref[0], want)
    assert torch.equal(got[0].cpu(), ref[0])
    assert torch.allclose(got[1].cpu(), ref[1], atol=1e-6)
    assert torch.equal(got[2].cpu(), ref[2]) and torch.equal(got[3].cpu(), ref[3])
