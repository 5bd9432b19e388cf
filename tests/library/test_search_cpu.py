"""The cpp (extension, CPU) backends of the search ops (cosine_topk, ivf_topk): cases of their own.

The cases every fast backend runs are in test_search_backends.py. Here: what the C++ kernels make
distinct (the retrieve() layout of class ranges, int32 ids, query blocks, the benchmark shape with
lists longer than a chunk, repeated probes, results that do not depend on the thread count), the
public ops picking them, their argument checks and the extension's own.
"""

from __future__ import annotations

import functools

import pytest
import torch

import raid_fast
from raid_fast import _dispatch, _ext, ops
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.similarity import cosine_topk_ref
from tests import utils
from tests.utils import assert_topk_matches, cosine_admissible, make_lists, random_probes, strided, unit

check_cosine = functools.partial(utils.check_cosine, "cpp")
check_ivf = functools.partial(utils.check_ivf, "cpp")

if not _ext.HAS_EXT:
    pytest.skip(f"the extension is not built: {_ext.EXT_IMPORT_ERROR}", allow_module_level=True)


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


def test_cosine_topk_int32_ids():
    m, n = 10, 90
    lo = torch.randint(0, 40, (m,), dtype=torch.int32)
    hi = lo + 45
    group = torch.randint(0, 3, (n,), dtype=torch.int32)
    exclude = torch.randint(-1, 3, (m,), dtype=torch.int32)
    check_cosine(unit(m, 20), unit(n, 20), 8, lo, hi, group, exclude)


def test_cosine_topk_query_blocks():
    # K = 5000 makes each running list 10k keys, so 500 queries need more than one query block
    check_cosine(unit(500, 16), unit(12000, 16), 5000)


def test_ivf_topk_benchmark_shape():
    # D = 384 (two blocks of dims), lists longer than a chunk, ~32 queries per list, K = 150
    offsets, tokens = make_lists([518, 97, 300, 611, 250, 402, 96, 480, 520, 333], 384)
    m = 70
    check_ivf(unit(m, 384), random_probes(m, 10, 5), offsets, tokens, 150)


def test_ivf_topk_repeated_probe_counts_once():
    offsets, tokens = make_lists([12, 9], 16)
    q = unit(3, 16)
    dist, idx = _dispatch.call(
        "ivf_topk", q, torch.tensor([[0, 0, 1]] * 3), offsets, tokens, 25, None, None, backend="cpp"
    )
    ref_dist, ref_idx = ivf_topk_ref(q, torch.tensor([[0, 1]] * 3), offsets, tokens, 25)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, q, tokens, torch.ones(3, 21, dtype=torch.bool))


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
