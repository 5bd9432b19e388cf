"""The fast backends of the search ops (cosine_topk, ivf_topk) against raid_fast.ref, case by case.

Every case runs on each fast backend of the op (``cpp``; ``triton`` with the sort network compiled
runs use, every network in the ``every_sort`` cases; ``cuda`` where one is registered) and is
checked against the torch reference, never against another fast backend. A backend that is
unavailable here skips with its reason; triton cases carry the ``triton`` mark. On CPU the triton
kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so
their case lists stay small; the cpp lists add shapes that cross the C++ kernels' dot blocks,
remainder panels and work items. Cases for one backend only live in test_search_cpu.py and
test_search_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from raid_fast import _dispatch
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.similarity import cosine_topk_ref
from tests.utils import (
    assert_same_topk,
    check_cosine,
    check_ivf,
    device_of,
    fast_backend_params,
    make_lists,
    random_probes,
    strided,
    tie_vectors,
    triton_sort_networks,
    unit,
)


def over_backends(op: str, argnames: tuple[str, ...] = (), cases=((),), every_sort: bool = False, **backend_cases):
    """``parametrize`` of (backend, *argnames): every fast backend of ``op`` with ``cases``, or with
    ``backend_cases[name]`` where that backend has its own list.

    Triton runs with the sort network compiled runs use (``triton_sort_networks()[0]``: native when
    compiled, the min/max one interpreted); ``every_sort`` adds the other networks, which compiled
    runs never take: one case per sorting kernel suffices, and each network of each case is another
    set of kernels for a GPU run to compile.
    """
    sorts = triton_sort_networks() if every_sort else triton_sort_networks()[:1]
    params = []
    for param in fast_backend_params(op):
        (name,) = param.values
        # the value names the variant; the ``backend`` fixture turns it into the backend's name
        variants = [f"triton-{sort}" for sort in sorts] if name == "triton" else [name]
        for variant in variants:
            for case in backend_cases.get(name, cases):
                case_id = "-".join(str(v) for v in (variant, *case))
                params.append(pytest.param(variant, *case, id=case_id, marks=param.marks))
    return pytest.mark.parametrize(["backend", *argnames], params, indirect=["backend"])


@pytest.fixture
def backend(request, monkeypatch):
    """The backend a case runs on; a triton case first fixes the sort network its variant names."""
    name, _, sort = request.param.partition("-")
    if name == "triton":
        # imported here: without triton every triton case skips before its fixtures are set up
        from raid_fast.kernels import cosine_topk as cosine_topk_module

        monkeypatch.setattr(cosine_topk_module, "NATIVE_SORT", sort == "native")
    return name


COSINE_SHAPES = [
    (1, 70, 60, 7),
    (37, 200, 60, 7),
    (5, 20, 32, 30),
    (3, 1, 16, 4),
    (9, 600, 48, 150),
    (3, 300, 24, 256),
    (2, 700, 16, 512),
]
CPP_COSINE_SHAPES = [
    *COSINE_SHAPES,
    (21, 333, 200, 10),  # two blocks of dims, a 16-wide remainder panel
    (24, 250, 384, 150),  # the benchmark's D and K, an 8-wide remainder panel
    (16, 97, 7, 3),  # D below one vector, one row past a chunk
]


@over_backends("cosine_topk", ("m", "n", "d", "k"), COSINE_SHAPES, cpp=CPP_COSINE_SHAPES)
def test_cosine_topk_matches_ref(backend, m, n, d, k):
    dev = device_of(backend)
    check_cosine(backend, unit(m, d, device=dev), unit(n, d, device=dev), k)


@over_backends("cosine_topk", every_sort=True)
def test_cosine_topk_ranges_and_groups(backend):
    dev = device_of(backend)
    m, n = 34, 260
    q, t = unit(m, 60, device=dev), unit(n, 60, device=dev)
    lo = torch.randint(0, n // 2, (m,), device=dev)
    hi = lo + torch.randint(0, n // 2, (m,), device=dev)
    hi[0] = lo[0]  # an empty range: nothing admissible
    hi[1] = lo[1] + 3  # fewer tokens than K
    group = torch.randint(0, 5, (n,), device=dev)
    exclude = torch.randint(-1, 5, (m,), device=dev)
    exclude[2] = -1
    dist, idx = check_cosine(backend, q, t, 9, lo, hi, group, exclude)
    assert bool((idx[0] == -1).all())
    check_cosine(backend, q, t, 9, lo, hi)
    check_cosine(backend, q, t, 9, None, None, group, exclude)


@over_backends("cosine_topk")
def test_cosine_topk_exact_ties(backend):
    dev = device_of(backend)
    t = unit(40, 16, device=dev)
    tokens = torch.cat([t, t[:25], t[:10]])  # exact duplicates: groups of equal distances
    q = unit(6, 16, device=dev)
    dist, idx = check_cosine(backend, q, tokens, 12)
    # equal distances go to the smaller token id on every backend
    same = dist[:, 1:] == dist[:, :-1]
    assert bool((idx[:, 1:][same] > idx[:, :-1][same]).all())


def lexicographic_topk(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie rule by its definition: per row, the k smallest (distance, id) pairs, sorted."""
    rows = [sorted((d, i) for i, d in enumerate(row.tolist()) if d != float("inf"))[:k] for row in dist]
    rows = [r + [(float("inf"), -1)] * (k - len(r)) for r in rows]
    return torch.tensor([[d for d, _ in r] for r in rows]), torch.tensor([[i for _, i in r] for r in rows])


