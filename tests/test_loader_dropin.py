"""`DaliLoader` as a drop-in for torch's `DataLoader` in other people's KD loops (issue 14):
independent iterators, DDP defaults from the process group, no silently wrong targets, labels
checked at construction, the DataLoader attributes those loops touch, dtypes, and errors for
direct use. The loops below are written the way mdistiller, torchdistill and timm write theirs
(written here, no code copied).

The data are test_loader's: 24 generated 32 x 32 PNGs in 3 classes, batches of 4, CPU pipeline.
"""
from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dali_erkt import DaliLoader
from dali_erkt.config import default_config
from dali_erkt.data import loader as loader_module
from dali_erkt.errors import DataError
from test_loader import B, EPOCH, K, N, SIZE, all_indices, assert_same_batches, clone, collect, data  # noqa: F401

# fp16's step between 2 and 4: ImageNet-normalised pixels lie in (-2.2, 2.7), so rounding to fp16
# moves them by half of it at most.
FP16_STEP = 2.0 ** -9

# The loader as foreign code builds it: no preset, dtype or rank given.
PLAIN = dict(image_size=SIZE, batch_size=B, device="cpu", num_threads=1, prefetch=1)


def plain(data, **kw) -> DaliLoader:
    paths, labels = data
    return DaliLoader(paths, labels, **{**PLAIN, **kw})


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message.strip()
    return message


class deadline:
    """Fail, instead of hanging, when the block runs past `seconds` (SIGALRM, main thread)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def _fire(self, *_):
        raise TimeoutError(f"still running after {self.seconds} s")

    def __enter__(self):
        self._old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self._old)


@pytest.fixture(scope="module")
def evals(data):
    """One epoch of the unshuffled loader (train=False), batches of 8: 3 batches."""
    loader = plain(data, train=False, batch_size=8)
    batches = collect(loader)
    loader.close()
    assert len(batches) == 3
    return batches


@pytest.fixture(scope="module")
def erkt(data):
    """Epochs 0 and 1 of the training loader with the paper's VSM (CutMix on)."""
    loader = plain(data, preset="erkt")
    epochs = [collect(loader), collect(loader)]
    loader.close()
    return epochs


# -- 1. every iter() is independent ------------------------------------------------------------

def test_two_live_iterators_each_yield_the_whole_epoch(data, evals, erkt):
    for kw, want in ((dict(train=False, batch_size=8), evals), (dict(preset="erkt"), erkt[0])):
        loader = plain(data, **kw)
        it1, it2 = iter(loader), iter(loader)
        got1, got2 = [], []
        with deadline(60):
            for _ in range(len(loader)):  # alternate, as two consumers of one loader would
                got1.append(clone(next(it1)))
                got2.append(clone(next(it2)))
            for it in (it1, it2):
                with pytest.raises(StopIteration):
                    next(it)
        assert_same_batches(got1, want)
        assert_same_batches(got2, want)
        # Both made before either yielded: the same epoch; the next iter() is the one after.
        assert loader.state_dict() == {"epoch": 1, "batch": 0}
        if kw.get("preset") == "erkt":
            assert_same_batches(collect(loader), erkt[1])
        loader.close()


def test_zip_of_a_loader_with_itself_pairs_equal_batches(data, evals):
    loader = plain(data, train=False, batch_size=8)
    with deadline(60):
        pairs = [(clone(a), clone(b)) for a, b in zip(loader, loader)]
    assert len(pairs) == len(evals) == 3
    assert_same_batches([a for a, _ in pairs], evals)
    assert_same_batches([b for _, b in pairs], evals)
    loader.close()


def test_nested_loops_end_with_every_pair(data, evals, erkt):
    """for a in L: for b in L: yields len(L) x len(L) pairs (it used to restart forever)."""
    loader = plain(data, train=False, batch_size=8)
    outer, inner = [], []
    with deadline(120):
        for a in loader:
            outer.append(clone(a))
            inner.append(collect(loader))
    assert_same_batches(outer, evals)
    assert len(inner) == 3
    for passes in inner:
        assert_same_batches(passes, evals)
    loader.close()

    # Shuffled: the outer loop yields its epoch whole; each inner loop is a whole epoch too, the
    # next one each time (every new iter() after a batch was handed out starts the next epoch).
    loader = plain(data, preset="erkt")
    outer, inner = [], []
    with deadline(240):
        for k, a in enumerate(loader):
            outer.append(clone(a))
            if k < 2:
                inner.append(collect(loader))
    assert_same_batches(outer, erkt[0])
    assert_same_batches(inner[0], erkt[1])
    assert all_indices(inner[1]) != all_indices(inner[0])
    assert sorted(all_indices(inner[1])) == list(range(N))
    loader.close()


