"""The cpp (extension, CPU) backends of the search ops (cosine_topk, ivf_topk) against raid_fast.ref.

Same kinds of cases as the triton tests in test_search_ops.py, plus what the C++ kernels make
distinct: dot blocks (D > 192), 8- and 16-wide remainder panels, lists longer than a chunk, lists
probed by more queries than one work item holds, query blocks, and results that do not depend on the
thread count (ties go to the smaller token id).
"""

from __future__ import annotations

import functools

import pytest
import torch

import raid_fast
from raid_fast import _dispatch, _ext, ops
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.similarity import cosine_topk_ref

from . import utils
from .utils import assert_topk_matches, cosine_admissible, make_lists, random_probes, strided, unit

check_cosine = functools.partial(utils.check_cosine, "cpp")
check_ivf = functools.partial(utils.check_ivf, "cpp")

if not _ext.HAS_EXT:
    pytest.skip(f"the extension is not built: {_ext.EXT_IMPORT_ERROR}", allow_module_level=True)


@pytest.mark.parametrize(
    "m, n, d, k",
    [
        (1, 70, 60, 7),
        (37, 200, 60, 7),
        (5, 20, 32, 30),
        (3, 1, 16, 4),
        (9, 600, 48, 150),
        (3, 300, 24, 256),
        (2, 700, 16, 512),
        (21, 333, 200, 10),  # two blocks of dims, a 16-wide remainder panel
        (24, 250, 384, 150),  # the benchmark's D and K, an 8-wide remainder panel
        (16, 97, 7, 3),  # D below one vector, one row past a chunk
    ],
    ids=lambda v: str(v),
)
def test_cosine_topk_matches_ref(m, n, d, k):
    check_cosine(unit(m, d), unit(n, d), k)


