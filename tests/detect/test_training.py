"""Training loop of the guided MoE filter: steps, leave-one-out, checkpoints, resume, selection, config."""

import pytest
import torch

import raid_fast as rf
from raid_fast.detect import checkpoints, detector
from raid_fast.detect import training as rt
from raid_fast.detect.filter import GuidedMoEFilter, total_loss
from raid_fast.detect.synthesis import AnomalySynthesizer


class ToyBackbone:
    """A fixed random conv 'backbone' (stride 4): tokens [B, h*w, D], cls [B, D]."""

    def __init__(self, dim=8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(dim, 3, 4, 4, generator=gen)

    def __call__(self, images):
        feats = torch.nn.functional.conv2d(torch.as_tensor(images), self.weight, stride=4)  # [B, D, h, w]
        tokens = feats.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1), tuple(feats.shape[-2:])


def make_setup(n=12, size=32):
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(2, 3, 1, 1, generator=gen)
    images = (0.6 * base.repeat_interleave(n // 2, 0) + 0.4 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)
    labels = torch.arange(2).repeat_interleave(n // 2)
    bb = ToyBackbone()
    tokens, cls, _ = bb(images)
    db = rf.TokenDatabase.build(tokens, cls, labels=labels, n_semantic=3, kmeans_iters=3)
    return bb, db, images, torch.arange(n)


def cfg(tmp_path=None, **kw):
    base = dict(epochs=2, batch_size=4, k=6, nprobe=2, val_fraction=0.2, p_normal=0.3, lr=1e-3, seed=0)
    base.update(kw)
    return rt.TrainConfig(out_dir=None if tmp_path is None else str(tmp_path), **base)


def small_filter(seed=0):
    torch.manual_seed(seed)
    return GuidedMoEFilter(dim=8, k=6)


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    bb, db, images, ids = make_setup()
    det = rf.Detector(bb, db, k=6, nprobe=2)
    filter = small_filter()
    synth = AnomalySynthesizer(p_normal=0.0, seed=0)
    x, y = rt.synthesize(synth, images[:4], [[0, i] for i in range(4)])
    assert y.shape == (4, 32, 32) and float(y.sum()) > 0
    cls = db.image_class[ids[:4]]
    opt = torch.optim.Adam(filter.parameters(), lr=1e-3)

    def loss_now():
        m_up, aux, _ = rt.forward_batch(det, filter, x, ids[:4], cls, dense_router=True)
        assert m_up.shape == y.shape
        return total_loss(m_up, y, aux)

    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert float(loss_now().detach()) < float(before.detach())


def test_leave_one_out_and_known_class(monkeypatch):
    bb, db, images, ids = make_setup()
    seen = []
    real = detector.retrieve

    def spy(tokens, db_, **kw):
        seen.append((kw["exclude_images"].clone(), kw["class_ids"].clone(), tokens.shape[0]))
        res = real(tokens, db_, **kw)
        # no retrieved token belongs to the query's own image
        own = db_.token_image[res.idx.clamp_min(0)]
        valid = res.idx >= 0
        assert not bool(((own == kw["exclude_images"][:, None, None]) & valid).any())
        return res

    monkeypatch.setattr(detector, "retrieve", spy)
    rt.train(cfg(epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    assert seen
    for ex, cls, b in seen:
        assert ex.shape == (b,) and bool((ex >= 0).all())
        assert torch.equal(cls, db.image_class[ex])
    # the ids of the training queries were excluded: every image appears, across train + held-out
    assert set(torch.cat([s[0] for s in seen]).tolist()) == set(ids.tolist())


def test_without_exclusion_a_template_retrieves_itself():
    """Control for the test above: without exclude_images the 1-NN cost of a template is 0."""
    bb, db, images, ids = make_setup()
    det = rf.Detector(bb, db, k=6, nprobe=2)
    s_in, _ = det.score_maps(images[:2], class_ids=db.image_class[:2])
    s_out, _ = det.score_maps(images[:2], class_ids=db.image_class[:2], exclude_images=ids[:2])
    assert float(s_in.abs().max()) < 1e-5 and float(s_out.min()) > 1e-4


def test_checkpoint_round_trip(tmp_path):
    bb, db, images, ids = make_setup()
    filter, hist = rt.train(cfg(tmp_path, epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    loaded, ckpt = checkpoints.load_checkpoint(tmp_path / "last.pt")
    for (n, a), (_, b) in zip(filter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert ckpt["epoch"] == 1 and ckpt["step"] == len(hist["step_loss"]) and ckpt["config"]["k"] == 6
    assert set(ckpt) >= {"model", "optimizer", "config", "epoch", "step", "history", "rng"}
    assert rt.TrainConfig(**ckpt["config"]) == cfg(tmp_path, epochs=1)
    assert (tmp_path / "best.pt").is_file() and not list(tmp_path.glob(".*tmp*"))
    assert len(hist["epochs"]) == 1 and {"val_loss", "val_p_auroc"} <= set(hist["epochs"][0])


def test_resume_equals_uninterrupted_run(tmp_path):
    bb, db, images, ids = make_setup()
    a, hist_a = rt.train(cfg(tmp_path / "a"), bb, db, images, ids, filter=small_filter(), progress=False)
    rt.train(cfg(tmp_path / "b", epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    b, hist_b = rt.train(cfg(tmp_path / "b"), bb, db, images, ids, filter=small_filter(7), resume=True, progress=False)
    for (n, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(wa, wb, atol=1e-6, rtol=0), n
    assert hist_a["step_loss"] == pytest.approx(hist_b["step_loss"], abs=1e-6)
    assert [e["epoch"] for e in hist_b["epochs"]] == [1, 2]


def test_best_checkpoint_follows_the_heldout_metric(tmp_path):
    bb, db, images, ids = make_setup()
    scripted = iter([0.6, 0.9, 0.7])
    calls = []

    def fake_eval(det, filter, imgs, masks, img_ids, cls, batch_size, dense_router, amp):
        calls.append((imgs.shape[0], float(masks.sum()) > 0, img_ids.clone()))
        return {"p_auroc": next(scripted), "loss": 1.0}

    rt.train(cfg(tmp_path, epochs=3), bb, db, images, ids, filter=small_filter(), progress=False, evaluate_fn=fake_eval)
    _, best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    _, last = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert last["history"]["best_epoch"] == 2 and last["history"]["best_metric"] == 0.9
    # held-out set: 1 image per class (20 % of 6), clean + synthetic copy, never a training image
    n_val, has_anomaly, val_ids = calls[0]
    assert n_val == 4 and has_anomaly
    train_idx, val_idx = rt.split_train_val(db.image_class, 0.2, 0)
    assert set(val_ids.tolist()) == set(val_idx.tolist()) and not set(val_idx.tolist()) & set(train_idx.tolist())


def test_real_heldout_evaluation_runs():
    bb, db, images, ids = make_setup()
    _, hist = rt.train(cfg(epochs=1, dense_router_epoch=1), bb, db, images, ids, filter=small_filter(), progress=False)
    rec = hist["epochs"][0]
    assert rec["dense_router"] is False and 0.0 <= rec["val_p_auroc"] <= 1.0 and rec["val_loss"] > 0


def test_split_keeps_one_per_class():
    cls = torch.tensor([0, 0, 0, 1, 1, 2])
    tr, va = rt.split_train_val(cls, 0.1, seed=0)
    assert sorted(cls[va].tolist()) == [0, 1]  # class 2 has a single image: it stays in training
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(6))
    assert torch.equal(rt.split_train_val(cls, 0.1, seed=0)[1], va)


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"epochs": 0}, ValueError, "epochs must be >= 1, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int, got float 2.5"),
        ({"lr": 0.0}, ValueError, "lr must be > 0.0, got 0.0"),
        ({"lambda_bal": -1}, ValueError, "lambda_bal must be >= 0.0, got -1"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0.0, 1.0\), got 1.0"),
        ({"p_normal": 2}, ValueError, r"p_normal must be in \[0.0, 1.0\], got 2"),
        ({"val_metric": "acc"}, ValueError, r"val_metric must be one of \['p_auroc', 'loss'\], got 'acc'"),
        ({"mode": "exact"}, ValueError, "mode must be one of"),
        ({"dense_router_epoch": -1}, ValueError, "dense_router_epoch must be >= 0, got -1"),
        ({"texture_dir": "/nonexistent/dtd"}, FileNotFoundError, "texture_dir must be an existing folder"),
    ],
)
def test_config_errors(kw, err, match):
    with pytest.raises(err, match=match):
        rt.TrainConfig(**kw)


def test_train_input_errors(tmp_path):
    bb, db, images, ids = make_setup()
    with pytest.raises(ValueError, match="filter must have k=6"):
        rt.train(cfg(), bb, db, images, ids, filter=GuidedMoEFilter(dim=8, k=5), progress=False)
    with pytest.raises(ValueError, match=r"image_ids must be \[12\] template image ids in \[-1, 12\)"):
        rt.train(cfg(), bb, db, images, ids + 1, progress=False)
    with pytest.raises(ValueError, match="class_ids must match the database's class"):
        rt.train(cfg(), bb, db, images, ids, class_ids=1 - db.image_class, progress=False)
    with pytest.raises(ValueError, match="class_ids must be given"):
        rt.train(cfg(), bb, db, images, torch.full((12,), -1), progress=False)
    with pytest.raises(ValueError, match=r"images must be 64x64 \(config.image_size\)"):
        rt.train(cfg(image_size=64), bb, db, images, ids, progress=False)
    with pytest.raises(FileNotFoundError, match="resume=True needs a checkpoint"):
        rt.train(cfg(tmp_path), bb, db, images, ids, resume=True, progress=False)


def test_train_is_exported():
    assert rf.train is rt.train and rf.TrainConfig is rt.TrainConfig


def test_foreground_modes_reach_the_synthesizer(monkeypatch):
    bb, db, images, ids = make_setup()
    seen = []
    real = AnomalySynthesizer.__call__

    def spy(self, image, rng=None, foreground=None):
        seen.append(foreground)
        return real(self, image, rng, foreground)

    monkeypatch.setattr(AnomalySynthesizer, "__call__", spy)
    rt.train(cfg(epochs=1, foreground={1: "bright"}), bb, db, images, ids, filter=small_filter(), progress=False)
    # per class 5 training images + 1 held-out anomaly; class 1 gets the bright foreground
    assert seen.count("bright") == 6 and seen.count(None) == 6 and len(seen) == 12
    with pytest.raises(ValueError, match=r"config.foreground must name database class ids in \[0, 2\), got \[5\]"):
        rt.train(cfg(epochs=1, foreground={5: "dark"}), bb, db, images, ids, filter=small_filter(), progress=False)


@pytest.mark.parametrize(
    "fg, err, match",
    [
        ([1], TypeError, "foreground must be a dict"),
        ({0: "grey"}, ValueError, r"foreground\[0\] must be one of \['dark', 'bright'\], got 'grey'"),
        ({-1: "dark"}, ValueError, "foreground class id must be >= 0, got -1"),
    ],
)
def test_foreground_config_errors(fg, err, match):
    with pytest.raises(err, match=match):
        rt.TrainConfig(foreground=fg)


@pytest.mark.cuda
def test_amp_training_on_cuda(tmp_path):
    """bf16 autocast on a GPU: finite losses, float32 weights, and a checkpoint that loads on the CPU."""
    bb, db, images, ids = make_setup()
    weight = bb.weight
    bb.weight = weight.cuda()
    db_gpu = db.to("cuda")
    filter, hist = rt.train(
        cfg(tmp_path, epochs=1, amp=True, device="cuda"), bb, db_gpu, images, ids, filter=small_filter(), progress=False
    )
    assert all(torch.isfinite(torch.tensor(hist["step_loss"])))
    assert all(p.dtype == torch.float32 and p.is_cuda for p in filter.parameters())
    loaded, _ = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert next(loaded.parameters()).device.type == "cpu"


class _ZeroFilter(torch.nn.Module):
    """A filter whose map M is zero: the held-out score is then the 1-NN cost alone."""

    def __init__(self, k=6):
        super().__init__()
        self.k, self.dim = k, 8
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, guidance, cost, dense_router=True):
        b, _, h, w = cost.shape
        return torch.zeros(b, h, w) + 0 * self.weight, {}


def test_heldout_score_is_the_filter_map_plus_the_1nn_cost():
    """S = M + C[:, 0]: with M = 0 the held-out P-AUROC is exactly that of the upsampled 1-NN cost
    (dropping the cost would leave a constant score, AUROC 0.5), and the loss is M's focal loss."""
    from raid_fast.detect.filter import binary_focal_loss
    from raid_fast.detect.metrics import auroc

    bb, db, images, ids = make_setup()
    det = rf.Detector(bb, db, k=6, nprobe=2)
    synth = AnomalySynthesizer(p_normal=0.0, seed=0)
    bad, masks = rt.synthesize(synth, images[:4], [[0, 9, i] for i in range(4)])
    x = torch.cat([images[:4], bad])
    y = torch.cat([torch.zeros_like(masks), masks])
    img_ids, cls = torch.cat([ids[:4]] * 2), torch.cat([db.image_class[:4]] * 2)
    got = rt.evaluate_heldout(det, _ZeroFilter(), x, y, img_ids, cls, batch_size=3, dense_router=True)
    cost = det.match(x, class_ids=cls, exclude_images=img_ids).cost[:, :1]
    c0 = torch.nn.functional.interpolate(cost, size=(32, 32), mode="bilinear", align_corners=True)[:, 0]
    expected = auroc(c0, y > 0.5)
    assert abs(expected - 0.5) > 0.05  # the cost carries signal: a test that can tell
    assert got["p_auroc"] == pytest.approx(expected, abs=1e-12)
    assert got["loss"] == pytest.approx(float(binary_focal_loss(torch.zeros_like(y), y)), rel=1e-6)


def test_a_locked_run_folder_is_refused_at_once(tmp_path):
    from raid_fast import _fileio

    bb, db, images, ids = make_setup()
    calls = []

    def spy(x):
        calls.append(x.shape[0])
        return bb(x)

    with _fileio.folder_lock(tmp_path, "training run"):  # another run holds the folder
        with pytest.raises(_fileio.LockedError, match=r"is in use by another training run \(pid \d+"):
            rt.train(cfg(tmp_path, epochs=1), spy, db, images, ids, filter=small_filter(), progress=False)
    assert calls == [] and not (tmp_path / "last.pt").exists()
    rt.train(cfg(tmp_path, epochs=1), spy, db, images, ids, filter=small_filter(), progress=False)
    assert (tmp_path / "last.pt").is_file()  # the lock died with its holder


def test_a_folder_of_another_run_is_refused_or_overwritten(tmp_path):
    bb, db, images, ids = make_setup()
    rt.train(cfg(tmp_path, epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    assert (tmp_path / "best.pt").is_file()
    old = checkpoints.read_checkpoint(tmp_path / "last.pt")["run_id"]
    with pytest.raises(FileExistsError, match=r"holds another run \(last.pt, best.pt\); resume it .* \(--overwrite\)"):
        rt.train(cfg(tmp_path, epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    # a new run without a held-out split writes no best.pt: the old one must not stay beside it
    rt.train(
        cfg(tmp_path, epochs=1, val_fraction=0.0),
        bb,
        db,
        images,
        ids,
        filter=small_filter(),
        overwrite=True,
        progress=False,
    )
    assert not (tmp_path / "best.pt").exists()
    assert checkpoints.read_checkpoint(tmp_path / "last.pt")["run_id"] != old


def test_resume_with_other_settings_is_refused(tmp_path):
    bb, db, images, ids = make_setup()
    rt.train(cfg(tmp_path, epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    with pytest.raises(ValueError, match=r"these differ: lr: 0.001 in last.pt, 0.01 now"):
        rt.train(
            cfg(tmp_path, epochs=2, lr=1e-2), bb, db, images, ids, filter=small_filter(), resume=True, progress=False
        )
    with pytest.raises(ValueError, match=r"batch_size: 4 in last.pt, 2 now"):
        rt.train(
            cfg(tmp_path, epochs=2, batch_size=2),
            bb,
            db,
            images,
            ids,
            filter=small_filter(),
            resume=True,
            progress=False,
        )
    # more epochs is what resume is for
    _, hist = rt.train(cfg(tmp_path, epochs=2), bb, db, images, ids, filter=small_filter(), resume=True, progress=False)
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2]


def test_an_unwritable_run_folder_fails_before_any_compute(tmp_path):
    bb, db, images, ids = make_setup()
    calls = []

    def spy(x):
        calls.append(1)
        return bb(x)

    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder's parent should be")
    with pytest.raises(NotADirectoryError, match="config.out_dir"):
        rt.train(cfg(blocker / "run", epochs=1), spy, db, images, ids, filter=small_filter(), progress=False)
    assert calls == []


def _scripted_eval(metrics, state):
    def fake_eval(det, filter, imgs, masks, img_ids, cls, batch_size, dense_router, amp):
        state["epoch"] += 1
        return {"p_auroc": metrics[state["epoch"] - 1], "loss": 1.0}

    return fake_eval


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even an ``except Exception``)."""


SCRIPTED = [0.6, 0.9]  # both epochs improve: writes last, best, last, best


@pytest.fixture(scope="module")
def scripted_best(tmp_path_factory):
    """Weights digest of best.pt of an uninterrupted run with the scripted held-out metric."""
    bb, db, images, ids = make_setup()
    ref_dir = tmp_path_factory.mktemp("ref")
    rt.train(
        cfg(ref_dir),
        bb,
        db,
        images,
        ids,
        filter=small_filter(),
        progress=False,
        evaluate_fn=_scripted_eval(SCRIPTED, {"epoch": 0}),
    )
    return checkpoints.weights_digest(checkpoints.read_checkpoint(ref_dir / "best.pt")["model"])


WRITES = ["e1 last.pt", "e1 best.pt", "e2 last.pt", "e2 best.pt"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("write", range(len(WRITES)), ids=WRITES)
def test_an_interruption_at_any_checkpoint_write_leaves_a_consistent_pair(
    tmp_path, monkeypatch, write, when, scripted_best
):
    """Interrupted before or after each file write, then resumed: best.pt is the epoch last.pt names,
    with the weights of the uninterrupted run's best epoch; until the resume repairs it, a stale
    best.pt is refused, never silently used."""
    bb, db, images, ids = make_setup()
    metrics = SCRIPTED

    run = tmp_path / "run"
    real = rt.save_checkpoint
    count = {"n": 0}

    def killing_save(path, state):
        n = count["n"]
        count["n"] += 1
        if n == write and when == "before":
            raise _Killed
        real(path, state)
        if n == write:
            raise _Killed

    monkeypatch.setattr(rt, "save_checkpoint", killing_save)
    with pytest.raises(_Killed):
        rt.train(
            cfg(run),
            bb,
            db,
            images,
            ids,
            filter=small_filter(),
            progress=False,
            evaluate_fn=_scripted_eval(metrics, {"epoch": 0}),
        )
    monkeypatch.setattr(rt, "save_checkpoint", real)

    if (run / "last.pt").is_file():
        last = checkpoints.read_checkpoint(run / "last.pt")
        if (
            (run / "best.pt").is_file()
            and last["best"] is not None
            and last["best"]["epoch"] != checkpoints.read_checkpoint(run / "best.pt")["epoch"]
        ):
            with pytest.raises(ValueError, match="does not hold the best epoch"):
                checkpoints.load_checkpoint(run / "best.pt")
        state = {"epoch": last["epoch"]}
        _, hist = rt.train(
            cfg(run),
            bb,
            db,
            images,
            ids,
            filter=small_filter(),
            resume=True,
            progress=False,
            evaluate_fn=_scripted_eval(metrics, state),
        )
    else:
        _, hist = rt.train(
            cfg(run),
            bb,
            db,
            images,
            ids,
            filter=small_filter(),
            progress=False,
            evaluate_fn=_scripted_eval(metrics, {"epoch": 0}),
        )
    best = checkpoints.read_checkpoint(run / "best.pt")
    last = checkpoints.read_checkpoint(run / "last.pt")
    assert hist["best_epoch"] == last["history"]["best_epoch"] == best["epoch"] == 2
    assert checkpoints.weights_digest(best["model"]) == scripted_best
    checkpoints.load_checkpoint(run / "best.pt")  # consistent: loads
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


KILL_SCRIPT = """
import os, signal, sys
import torch
from tests.detect import test_training as tt
from raid_fast.detect import training as rt

bb, db, images, ids = tt.make_setup()
real = rt.save_checkpoint

def save(path, state):
    real(path, state)
    # SIGKILL between the two writes of epoch 2: last.pt is on disk, best.pt not yet
    if state["epoch"] == 2 and path.name == "last.pt":
        os.kill(os.getpid(), signal.SIGKILL)

rt.save_checkpoint = save
rt.train(tt.cfg(sys.argv[1]), bb, db, images, ids, filter=tt.small_filter(), progress=False,
         evaluate_fn=tt._scripted_eval([0.6, 0.9], {"epoch": 0}))
"""


def test_sigkill_while_best_pt_is_written_is_repaired_on_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(run)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = checkpoints.read_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["history"]["best_epoch"] == 2
    assert checkpoints.read_checkpoint(run / "best.pt")["epoch"] == 1  # the interrupted state
    with pytest.raises(
        ValueError, match=r"does not hold the best epoch that .*last.pt' records \(2; it holds epoch 1\)"
    ):
        checkpoints.load_checkpoint(run / "best.pt")
    bb, db, images, ids = make_setup()
    _, hist = rt.train(cfg(run), bb, db, images, ids, filter=small_filter(), resume=True, progress=False)
    best = checkpoints.read_checkpoint(run / "best.pt")
    assert hist["best_epoch"] == best["epoch"] == 2
    assert checkpoints.weights_digest(best["model"]) == checkpoints.weights_digest(last["model"])
