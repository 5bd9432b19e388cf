"""Triton backends of the search ops (cosine_topk, ivf_topk, ivf_topk_cost_volume, cost_volume)
against raid_fast.ref: the cases of their own (chunking, the public op, K = 256, the fused cost volume,
cost_volume, errors, registration); the cases every fast backend runs are in test_search_backends.py.

On CPU this runs under the Triton interpreter, which must be switched on before triton is imported:
``TRITON_INTERPRET=1 python -m pytest -m triton tests/library/test_search_triton.py`` (small shapes:
the interpreter is slow). On a GPU machine without TRITON_INTERPRET the kernels run compiled, on CUDA
tensors, sorting with tl.topk / tl.bitonic_merge, and with the min/max network too in the cases that
parametrize ``sort_impl`` (their ids name the network: ``-k network`` selects them).
"""

from __future__ import annotations

import functools

import pytest
import torch

import raid_fast
from raid_fast import _dispatch, ops
from raid_fast.ops.search import ivf_topk_cost_volume
from raid_fast.ref.cost_volume import cost_volume_ref
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.similarity import cosine_topk_ref
from tests import utils
from tests.utils import assert_close_verbose, assert_topk_matches, ivf_admissible, strided

INTERPRET = utils.triton_interpreted()
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported "
        "(TRITON_INTERPRET=1 python -m pytest -m triton tests/test_search_triton.py)",
        allow_module_level=True,
    )
kernels = pytest.importorskip("raid_fast.kernels")
if not kernels.HAS_TRITON:
    pytest.skip(f"triton is not importable: {kernels.TRITON_IMPORT_ERROR}", allow_module_level=True)

# a kernel module that fails to import fails the collection here, with its traceback, rather than
# skipping the file (test_triton_registration.py says the same for every module)
from raid_fast.kernels import cosine_filter  # noqa: E402
from raid_fast.kernels import cosine_topk as cosine_topk_module  # noqa: E402
from raid_fast.kernels.cosine_filter import FilterPlan, cosine_topk_filtered  # noqa: E402
from raid_fast.kernels.cosine_topk import cosine_topk_triton  # noqa: E402
from raid_fast.kernels.ivf_topk import ivf_topk_cost_volume_triton  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = utils.device_of("triton")
unit = functools.partial(utils.unit, device=DEVICE)
cosine_admissible = functools.partial(utils.cosine_admissible, device=DEVICE)
make_lists = functools.partial(utils.make_lists, device=DEVICE)
random_probes = functools.partial(utils.random_probes, device=DEVICE)
check_ivf = functools.partial(utils.check_ivf, "triton")


def check_cosine(
    queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None, _run=None, **launcher_kwargs
):
    # launcher keyword arguments (chunking, filter plan) go straight to the triton launcher ``_run``
    if _run is None and launcher_kwargs:
        _run = cosine_topk_triton
    run = functools.partial(_run, **launcher_kwargs) if _run is not None else None
    return utils.check_cosine("triton", queries, tokens, k, lo, hi, token_group, exclude_group, run=run)


# distances are 1 - q.t in fp32 on both sides; only the summation order differs
ATOL = 1e-5


@pytest.fixture(autouse=True, params=utils.triton_sort_networks()[:1])
def sort_impl(request, monkeypatch):
    """The sort network of each case: the one compiled runs use (``utils.triton_sort_networks()[0]``),
    every network where a case parametrizes ``sort_impl`` itself (one per sorting kernel: a compiled
    run never takes the others, and each is another set of kernels to compile)."""
    monkeypatch.setattr(cosine_topk_module, "NATIVE_SORT", request.param == "native")
    return request.param


@pytest.mark.parametrize("n_chunks", [1, 3, 50])
def test_cosine_topk_chunking(n_chunks):
    # the split of the token axis changes the partial lists the merge sees, never the result
    check_cosine(unit(33, 40), unit(450, 40), 20, n_chunks=n_chunks)


def test_cosine_topk_public_op():
    q, t = unit(4, 24), unit(50, 24)
    dist, idx = ops.cosine_topk(q, t, 5, backend="triton")
    assert_topk_matches(dist, idx, *cosine_topk_ref(q, t, 5), q, t, cosine_admissible(4, 50))