def test_cosine_topk_ranges_and_groups():
    m, n = 34, 260
    q, t = unit(m, 60), unit(n, 60)
    lo = torch.randint(0, n // 2, (m,))
    hi = lo + torch.randint(0, n // 2, (m,))
    hi[0] = lo[0]  # an empty range: nothing admissible
    hi[1] = lo[1] + 3  # fewer tokens than K
    group = torch.randint(0, 5, (n,))
    exclude = torch.randint(-1, 5, (m,))
    exclude[2] = -1
    dist, idx = check_cosine(q, t, 9, lo, hi, group, exclude)
    assert bool((idx[0] == -1).all())
    check_cosine(q, t, 9, lo, hi)
    check_cosine(q, t, 9, None, None, group, exclude)


def test_cosine_topk_class_ranges():
    # the retrieve() layout: consecutive queries share one class range, classes of uneven sizes
    bounds = torch.tensor([0, 130, 131, 400, 610])
    t = unit(610, 48)
    cls = torch.tensor([2, 0, 3, 2, 1])
    lo = bounds[cls].repeat_interleave(19)
    hi = bounds[cls + 1].repeat_interleave(19)
    check_cosine(unit(lo.shape[0], 48), t, 150, lo, hi)
    # ranges past either end of the database are clamped to it
    check_cosine(unit(3, 48), t, 20, torch.tensor([-5, 600, 700]), torch.tensor([50, 900, 800]))


def test_cosine_topk_exact_ties():
    t = unit(40, 16)
    tokens = torch.cat([t, t[:25], t[:10]])  # exact duplicates: groups of equal distances
    q = unit(6, 16)
    dist, idx = check_cosine(q, tokens, 12)
    # equal distances go to the smaller token id
    same = dist[:, 1:] == dist[:, :-1]
    assert bool((idx[:, 1:][same] > idx[:, :-1][same]).all())


def test_cosine_topk_non_contiguous_inputs():
    q = strided(unit(40, 60))  # [M, D] with strides (120, 2)
    t = unit(150, 60).T.contiguous().T  # column-major [N, D]
    assert not q.is_contiguous() and not t.is_contiguous()
    check_cosine(q, t, 7)


def test_cosine_topk_int32_ids():
    m, n = 10, 90
    lo = torch.randint(0, 40, (m,), dtype=torch.int32)
    hi = lo + 45
    group = torch.randint(0, 3, (n,), dtype=torch.int32)
    exclude = torch.randint(-1, 3, (m,), dtype=torch.int32)
    check_cosine(unit(m, 20), unit(n, 20), 8, lo, hi, group, exclude)


def test_cosine_topk_empty_inputs():
    dist, idx = _dispatch.call("cosine_topk", unit(0, 8), unit(10, 8), 5, None, None, None, None, backend="cpp")
    assert dist.shape == (0, 5) and idx.shape == (0, 5)
    dist, idx = _dispatch.call("cosine_topk", unit(3, 8), unit(0, 8), 5, None, None, None, None, backend="cpp")
    assert bool(torch.isinf(dist).all()) and bool((idx == -1).all())


def test_cosine_topk_query_blocks():
    # K = 5000 makes each running list 10k keys, so 500 queries need more than one query block
    check_cosine(unit(500, 16), unit(12000, 16), 5000)


@pytest.mark.parametrize("k", [7, 150, 256])
def test_ivf_topk_matches_ref(k):
    # an empty list, lists shorter than K, unused slots and one query with every slot unused
    offsets, tokens = make_lists([30, 0, 70, 5, 100, 41, 64], 60)
    m = 45
    probes = random_probes(m, 7, 3)
    probes[::4, 1] = -1
    probes[5] = -1
    dist, idx = check_ivf(unit(m, 60), probes, offsets, tokens, k)
    assert bool((idx[5] == -1).all())


def test_ivf_topk_benchmark_shape():
    # D = 384 (two blocks of dims), lists longer than a chunk, ~32 queries per list, K = 150
    offsets, tokens = make_lists([518, 97, 300, 611, 250, 402, 96, 480, 520, 333], 384)
    m = 70
    check_ivf(unit(m, 384), random_probes(m, 10, 5), offsets, tokens, 150)


def test_ivf_topk_many_queries_per_list():
    # 150 queries on each of 2 lists: several work items per list
    offsets, tokens = make_lists([150, 90], 32)
    probes = torch.stack([torch.zeros(150, dtype=torch.int64), torch.ones(150, dtype=torch.int64)], dim=1)
    probes[::2] = probes[::2].flip(1)
    check_ivf(unit(150, 32), probes, offsets, tokens, 16)


def test_ivf_topk_one_list_and_no_probes():
    offsets, tokens = make_lists([23], 20)
    q = unit(4, 20)
    check_ivf(q, torch.zeros(4, 1, dtype=torch.int64), offsets, tokens, 30)
    dist, idx = check_ivf(q, torch.full((4, 2), -1, dtype=torch.int64), offsets, tokens, 5)
    assert bool((idx == -1).all())
    # P = 0 (the reference cannot take it: torch.topk of an empty row)
    no_slots = torch.zeros(4, 0, dtype=torch.int64)
    dist, idx = _dispatch.call("ivf_topk", q, no_slots, offsets, tokens, 5, None, None, backend="cpp")
    assert dist.shape == (4, 5) and bool((idx == -1).all()) and bool(torch.isinf(dist).all())
    # only an empty list probed
    offsets, tokens = make_lists([10, 0], 20)
    check_ivf(q, torch.ones(4, 1, dtype=torch.int64), offsets, tokens, 5)


def test_ivf_topk_repeated_probe_counts_once():
    offsets, tokens = make_lists([12, 9], 16)
    q = unit(3, 16)
    dist, idx = _dispatch.call(
        "ivf_topk", q, torch.tensor([[0, 0, 1]] * 3), offsets, tokens, 25, None, None, backend="cpp"
    )
    ref_dist, ref_idx = ivf_topk_ref(q, torch.tensor([[0, 1]] * 3), offsets, tokens, 25)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, q, tokens, torch.ones(3, 21, dtype=torch.bool))


def test_ivf_topk_groups():
    offsets, tokens = make_lists([40, 33, 51], 24)
    m = 20
    group = torch.randint(0, 4, (tokens.shape[0],))
    exclude = torch.randint(-1, 4, (m,))
    check_ivf(unit(m, 24), random_probes(m, 3, 2), offsets, tokens, 12, group, exclude)


def test_ivf_topk_non_contiguous_and_empty():
    offsets, tokens = make_lists([25, 31, 18], 40)
    q = strided(unit(12, 40))
    probes = random_probes(12, 3, 2).T.contiguous().T  # column-major [M, P]
    assert not q.is_contiguous() and not probes.is_contiguous()
    check_ivf(q, probes, offsets, tokens, 10)
    dist, idx = check_ivf(unit(0, 40), probes[:0], offsets, tokens, 10)
    assert dist.shape == (0, 10)


def test_results_do_not_depend_on_threads():
    offsets, tokens = make_lists([300, 41, 260, 190, 77], 40)
    tokens = torch.cat([tokens[:400], tokens[:300], tokens[400:]])  # duplicates: exact ties
    offsets = torch.tensor([0, 300, 341, 700, 791, 868])
    q = unit(90, 40)
    probes = random_probes(90, 5, 3)
    runs = [_ext._C.ivf_topk(q, probes, offsets, tokens, 50, None, None, nt) for nt in (1, 2, 3)]
    runs += [_ext._C.cosine_topk(q, tokens, 50, None, None, None, None, nt) for nt in (1, 2, 3)]
    for a, b in ((0, 1), (0, 2), (3, 4), (3, 5)):
        assert torch.equal(runs[a][0], runs[b][0]) and torch.equal(runs[a][1], runs[b][1])
    # a single-list probe and the flat search over that list's range compute the same dots
    lo, hi = torch.full((90,), 700), torch.full((90,), 791)
    flat = _ext._C.cosine_topk(q, tokens, 50, lo, hi, None, None, 2)
    ivf = _ext._C.ivf_topk(q, torch.full((90, 1), 3), offsets, tokens, 50, None, None, 2)
    assert torch.equal(flat[0], ivf[0]) and torch.equal(flat[1], ivf[1])


def test_public_ops_pick_cpp():
    q, t = unit(4, 24), unit(50, 24)
    assert _dispatch.select("cosine_topk", q, t, 5, None, None, None, None) == "cpp"
    offsets = torch.tensor([0, 20, 50])
    probes = torch.tensor([[0, 1]] * 4)
    assert _dispatch.select("ivf_topk", q, probes, offsets, t, 5, None, None) == "cpp"
    assert raid_fast.backends()["cosine_topk"]["cpp"] == "ok"
    dist, idx = ops.cosine_topk(q, t, 5)
    assert_topk_matches(dist, idx, *cosine_topk_ref(q, t, 5), q, t, cosine_admissible(4, 50))
    dist, idx = ops.ivf_topk(q, probes, offsets, t, 5)
    assert_topk_matches(dist, idx, *ivf_topk_ref(q, probes, offsets, t, 5), q, t, cosine_admissible(4, 50))


def test_supports_reasons():
    q, t = unit(2, 8), unit(10, 8)
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot serve this call: queries must be torch.float32"):
        _dispatch.call("cosine_topk", q.double(), t.double(), 3, None, None, None, None, backend="cpp")
    with pytest.raises(RuntimeError, match=r"exclude_group needs token_group"):
        excl = torch.zeros(2, dtype=torch.int64)
        _dispatch.call("cosine_topk", q, t, 3, None, None, None, excl, backend="cpp")
    with pytest.raises(RuntimeError, match=r"lo and hi must be given together"):
        _dispatch.call("cosine_topk", q, t, 3, torch.zeros(2, dtype=torch.int64), None, None, None, backend="cpp")
    offsets, probes = torch.tensor([0, 10]), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"probes must be torch.int64 or torch.int32, got torch.float32"):
        _dispatch.call("ivf_topk", q, probes.float(), offsets, t, 3, None, None, backend="cpp")