@pytest.mark.parametrize("block", [7, 16384])
def test_reference_tie_rule(block, monkeypatch):
    # the references define the order inside a tie: ascending id, the smallest ids kept where K cuts
    # a group. Checked against the definition, across database blocks (block 7) and lists
    from raid_fast.ref import similarity

    monkeypatch.setattr(similarity, "BLOCK", block)
    t = tie_vectors(30, 16, seed=5)
    tokens = torch.cat([t, t[:20], t[5:25]])  # [70, 16]
    q = tie_vectors(6, 16, seed=6)
    dist = 1.0 - q @ tokens.T  # [6, 70] exact
    lo, hi = torch.tensor([0, 3, 30, 0, 69, 10]), torch.tensor([70, 50, 70, 2, 70, 10])
    group, exclude = torch.arange(70) % 3, torch.tensor([-1, 0, 1, 2, 0, 1])
    ids = torch.arange(70)
    hidden = (ids < lo[:, None]) | (ids >= hi[:, None]) | (group == exclude[:, None])  # [6, 70]
    for k in (1, 9, 40, 80):
        assert_same_topk(*cosine_topk_ref(q, tokens, k), *lexicographic_topk(dist, k))
        ref = cosine_topk_ref(q, tokens, k, lo, hi, group, exclude)
        assert_same_topk(*ref, *lexicographic_topk(dist.masked_fill(hidden, float("inf")), k))
        # the inverted lists 0-19, 20-49, 50-69 (ids in list order), probed in either slot order
        offsets = torch.tensor([0, 20, 50, 70])
        probes = torch.tensor([[0, 2], [2, 1], [1, -1], [0, 1], [2, 0], [-1, 1]])
        owner = torch.bucketize(ids, offsets[1:], right=True)  # [70] list of each token
        unprobed = (owner[None, :, None] != probes[:, None, :]).all(dim=2)  # [6, 70]
        ref = ivf_topk_ref(q, probes, offsets, tokens, k, group, exclude)
        want = lexicographic_topk(dist.masked_fill(unprobed | (group == exclude[:, None]), float("inf")), k)
        assert_same_topk(*ref, *want)


@over_backends("cosine_topk", ("k",), [(1,), (13,)])
def test_cosine_topk_tie_order(backend, k):
    # exact distances (multiples of 1/16) and exact duplicates: many groups of equal distances, some
    # cut by K. The answer is the reference's bitwise, ids of a tie ascending and the smallest kept
    dev = device_of(backend)
    t = tie_vectors(50, 60, device=dev, seed=1)
    tokens = torch.cat([t, t[:30], t[:10]])  # [90, 60]
    q = tie_vectors(7, 60, device=dev, seed=2)
    q[0] = t[3]  # a query equal to a token: distance 0 for ids 3, 53 and 83
    args = (q, tokens, k, None, None, None, None)
    dist, idx = _dispatch.call("cosine_topk", *args, backend=backend)
    ref_dist, ref_idx = cosine_topk_ref(*args)
    assert_same_topk(dist, idx, ref_dist, ref_idx)
    if k >= 3:
        assert idx[0, :3].tolist() == [3, 53, 83]
    # with class ranges and excluded groups: the ties inside what each query may see
    lo = torch.tensor([0, 5, 40, 0, 60, 10, 0], device=dev)
    hi = torch.tensor([90, 70, 90, 45, 90, 11, 90], device=dev)
    group = torch.arange(90, device=dev) % 4
    exclude = torch.tensor([-1, 0, 1, 2, 3, 0, 1], device=dev)
    args = (q, tokens, k, lo, hi, group, exclude)
    dist, idx = _dispatch.call("cosine_topk", *args, backend=backend)
    assert_same_topk(dist, idx, *cosine_topk_ref(*args))


@over_backends("cosine_topk")
def test_cosine_topk_non_contiguous_inputs(backend):
    dev = device_of(backend)
    q = strided(unit(40, 60, device=dev))  # [M, D] with strides (120, 2)
    t = unit(150, 60, device=dev).T.contiguous().T  # column-major [N, D]
    assert not q.is_contiguous() and not t.is_contiguous()
    check_cosine(backend, q, t, 7)


@over_backends("cosine_topk")
def test_cosine_topk_empty_inputs(backend):
    dev = device_of(backend)
    q, t = unit(0, 8, device=dev), unit(10, 8, device=dev)
    dist, idx = _dispatch.call("cosine_topk", q, t, 5, None, None, None, None, backend=backend)
    assert dist.shape == (0, 5) and idx.shape == (0, 5)
    q, t = unit(3, 8, device=dev), unit(0, 8, device=dev)
    dist, idx = _dispatch.call("cosine_topk", q, t, 5, None, None, None, None, backend=backend)
    assert bool(torch.isinf(dist).all()) and bool((idx == -1).all())