def test_cosine_topk_errors():
    q, t = unit(2, 8), unit(10, 8)
    limit = cosine_topk_module.MAX_K
    with pytest.raises(RuntimeError, match=rf"backend 'triton' cannot serve this call: k={limit + 1} is above"):
        _dispatch.call("cosine_topk", q, t, limit + 1, None, None, None, None, backend="triton")
    with pytest.raises(RuntimeError, match=r"queries must be torch.float32, got torch.float64"):
        _dispatch.call("cosine_topk", q.double(), t.double(), 3, None, None, None, None, backend="triton")
    with pytest.raises(RuntimeError, match=r"exclude_group needs token_group"):
        excl = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        _dispatch.call("cosine_topk", q, t, 3, None, None, None, excl, backend="triton")


# --- the filtered flat search (kernels/cosine_filter.py) -----------------------------------------


def check_filtered(queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None, **kwargs):
    return check_cosine(queries, tokens, k, lo, hi, token_group, exclude_group, _run=cosine_topk_filtered, **kwargs)


@pytest.mark.parametrize(
    "m, n, d, k, stride, cap",
    [
        (37, 900, 60, 7, 5, 80),  # odd D, K below a power of two
        (5, 600, 32, 30, 4, 240),
        (1, 70, 16, 4, 8, 40),  # a sample smaller than K: every token is a candidate
        (9, 1200, 48, 150, 2, 700),  # the default K: K_PAD = 256 = BN
        (3, 800, 24, 256, 2, 600),
    ],
    ids=lambda v: str(v),
)
def test_cosine_filtered_matches_ref(m, n, d, k, stride, cap):
    check_filtered(unit(m, d), unit(n, d), k, plan=FilterPlan(stride, cap))