def test_a_second_iterator_pipeline_is_freed_with_it(data, erkt):
    loader = plain(data, preset="erkt")
    first = iter(loader)
    assert_same_batches([clone(next(first))], erkt[0][:1])
    second = iter(loader)  # the first is live: this one gets a pipeline of its own
    ref = weakref.ref(second._pipe.dali)
    next(second)
    del second
    gc.collect()
    assert ref() is None
    # The first goes on where it was, untouched by the second.
    assert_same_batches([clone(b) for b in first], erkt[0][1:])
    loader.close()


def test_close_ends_live_iterators(data):
    loader = plain(data)
    it = iter(loader)
    next(it)
    loader.close()
    with pytest.raises(StopIteration):
        next(it)
    assert len(collect(loader)) == EPOCH  # the loader itself goes on


# -- 2. DDP like DistributedSampler ------------------------------------------------------------

def test_rank_and_world_default_to_the_process_group(data, monkeypatch):
    monkeypatch.setattr(loader_module, "process_group", lambda: (1, 2))
    loader = plain(data)
    assert (loader.sampler.rank, loader.sampler.num_replicas) == (1, 2)
    assert len(loader.sampler) == N // 2 and len(loader) == N // (2 * B)
    explicit = plain(data, rank=0, world=1)  # explicit values win
    assert (explicit.sampler.rank, explicit.sampler.num_replicas) == (0, 1)
    whole = plain(data, world=1)  # every process reads the whole split: rank 0
    assert whole.sampler.rank == 0 and len(whole.sampler) == N
    monkeypatch.setattr(loader_module, "process_group", lambda: (0, 1))
    assert plain(data).sampler.num_replicas == 1


def test_from_config_keeps_the_whole_split_under_a_process_group(data, monkeypatch):
    """The engine passes its rank and world explicitly; its test loader (no rank given) must
    see every image on rank 0, as before."""
    monkeypatch.setattr(loader_module, "process_group", lambda: (1, 2))
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_threads, cfg.data.prefetch = SIZE, B, 1, 1
    loader = DaliLoader.from_config(*data, cfg, device="cpu", train=False)
    assert (loader.sampler.rank, loader.sampler.num_replicas) == (0, 1)
    assert all_indices(collect(loader)) == list(range(N))