@over_backends("ivf_topk", ("k",), [(7,), (150,)], cpp=[(7,), (150,), (256,)])
def test_ivf_topk_matches_ref(backend, k):
    dev = device_of(backend)
    # an empty list, lists shorter than K, unused slots and one query with every slot unused
    offsets, tokens = make_lists([30, 0, 70, 5, 100, 41, 64], 60, device=dev)
    m = 45
    probes = random_probes(m, 7, 3, device=dev)
    probes[::4, 1] = -1
    probes[5] = -1
    dist, idx = check_ivf(backend, unit(m, 60, device=dev), probes, offsets, tokens, k)
    assert bool((idx[5] == -1).all())


@over_backends("ivf_topk", ("m",), [(150,)], triton=[(90,)])
def test_ivf_topk_many_queries_per_list(backend, m):
    dev = device_of(backend)
    # m queries on each of 2 lists, m (query, slot) pairs per list: several work items per list
    offsets, tokens = make_lists([150, 90], 32, device=dev)
    probes = torch.stack([torch.zeros(m, dtype=torch.int64), torch.ones(m, dtype=torch.int64)], dim=1).to(dev)
    probes[::2] = probes[::2].flip(1)
    check_ivf(backend, unit(m, 32, device=dev), probes, offsets, tokens, 16)


@over_backends("ivf_topk")
def test_ivf_topk_one_list_and_no_probes(backend):
    dev = device_of(backend)
    offsets, tokens = make_lists([23], 20, device=dev)
    q = unit(4, 20, device=dev)
    check_ivf(backend, q, torch.zeros(4, 1, dtype=torch.int64, device=dev), offsets, tokens, 30)
    dist, idx = check_ivf(backend, q, torch.full((4, 2), -1, dtype=torch.int64, device=dev), offsets, tokens, 5)
    assert bool((idx == -1).all())
    # P = 0 (the reference cannot take it: torch.topk of an empty row)
    no_slots = torch.zeros(4, 0, dtype=torch.int64, device=dev)
    dist, idx = _dispatch.call("ivf_topk", q, no_slots, offsets, tokens, 5, None, None, backend=backend)
    assert dist.shape == (4, 5) and bool((idx == -1).all()) and bool(torch.isinf(dist).all())
    # only an empty list probed
    offsets, tokens = make_lists([10, 0], 20, device=dev)
    check_ivf(backend, q, torch.ones(4, 1, dtype=torch.int64, device=dev), offsets, tokens, 5)


@over_backends("ivf_topk", ("k",), [(1,), (13,)])
def test_ivf_topk_tie_order(backend, k):
    # exact ties inside a list and across the probed lists (duplicates in several lists): the
    # reference's answer bitwise, equal distances by ascending global id
    dev = device_of(backend)
    t = tie_vectors(40, 60, device=dev, seed=3)
    tokens = torch.cat([t[:25], t[:15], t[10:40], t[:20]])  # lists of 25, 15, 30 and 20 tokens
    offsets = torch.tensor([0, 25, 40, 70, 90], device=dev)
    q = tie_vectors(9, 60, device=dev, seed=4)
    probes = torch.tensor([[0, 1], [3, 1], [2, 0], [1, -1], [3, 2], [0, 3], [2, -1], [1, 2], [3, 0]], device=dev)
    args = (q, probes, offsets, tokens, k, None, None)
    dist, idx = _dispatch.call("ivf_topk", *args, backend=backend)
    assert_same_topk(dist, idx, *ivf_topk_ref(*args))
    group = torch.arange(90, device=dev) % 3
    exclude = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0], device=dev)
    args = (q, probes, offsets, tokens, k, group, exclude)
    dist, idx = _dispatch.call("ivf_topk", *args, backend=backend)
    assert_same_topk(dist, idx, *ivf_topk_ref(*args))


@over_backends("ivf_topk", every_sort=True)
def test_ivf_topk_groups(backend):
    dev = device_of(backend)
    offsets, tokens = make_lists([40, 33, 51], 24, device=dev)
    m = 20
    group = torch.randint(0, 4, (tokens.shape[0],), device=dev)
    exclude = torch.randint(-1, 4, (m,), device=dev)
    check_ivf(backend, unit(m, 24, device=dev), random_probes(m, 3, 2, device=dev), offsets, tokens, 12, group, exclude)


@over_backends("ivf_topk")
def test_ivf_topk_non_contiguous_and_empty(backend):
    dev = device_of(backend)
    offsets, tokens = make_lists([25, 31, 18], 40, device=dev)
    q = strided(unit(12, 40, device=dev))
    probes = random_probes(12, 3, 2, device=dev).T.contiguous().T  # column-major [M, P]
    assert not q.is_contiguous() and not probes.is_contiguous()
    check_ivf(backend, q, probes, offsets, tokens, 10)
    dist, idx = check_ivf(backend, unit(0, 40, device=dev), probes[:0], offsets, tokens, 10)
    assert dist.shape == (0, 10)