@pytest.mark.parametrize("sort_impl", utils.triton_sort_networks(), indirect=True)
@pytest.mark.parametrize("n_chunks", [1, 4])
def test_cosine_filtered_ranges_groups_and_overflow(n_chunks, monkeypatch):
    m, n = 34, 700
    q, t = unit(m, 60), unit(n, 60)
    lo = torch.randint(0, n // 2, (m,), device=DEVICE)
    hi = lo + torch.randint(0, n // 2, (m,), device=DEVICE)
    hi[0] = lo[0]  # an empty range: nothing admissible
    hi[1] = lo[1] + 3  # fewer tokens than K
    group = torch.randint(0, 5, (n,), device=DEVICE)
    exclude = torch.randint(-1, 5, (m,), device=DEVICE)
    dist, idx = check_filtered(q, t, 9, lo, hi, group, exclude, plan=FilterPlan(5, 90), n_chunks=n_chunks)
    assert bool((idx[0] == -1).all())
    check_filtered(q, t, 9, lo, hi, plan=FilterPlan(3, 60), n_chunks=n_chunks)

    # a cap below the candidates of most queries: those go through the streaming search again
    searched = []

    def spy(queries, *args, **kwargs):
        searched.append(queries.shape[0])
        return cosine_topk_module.cosine_topk_triton(queries, *args, **kwargs)

    monkeypatch.setattr(cosine_filter, "cosine_topk_triton", spy)
    check_filtered(q, t, 9, None, None, group, exclude, plan=FilterPlan(5, 12), n_chunks=n_chunks)
    assert len(searched) == 2 and 0 < searched[1] <= m, searched  # the sample, then the overflow


def test_cosine_filtered_thresholds_are_lower_bounds():
    # the sampled K-th similarity never exceeds the true K-th one: the filter keeps the whole answer
    q, t, k = unit(40, 32), unit(1000, 32), 10
    thr = cosine_filter._sampled_thresholds(q, t, k, None, None, None, None, 7, 0.0)
    ref_dist, _ = cosine_topk_ref(q, t, k)
    assert bool((thr <= 1.0 - ref_dist[:, k - 1] + 1e-6).all())
    # and passes far fewer than all tokens: about K * S of them
    passed = ((q @ t.T) >= thr[:, None]).sum(dim=1).float().mean().item()
    assert k <= passed < 0.5 * t.shape[0], passed


def test_cosine_filtered_ties_and_non_contiguous():
    base = unit(300, 16)
    tokens = torch.cat([base, base[:200], base[:100]])  # exact duplicates: groups of equal distances
    check_filtered(unit(6, 16), tokens, 12, plan=FilterPlan(4, 200))
    q = strided(unit(20, 60))  # strides (120, 2)
    t = unit(500, 60).T.contiguous().T  # column-major
    check_filtered(q, t, 7, plan=FilterPlan(4, 100))


@pytest.mark.parametrize("half", [False, True], ids=["filter", "filter_fp16"])
def test_cosine_filtered_tie_order(half):
    # exact distances (multiples of 1/16) with duplicates: the candidates hold every token tied at
    # the K-th distance, and the answer is the reference's bitwise (equal distances by ascending id)
    m, n, d = (34, 700, 60) if not half else (30, 800, 32)
    plan = FilterPlan(5, 90) if not half else FilterPlan(5, 400)
    t = utils.tie_vectors(n // 2, d, device=DEVICE, seed=7)
    tokens = torch.cat([t, t])  # every token twice
    q = utils.tie_vectors(m, d, device=DEVICE, seed=8)
    lo = torch.randint(0, n // 2, (m,), device=DEVICE)
    hi = lo + torch.randint(0, n // 2, (m,), device=DEVICE)
    group = torch.randint(0, 5, (n,), device=DEVICE)
    exclude = torch.randint(-1, 5, (m,), device=DEVICE)
    kwargs = {"half": half, "plan": plan, **({"rerank": 16} if half else {})}
    for args in ((q, tokens, 9), (q, tokens, 9, lo, hi, group, exclude)):
        dist, idx = cosine_topk_filtered(*args, **kwargs)
        utils.assert_same_topk(dist, idx, *cosine_topk_ref(*args))


def test_cosine_filtered_empty_and_bad_plan():
    dist, idx = cosine_topk_filtered(unit(0, 8), unit(400, 8), 5, plan=FilterPlan(4, 40))
    assert dist.shape == (0, 5) and idx.shape == (0, 5)
    dist, idx = cosine_topk_filtered(unit(3, 8), unit(0, 8), 5, plan=FilterPlan(4, 40))
    assert bool(torch.isinf(dist).all()) and bool((idx == -1).all())
    with pytest.raises(ValueError, match=r"cap >= k=5"):
        cosine_topk_filtered(unit(3, 8), unit(40, 8), 5, plan=FilterPlan(4, 4))


def test_flat_search_switch(monkeypatch):
    # RAID_FAST_FLAT_SEARCH=filter / filter_fp16 route the public op through the filtered search
    # when it pays
    assert cosine_filter.filter_plan(300, 1) == FilterPlan(8, 32)
    assert cosine_filter.filter_plan(300, 20) is None  # N / K too small: the streaming search
    calls = []

    def spy(*args, **kwargs):
        calls.append((args[1].shape[0], kwargs["half"]))
        return cosine_topk_filtered(*args, **kwargs)

    monkeypatch.setattr(cosine_filter, "cosine_topk_filtered", spy)
    monkeypatch.setattr(cosine_filter, "FLAT_SEARCH", None)
    q, t = unit(5, 16), unit(300, 16)
    for search in ("filter", "filter_fp16"):
        monkeypatch.setenv("RAID_FAST_FLAT_SEARCH", search)
        dist, idx = ops.cosine_topk(q, t, 1, backend="triton")
        assert_topk_matches(dist, idx, *cosine_topk_ref(q, t, 1), q, t, cosine_admissible(5, 300))
    assert calls == [(300, False), (300, True)]
    monkeypatch.setenv("RAID_FAST_FLAT_SEARCH", "stream")
    ops.cosine_topk(q, t, 1, backend="triton")
    assert len(calls) == 2
    monkeypatch.setenv("RAID_FAST_FLAT_SEARCH", "radix")
    with pytest.raises(
        ValueError, match=r"RAID_FAST_FLAT_SEARCH must be one of \['stream', 'filter', 'filter_fp16'\], got 'radix'"
    ):
        ops.cosine_topk(q, t, 1, backend="triton")


@pytest.mark.parametrize(
    "m, n, d, k, rerank",
    [
        (37, 900, 60, 7, None),  # odd D; K2 = 32
        (20, 900, 64, 7, 16),  # K2 below the candidates: the certificate decides
        (9, 1200, 48, 150, None),  # K2 = 512
    ],
    ids=lambda v: str(v),
)
def test_cosine_filtered_fp16_matches_ref(m, n, d, k, rerank):
    stride = 4 if k > 100 else 8
    check_filtered(unit(m, d), unit(n, d), k, half=True, plan=FilterPlan(stride, 8 * k * stride), rerank=rerank)


def test_cosine_filtered_fp16_ranges_groups_ties_and_fallback(monkeypatch):
    m, n = 30, 800
    q, t = unit(m, 32), unit(n, 32)
    lo = torch.randint(0, n // 2, (m,), device=DEVICE)
    hi = lo + torch.randint(0, n // 2, (m,), device=DEVICE)
    hi[0] = lo[0]
    group = torch.randint(0, 5, (n,), device=DEVICE)
    exclude = torch.randint(-1, 5, (m,), device=DEVICE)
    check_filtered(q, t, 9, lo, hi, group, exclude, half=True, plan=FilterPlan(5, 400), rerank=16)
    tokens = torch.cat([t[:300], t[:200], t[:100]])  # exact duplicates
    check_filtered(q, tokens, 12, half=True, plan=FilterPlan(4, 400), rerank=16)

    # a slack so wide that no certificate holds: every query takes the streaming search again
    searched = []

    def spy(queries, *args, **kwargs):
        searched.append(queries.shape[0])
        return cosine_topk_module.cosine_topk_triton(queries, *args, **kwargs)

    real_slack = cosine_filter.filter_slack
    monkeypatch.setattr(cosine_filter, "filter_slack", lambda d, p: 1.0 if p == "fp16" else real_slack(d, p))
    monkeypatch.setattr(cosine_filter, "cosine_topk_triton", spy)
    check_filtered(q, t, 9, half=True, plan=FilterPlan(5, 900), rerank=16)
    assert searched == [m, m], searched  # the sample, then all of them


def test_half_tokens_copy_follows_the_tensor():
    t = unit(50, 16)
    first = cosine_filter.half_tokens(t)
    assert first.dtype == torch.float16 and cosine_filter.half_tokens(t) is first
    t[3] = -t[3]  # an in-place write moves the version counter: a fresh copy
    again = cosine_filter.half_tokens(t)
    assert again is not first and torch.equal(again, t.half())
    other = t.clone()
    assert cosine_filter.half_tokens(other) is not again


def test_cosine_filtered_bad_rerank():
    with pytest.raises(ValueError, match=r"rerank must be a power of two in \[k=5, 512\], got 24"):
        cosine_topk_filtered(unit(3, 8), unit(400, 8), 5, half=True, plan=FilterPlan(4, 40), rerank=24)


def test_filter_slack_orders_precisions():
    ieee, x3, tf32 = (cosine_filter.filter_slack(384, p) for p in ("ieee", "tf32x3", "tf32"))
    assert 0 < ieee < x3 < tf32 < 4e-3


def test_ivf_topk_k256():
    offsets, tokens = make_lists([120, 200, 90], 16)
    check_ivf(unit(5, 16), random_probes(5, 3, 2), offsets, tokens, 256)


def test_ivf_topk_fused_cost_volume():
    offsets, tokens = make_lists([40, 0, 30, 12], 28)
    b, h, w, k = 2, 3, 5, 20
    q = unit(b * h * w, 28)
    probes = random_probes(b * h * w, 4, 2)
    probes[3] = -1
    dist, idx, volume = ivf_topk_cost_volume_triton(q, probes, offsets, tokens, k, None, None, b, h, w, 0.75)
    ref_dist, ref_idx = ivf_topk_ref(q, probes, offsets, tokens, k)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, q, tokens, ivf_admissible(probes, offsets, tokens.shape[0]))
    assert volume.shape == (b, k, h, w) and volume.is_contiguous()
    assert_close_verbose("volume", volume, cost_volume_ref(ref_dist.view(b, h * w, k), h, w, 0.75), atol=ATOL, rtol=0)
    # nothing to search: the volume is all pad_cost
    _, _, empty = ivf_topk_cost_volume_triton(q, probes, offsets[:1], tokens[:0], k, None, None, b, h, w, 0.75)
    assert bool((empty == 0.75).all())


def test_ivf_topk_cost_volume_op_matches_composed_ref():
    # the dispatcher op on triton (fused merge) against the torch backend (ivf_topk_ref + cost_volume_ref)
    offsets, tokens = make_lists([26, 0, 35, 9, 17], 20)
    b, h, w, k = 2, 2, 3, 30  # K above most probed unions: pad_cost shows in the volume
    m = b * h * w
    q = unit(m, 20)
    probes = random_probes(m, 5, 2)
    probes[4, 1] = -1
    group = torch.randint(0, 3, (tokens.shape[0],), device=DEVICE)
    exclude = torch.randint(-1, 3, (m,), device=DEVICE)
    args = (q, probes, offsets, tokens, k, group, exclude, b, h, w, 1.5)
    dist, idx, volume = ivf_topk_cost_volume(*args, backend="triton")
    ref_dist, ref_idx, ref_volume = ivf_topk_cost_volume(*args, backend="torch")
    ok = ivf_admissible(probes, offsets, tokens.shape[0], group, exclude)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, q, tokens, ok)
    assert volume.shape == (b, k, h, w) and volume.dtype == torch.float32 and volume.is_contiguous()
    assert bool((ref_volume == 1.5).any()), "the case must have missing neighbours"
    assert_close_verbose("volume", volume, ref_volume, atol=ATOL, rtol=0)
    assert_close_verbose("volume", volume, cost_volume_ref(dist.view(b, h * w, k), h, w, 1.5), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"M = b \* h \* w = 10"):
        ivf_topk_cost_volume(q, probes, offsets, tokens, k, None, None, 2, 5, 1, backend="triton")


def test_ivf_topk_errors():
    offsets, tokens = make_lists([10], 8)
    q, probes = unit(2, 8), torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    limit = cosine_topk_module.MAX_K
    with pytest.raises(RuntimeError, match=rf"backend 'triton' cannot serve this call: k={limit + 1} is above"):
        _dispatch.call("ivf_topk", q, probes, offsets, tokens, limit + 1, None, None, backend="triton")
    with pytest.raises(RuntimeError, match=r"probes must be torch.int64 or torch.int32, got torch.float32"):
        _dispatch.call("ivf_topk", q, probes.float(), offsets, tokens, 3, None, None, backend="triton")
    with pytest.raises(ValueError, match=r"M = b \* h \* w"):
        ivf_topk_cost_volume_triton(q, probes, offsets, tokens, 3, None, None, 1, 1, 3)


@pytest.mark.parametrize("b, h, w, k", [(2, 3, 5, 7), (1, 9, 8, 150), (3, 1, 1, 1)], ids=lambda v: str(v))
def test_cost_volume_matches_ref(b, h, w, k):
    dist = torch.rand(b, h * w, k, device=DEVICE).sort(dim=-1).values
    dist[..., k // 2 :][torch.rand(b, h * w, k - k // 2, device=DEVICE) < 0.3] = float("inf")
    out = _dispatch.call("cost_volume", dist, h, w, 2.5, backend="triton")
    assert out.is_contiguous()
    assert_close_verbose("volume", out, cost_volume_ref(dist, h, w, 2.5), atol=0, rtol=0)


def test_cost_volume_non_contiguous_and_empty():
    dist = torch.rand(6, 4, 3, device=DEVICE).transpose(0, 1)  # [B=4, L=6, K=3], non-contiguous
    dist[0, 1, 2] = float("inf")
    out = _dispatch.call("cost_volume", dist, 2, 3, 1.0, backend="triton")
    assert_close_verbose("volume", out, cost_volume_ref(dist, 2, 3, 1.0), atol=0, rtol=0)
    assert ops.cost_volume(dist[:0], 2, 3, backend="triton").shape == (0, 3, 2, 3)


def test_cost_volume_errors():
    with pytest.raises(RuntimeError, match=r"dist must be torch.float32, got torch.float64"):
        _dispatch.call("cost_volume", torch.rand(1, 4, 2, device=DEVICE).double(), 2, 2, 1.0, backend="triton")


def test_registered_and_auto_policy():
    table = raid_fast.backends()
    for op in ("cosine_topk", "ivf_topk", "ivf_topk_cost_volume", "cost_volume"):
        assert table[op]["triton"].startswith("ok"), table[op]
    if INTERPRET:
        # auto never picks interpreted kernels
        q, t = unit(2, 8), unit(10, 8)
        assert _dispatch.select("cosine_topk", q, t, 3, None, None, None, None) != "triton"
        offsets, probes = torch.tensor([0, 10]), torch.zeros(2, 1, dtype=torch.int64)
        fused = (q, probes, offsets, t, 3, None, None, 1, 1, 2, 1.0)
        assert _dispatch.select("ivf_topk_cost_volume", *fused) != "triton"