WORKER = textwrap.dedent('''
    import os, sys
    import torch.distributed as dist
    from pathlib import Path
    from dali_erkt import DaliLoader

    dist.init_process_group("gloo")
    root, out = Path(sys.argv[1]), sys.argv[2]
    paths = sorted(root.rglob("*.png"))
    names = sorted({p.parent.name for p in paths})
    labels = [names.index(p.parent.name) for p in paths]
    loader = DaliLoader(paths, labels, image_size=32, batch_size=4, device="cpu", num_threads=1,
                        prefetch=1)  # no rank=, no world=
    rows = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        rows.append(" ".join(str(i) for b in loader for i in b.indices.tolist()))
    with open(f"{out}/rank-{dist.get_rank()}.txt", "w") as fh:
        fh.write(f"{dist.get_rank()} {dist.get_world_size()} {len(loader)}\\n")
        fh.write("\\n".join(rows) + "\\n")
    loader.close()
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_torchrun_without_rank_or_world_gives_disjoint_shards(data, tmp_path):
    root = os.path.commonpath([str(p) for p in data[0]])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), root, str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    heads, epochs = {}, {}
    for k in (0, 1):
        head, *rows = (tmp_path / f"rank-{k}.txt").read_text().splitlines()
        heads[k] = head.split()
        epochs[k] = [[int(i) for i in row.split()] for row in rows]
    assert heads == {0: ["0", "2", str(N // (2 * B))], 1: ["1", "2", str(N // (2 * B))]}
    for e in (0, 1):
        a, b = epochs[0][e], epochs[1][e]
        assert len(a) == len(b) == N // 2
        assert not set(a) & set(b)  # disjoint
        assert sorted(a + b) == list(range(N))  # together the epoch
    assert epochs[0][0] != epochs[0][1]  # set_epoch reshuffles


# -- 3. never silently wrong targets -----------------------------------------------------------

def test_default_augmentation_is_plain_and_never_mixes(data, evals):
    """DaliLoader(paths, labels) trains on shuffled, resized, normalised images: no VSM unit,
    no CutMix (preset="erkt" opts in); the pixels are the evaluation pipeline's."""
    loader = plain(data)
    batches = collect(loader)
    assert len(batches) == EPOCH and sorted(all_indices(batches)) == list(range(N))
    assert all_indices(batches) != list(range(N))  # shuffled
    for b in batches:
        assert torch.equal(b.partner_labels, b.labels) and torch.all(b.mix_weight == 0)
    by_index = {int(i): img for e in evals for i, img in zip(e.indices, e.images)}
    for b in batches:
        for i, img in zip(b.indices.tolist(), b.images):
            torch.testing.assert_close(img, by_index[i], atol=0, rtol=0)
    loader.close()


def test_fields_that_drop_the_cutmix_targets_are_refused(data):
    for fields in (("images", "labels"), ("images", "labels", "indices"),
                   ("images", "labels", "partner_labels")):
        with pytest.raises(DataError) as exc:
            plain(data, preset="erkt", fields=fields)
        message = one_line(exc)
        assert "CutMix" in message and "cutmix=False" in message
    # The fixes: no CutMix, or the fields kept; CutMix never fires in evaluation; no labels at
    # all (pure KD on the teacher's outputs) cannot be wrong targets.
    pairs = collect(plain(data, preset="erkt", cutmix=False, fields=("images", "labels")))
    assert len(pairs) == EPOCH and all(len(p) == 2 for p in pairs)
    kept = next(iter(plain(data, preset="erkt",
                           fields=("images", "labels", "partner_labels", "mix_weight"))))
    assert len(kept) == 4 and (kept[3] > 0).any()
    assert len(next(iter(plain(data, preset="erkt", train=False, fields=("images", "labels"))))) == 2
    assert len(next(iter(plain(data, preset="erkt", fields=("images", "indices"))))) == 2


def test_the_engine_keeps_its_own_augmentation_and_dtype(data, erkt):
    """from_config passes the run's VSM (the paper's, CutMix on) and data.dtype (float16 by
    default) explicitly, whatever the keyword loader's defaults."""
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_threads, cfg.data.prefetch = SIZE, B, 1, 1
    cfg.run.seed = 0
    assert cfg.data.dtype == "float16"
    batches = collect(DaliLoader.from_config(*data, cfg, device="cpu", train=True))
    assert all(b.images.dtype == torch.float16 for b in batches)
    assert all_indices(batches) == all_indices(erkt[0])
    for got, want in zip(batches, erkt[0]):
        assert torch.equal(got.mix_weight, want.mix_weight)
        assert torch.equal(got.partner_labels, want.partner_labels)
        torch.testing.assert_close(got.images.float(), want.images, atol=FP16_STEP / 2, rtol=0)


# -- 4. labels checked at construction ---------------------------------------------------------

def _labels(data, change: dict):
    labels = list(data[1])
    for i, y in change.items():
        labels[i] = y
    return labels


BAD_LABELS = [  # (case, labels changed {index: value}, loader keywords, words of the message)
    ("99 of 7", {5: 99}, dict(num_classes=7), ["99", "index 5", "7 classes"]),
    ("99 of 7 names", {5: 99}, dict(classes=list("abcdefg")), ["99", "index 5", "7 classes"]),
    ("3 of 3 names", {0: 3}, dict(classes=["beach", "forest", "harbor"]), ["3", "index 0"]),
    ("negative", {2: -1}, {}, ["-1", "index 2"]),
    ("float", {4: 1.5}, {}, ["1.5", "index 4", "integer"]),
    ("integral float", {4: 1.0}, {}, ["1.0", "index 4", "integer"]),
    ("string", {1: "forest"}, {}, ["forest", "index 1", "integer"]),
]


@pytest.mark.parametrize("case, change, kw, words", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_bad_labels_are_named_at_construction(data, case, change, kw, words):
    labels = _labels(data, change)
    with pytest.raises(DataError) as exc:
        DaliLoader(data[0], labels, **PLAIN, **kw)
    message = one_line(exc)
    for word in words:
        assert word in message, (case, message)
    index = int(words[1].split()[1])
    assert str(data[0][index]) in message  # the file the label belongs to


def test_label_forms_and_class_names(data):
    paths, labels = data
    inferred = DaliLoader(paths, labels, **PLAIN)
    assert inferred.dataset.classes == ["0", "1", "2"]
    named = DaliLoader(paths, torch.tensor(labels), **PLAIN, classes=["beach", "forest", "harbor"])
    assert named.dataset.class_to_idx == {"beach": 0, "forest": 1, "harbor": 2}
    wide = DaliLoader(paths, labels, **PLAIN, num_classes=5)  # classes with no image are fine
    assert wide.dataset.classes == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError) as exc:
        DaliLoader(paths, labels, **PLAIN, num_classes=4, classes=["a", "b", "c"])
    assert "num_classes=4" in one_line(exc)


# -- 5. the DataLoader surface -----------------------------------------------------------------

def test_dataset_is_a_sized_indexable_image_folder_view(data):
    paths, labels = data
    loader = plain(data, classes=["beach", "forest", "harbor"], rank=1, world=2)
    ds = loader.dataset
    assert len(ds) == N  # every image, as DataLoader.dataset under DistributedSampler
    assert ds.targets == labels
    assert ds.samples == [(str(p), y) for p, y in zip(paths, labels)]
    assert ds[3] == (str(paths[3]), labels[3]) and ds[-1] == ds.samples[-1]
    assert ds.classes == ["beach", "forest", "harbor"]
    assert ds.class_to_idx == {"beach": 0, "forest": 1, "harbor": 2}


def test_sampler_and_batch_sampler_describe_the_next_epoch(data, erkt):
    loader = plain(data, preset="erkt")
    bs = loader.batch_sampler
    assert bs.sampler is loader.sampler
    assert bs.batch_size == B and bs.drop_last is True and loader.drop_last is True
    assert len(bs) == len(loader) == EPOCH and len(loader.sampler) == N
    loader.batch_sampler.sampler.set_epoch(1)  # torchdistill's pre-epoch hook
    assert loader.sampler.epoch == 1
    assert list(bs) == [b.indices.tolist() for b in erkt[1]]
    assert list(loader.sampler) == all_indices(erkt[1])
    assert_same_batches(collect(loader), erkt[1])
    assert loader.sampler.epoch == 2
    half = plain(data, rank=1, world=2, batch_size=5, drop_last=False)
    assert len(half.sampler) == N // 2 and len(half) == -(-(N // 2) // 5) and not half.drop_last
    assert plain(data, train=False).drop_last is False  # evaluation keeps the last batch


def test_dataloader_keywords(data):
    loader = plain(data, num_threads=None, num_workers=2, pin_memory=True)
    assert loader.num_workers == 2 and loader._settings["num_threads"] == 2
    assert loader.pin_memory is True  # accepted; no effect (see the README's table)
    assert len(collect(loader)) == EPOCH
    assert plain(data, num_threads=None, num_workers=0).num_workers == 1  # DALI needs a thread
    assert plain(data).num_workers == 1  # num_threads=1
    with pytest.raises(DataError) as exc:
        plain(data, num_threads=1, num_workers=3)
    assert "num_workers" in one_line(exc)
    ordered = collect(plain(data, shuffle=False))
    assert all_indices(ordered) == list(range(N))  # training, in order
    assert plain(data, shuffle=False).sampler.shuffle is False
    shuffled = collect(plain(data, train=False, shuffle=True))
    assert all_indices(shuffled) != list(range(N)) and sorted(all_indices(shuffled)) == list(range(N))


def test_len_is_constant_through_a_resumed_epoch(data, erkt):
    """len(loader) is the epoch's batch count; a resumed epoch yields len - state["batch"]."""
    loader = plain(data, preset="erkt")
    loader.load_state_dict({"epoch": 0, "batch": 2})
    assert len(loader) == EPOCH
    it = iter(loader)
    assert len(loader) == EPOCH
    rest = [clone(b) for b in it]
    assert len(rest) == EPOCH - 2 == len(loader) - 2
    assert_same_batches(rest, erkt[0][2:])
    assert len(loader) == EPOCH and loader.state_dict() == {"epoch": 1, "batch": 0}


# -- 6. dtypes ---------------------------------------------------------------------------------

def test_dtypes(data, erkt):
    want = erkt[0][0].images
    assert want.dtype == torch.float32  # the default, on every device
    for dtype in (torch.float16, "float16", torch.bfloat16, "bf16"):
        got = next(iter(plain(data, preset="erkt", dtype=dtype))).images
        assert got.dtype == (torch.bfloat16 if "bf" in str(dtype) else torch.float16)
        assert got.is_contiguous(memory_format=torch.channels_last)
        if got.dtype == torch.bfloat16:  # the fp32 pipeline's output, converted: exact
            assert torch.equal(got, want.to(torch.bfloat16))
        else:  # DALI's own fp16: the fp32 values rounded (measured: 9.76e-4 at most)
            torch.testing.assert_close(got.float(), want, atol=FP16_STEP / 2, rtol=0)
    with pytest.raises(DataError) as exc:
        plain(data, dtype=torch.int8)
    assert "dtype" in one_line(exc)


# -- 7. errors for direct use ------------------------------------------------------------------

def test_a_missing_file_given_directly_is_named_without_a_split(data, tmp_path):
    paths = [tmp_path / p.name for p in data[0]]
    for src, dst in zip(data[0], paths):
        shutil.copy(src, dst)
    victim = paths[7]
    victim.unlink()
    loader = DaliLoader(paths, data[1], **PLAIN, train=False)
    with pytest.raises(DataError) as exc:
        collect(loader)
    message = one_line(exc)
    assert str(victim) in message and "missing" in message
    assert "split" not in message and "leave it out" in message


# -- loops written the way other KD code bases write theirs -------------------------------------

def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, K))


def kd_step(student, teacher, opt, x, y, tau=4.0) -> torch.Tensor:
    """One step of cross-entropy plus Hinton's KD term (tau ** 2 scaled); the loss."""
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    kd = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean") * tau ** 2
    loss = F.cross_entropy(s, y) + kd
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def log_every(iterable, lines: list):
    """A metric logger's progress: `[i/len]` for every item (as torchdistill's and timm's do)."""
    for i, item in enumerate(iterable):
        lines.append(f"[{i}/{len(iterable)}]")
        yield item


def test_torchdistill_style_loop(data):
    """Pre-epoch hook `loader.batch_sampler.sampler.set_epoch(epoch)`, samples counted against
    `len(loader.dataset)`, (sample, target, supplement) batches, an evaluate() on top-1."""
    train = plain(data, fields=("images", "labels", "indices"), drop_last=False)
    test = plain(data, train=False, fields=("images", "labels"), batch_size=10)
    student, teacher = tiny(0), tiny(1).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    seen_by_epoch = []
    for epoch in range(2):
        if hasattr(train.batch_sampler, "sampler") and hasattr(train.batch_sampler.sampler, "set_epoch"):
            train.batch_sampler.sampler.set_epoch(epoch)
        student.train()
        lines, seen, num_samples = [], [], 0
        for sample_batch, targets, supp in log_every(train, lines):
            loss = kd_step(student, teacher, opt, sample_batch, targets)
            num_samples += sample_batch.shape[0]
            seen += supp.tolist()
        assert num_samples == len(train.dataset) == N and sorted(seen) == list(range(N))
        assert lines[-1] == f"[{EPOCH - 1}/{EPOCH}]" and torch.isfinite(loss)
        seen_by_epoch.append(seen)
    assert seen_by_epoch[0] != seen_by_epoch[1]  # the hook chose the epoch
    student.eval()
    correct = 0
    with torch.no_grad():
        for image, target in test:
            correct += (student(image).argmax(1) == target).sum().item()
    top1 = 100.0 * correct / len(test.dataset)
    assert 0.0 <= top1 <= 100.0 and len(test.dataset) == N


def _set_loader_epoch(loader, epoch: int) -> None:
    """timm's way: the dataset's set_epoch where it has one, else the sampler's."""
    if hasattr(loader, "dataset") and hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    elif hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def test_timm_style_loop(data, erkt):
    """`_set_loader_epoch`, `last_idx = len(loader) - 1`, `num_updates = epoch * len(loader)`,
    `(input, target)` batches; a validate() over `loader.dataset`."""
    loader = plain(data, fields=("images", "labels"))
    student, teacher = tiny(0), tiny(1).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    num_updates, lasts = 0, []
    for epoch in (1, 0):  # set explicitly, and out of order: each epoch is what was asked for
        _set_loader_epoch(loader, epoch)
        assert loader.sampler.epoch == epoch
        last_idx = len(loader) - 1
        num_updates = epoch * len(loader)
        order = []
        for batch_idx, (input, target) in enumerate(loader):
            last_batch = batch_idx == last_idx
            loss = kd_step(student, teacher, opt, input, target)
            num_updates += 1
            order.append(target.clone())
            if last_batch:
                lasts.append(batch_idx)
        fresh = plain(data, fields=("images", "labels"))
        fresh.set_epoch(epoch)
        assert torch.equal(torch.cat(order), torch.cat([y for _, y in fresh]))
        assert num_updates == (epoch + 1) * len(loader)
    assert lasts == [EPOCH - 1, EPOCH - 1]
    val = plain(data, train=False, fields=("images", "labels"), batch_size=5)
    n = sum(input.shape[0] for input, _ in val)
    assert n == len(val.dataset) == N


def test_mdistiller_style_loop_unpacks_images_targets_indices(data):
    """`for idx, data in enumerate(train_loader): image, target, index = data`, `num_iter =
    len(train_loader)`; a DKD-like loss needs the index only for bookkeeping here."""
    train_loader = plain(data, fields=("images", "labels", "indices"))
    num_iter = len(train_loader)
    student, teacher = tiny(0), tiny(1).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    labels = torch.tensor(data[1])
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)
        indices = []
        for idx, batch in enumerate(train_loader):
            image, target, index = batch
            assert torch.equal(target, labels[index])  # the target is the indexed image's own
            assert idx < num_iter
            loss = kd_step(student, teacher, opt, image, target)
            indices += index.tolist()
        assert idx == num_iter - 1 and sorted(indices) == list(range(N))
        assert len(train_loader.dataset) == N


def test_lightning_trainer_fit(data):
    """Lightning's `Trainer.fit` with the loader as train and val dataloaders: Lightning sets the
    sampler's epoch itself, counts batches with `len`, and moves nothing (the batches are tensors
    on the loader's device already)."""
    L = pytest.importorskip("lightning")
    labels = torch.tensor(data[1])

    class KD(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = tiny(0), tiny(1).eval()
            self.seen, self.val_seen = {}, 0

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            assert torch.equal(y, labels[index])
            self.seen.setdefault(self.current_epoch, []).extend(index.tolist())
            with torch.no_grad():
                t = self.teacher(x)
            s = self.student(x)
            return F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1),
                                                    reduction="batchmean") * 16

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_seen += y.shape[0]
            self.log("val_acc", (self.student(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=0.05)

    train = plain(data, fields=("images", "labels", "indices"))
    val = plain(data, train=False, fields=("images", "labels"), batch_size=8)
    epochs_set = []
    set_epoch = train.set_epoch
    train.set_epoch = lambda epoch, *a: (epochs_set.append(epoch), set_epoch(epoch, *a))[1]
    module = KD()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with deadline(300):
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert trainer.num_training_batches == len(train) == EPOCH
    assert sorted(module.seen) == [0, 1]
    for epoch, seen in module.seen.items():
        assert sorted(seen) == list(range(N)), epoch  # each epoch the whole set, once
    assert epochs_set[:2] == [0, 1]  # Lightning set each epoch through loader.sampler.set_epoch
    assert module.seen[0] != module.seen[1]
    assert module.val_seen == 2 * N and 0.0 <= trainer.callback_metrics["val_acc"] <= 1.0