def test_extension_checks():
    q, t = unit(2, 8), unit(10, 8)
    offsets = torch.tensor([0, 4, 10])
    with pytest.raises(RuntimeError, match=r"probes must be list ids in \[0, 2\) or -1, got 2"):
        _ext._C.ivf_topk(q, torch.tensor([[0], [2]]), offsets, t, 3, None, None, 1)
    with pytest.raises(RuntimeError, match=r"list_offsets must be non-decreasing"):
        _ext._C.ivf_topk(q, torch.tensor([[0], [1]]), torch.tensor([0, 6, 4]), t, 3, None, None, 1)
    with pytest.raises(RuntimeError, match=r"list_offsets must lie in \[0, 10\]"):
        _ext._C.ivf_topk(q, torch.tensor([[0], [1]]), torch.tensor([0, 4, 11]), t, 3, None, None, 1)
    with pytest.raises(RuntimeError, match=r"queries must be contiguous"):
        _ext._C.cosine_topk(strided(q), t, 3, None, None, None, None, 1)
    with pytest.raises(RuntimeError, match=r"hi must be \[2\]"):
        _ext._C.cosine_topk(
            q, t, 3, torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), None, None, 1
        )
    with pytest.raises(RuntimeError, match=r"k must be >= 1"):
        _ext._C.cosine_topk(q, t, 0, None, None, None, None, 1)


@pytest.mark.cuda
def test_cuda_tensors_are_refused():
    q, t = unit(2, 8).cuda(), unit(10, 8).cuda()
    with pytest.raises(RuntimeError, match=r"no CUDA search kernel"):
        _ext._C.cosine_topk(q, t, 3, None, None, None, None, 1)
    reason = _dispatch._REGISTRY["cosine_topk"]["cpp"].supports(q, t, 3)
    assert reason is not None and "CPU tensors" in reason
