"""The contract of `DaliLoader`: plain keyword arguments, `Batch` named tuples, torch DataLoader
conventions (len, batch_size, sampler.set_epoch, epochs per iter(), state_dict resume, close),
epochs and sharding, and one-line `DataError`s for bad input. The drop-in behaviour in other
KD loops (independent iterators, DDP defaults, the DataLoader attributes) is test_loader_dropin.py's.

Everything runs the CPU pipeline on 24 generated 32 x 32 PNGs (3 classes of 8): 6 training
batches of 4 per epoch.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import write_image_tree
from dali_erkt.config import default_config
from dali_erkt.data.dataset import Split
from dali_erkt.runtime import Runtime
from dali_erkt.data import loader as loader_module
from dali_erkt.errors import DataError

from dali_erkt import Batch, DaliLoader  # the public names (loaded lazily by the package)

N, B, K, SIZE = 24, 4, 3, 32  # images, batch size, classes, image size
EPOCH = N // B  # training batches per epoch
# preset="erkt": the paper's VSM with CutMix (the keyword loader's default is plain, see
# test_loader_dropin.py); the tests below check the augmented batches.
FAST = dict(image_size=SIZE, batch_size=B, device="cpu", num_threads=1, prefetch=1, preset="erkt")
MEAN = torch.tensor(loader_module.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(loader_module.IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(paths, labels) of 24 PNGs; the labels are the class folders' indices (0, 1, 2)."""
    root = write_image_tree(tmp_path_factory.mktemp("loader") / "images",
                            {"beach": 8, "forest": 8, "harbor": 8}, size=(SIZE, SIZE),
                            formats=("png",))
    paths = sorted(root.rglob("*.png"))
    names = sorted({p.parent.name for p in paths})
    labels = [names.index(p.parent.name) for p in paths]
    assert len(paths) == N and sorted(set(labels)) == list(range(K))
    return paths, labels


def make(data, **kw) -> DaliLoader:
    paths, labels = data
    return DaliLoader(paths, labels, **{**FAST, **kw})


def clone(batch):
    """A copy that no later batch of the loader can touch."""
    copied = tuple(t.clone() for t in batch)
    return Batch(*copied) if isinstance(batch, Batch) else copied


def collect(iterable) -> list:
    return [clone(b) for b in iterable]


def assert_same_batches(got, want):
    """Same number of batches, every field identical (images bit for bit)."""
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w)
        for name, x, y in zip(Batch._fields, g, w):
            assert x.dtype == y.dtype and x.shape == y.shape, (k, name)
            assert torch.equal(x, y), f"batch {k}: {name} differs"


def all_indices(batches) -> list[int]:
    return torch.cat([b.indices for b in batches]).tolist()


@pytest.fixture(scope="module")
def reference(data):
    """Two uninterrupted epochs of the default training loader (CutMix on, seed 0)."""
    loader = make(data)
    lens = [len(loader)]
    raw, epoch0 = [], []
    for batch in loader:  # the first iter() is epoch 0
        raw.append(batch)
        epoch0.append(clone(batch))
    lens.append(len(loader))
    epoch1 = collect(loader)  # a new iter() after a finished epoch: epoch 1
    state = loader.state_dict()
    loader.close()
    return SimpleNamespace(epoch0=epoch0, raw0=raw, epoch1=epoch1, lens=lens, state=state)


# -- construction, batch format ----------------------------------------------------------------

def test_public_names_are_the_loader_module_classes():
    assert DaliLoader is loader_module.DaliLoader
    assert Batch is loader_module.Batch
    assert Batch._fields == ("images", "labels", "partner_labels", "mix_weight", "indices")


def test_cpu_batches_are_fp32_channels_last_and_fit_an_fp32_model(data, reference):
    labels = torch.tensor(data[1])
    for batch in reference.epoch0:
        assert isinstance(batch, Batch)
        assert batch.images.shape == (B, 3, SIZE, SIZE)
        assert batch.images.dtype == torch.float32  # the default dtype
        assert batch.images.device.type == "cpu"
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(batch.images).all()
        assert batch.labels.dtype == batch.partner_labels.dtype == batch.indices.dtype == torch.int64
        assert batch.mix_weight.dtype == torch.float32
        assert batch.labels.shape == batch.partner_labels.shape == batch.mix_weight.shape == (B,)
        assert torch.equal(batch.labels, labels[batch.indices])
        # A CutMix partner is a sample of the same batch.
        assert set(batch.partner_labels.tolist()) <= set(batch.labels.tolist())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, K))  # fp32 weights: an fp16 input would raise here
    batch = reference.epoch0[0]
    logits = model(batch.images)
    loss = F.cross_entropy(logits, batch.soft_targets(K))
    assert logits.shape == (B, K) and torch.isfinite(loss)


def test_explicit_float16_dtype_is_honoured_on_the_cpu(data, reference):
    batch = next(iter(make(data, dtype="float16")))
    assert batch.images.dtype == torch.float16
    torch.testing.assert_close(batch.images.float(), reference.epoch0[0].images, atol=2e-2, rtol=1e-2)


def test_batch_unpacks_like_a_tuple_and_keeps_its_names(reference):
    batch = reference.epoch0[0]
    images, labels, partner_labels, mix_weight, indices = batch
    assert images is batch.images and labels is batch.labels
    assert partner_labels is batch.partner_labels and mix_weight is batch.mix_weight
    assert indices is batch.indices
    assert batch[0] is batch.images and batch[4] is batch.indices
    assert isinstance(batch, tuple) and len(batch) == 5
    assert batch._asdict()["labels"] is batch.labels


def test_held_batches_stay_valid_after_later_batches(reference):
    """list(loader) works: a batch is not overwritten by the ones the pipeline produces later."""
    assert_same_batches(reference.raw0, reference.epoch0)


def test_fields_give_plain_tuples_of_those_fields(data, reference):
    # Without CutMix: with it, labels alone are refused (test_loader_dropin.py).
    unmixed = collect(make(data, cutmix=False))
    loader = make(data, fields=("images", "labels"), cutmix=False)
    seen = []
    for x, y in loader:  # two values per batch, as with a torch DataLoader
        seen.append((x.clone(), y.clone()))
    assert len(seen) == EPOCH
    for (x, y), want in zip(seen, unmixed):
        assert torch.equal(x, want.images) and torch.equal(y, want.labels)
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert type(batch) is tuple and not isinstance(batch, Batch) and len(batch) == 2
    loader.close()

    reordered = next(iter(make(data, fields=("indices", "labels"), cutmix=False)))
    assert type(reordered) is tuple and len(reordered) == 2
    assert torch.equal(reordered[0], reference.epoch0[0].indices)
    assert torch.equal(reordered[1], reference.epoch0[0].labels)


# -- CutMix and targets ------------------------------------------------------------------------

def test_cutmix_on_mixes_labels(reference):
    """The default (CutMix p = 1): partners differ from the sample somewhere, weights are areas."""
    weights = torch.cat([b.mix_weight for b in reference.epoch0])
    assert (weights > 0).any() and (weights < 1).all() and (weights >= 0).all()
    assert any((b.partner_labels != b.labels).any() for b in reference.epoch0)
    for b in reference.epoch0:  # one box per batch: one weight per batch
        assert torch.all(b.mix_weight == b.mix_weight[0])


def test_cutmix_off_keeps_own_labels(data, reference):
    batches = collect(make(data, cutmix=False))
    assert len(batches) == EPOCH
    for b in batches:
        assert torch.equal(b.partner_labels, b.labels)
        assert torch.all(b.mix_weight == 0)
    # Same order as with CutMix: only the paste is left out.
    assert all_indices(batches) == all_indices(reference.epoch0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_are_the_mixed_smoothed_distribution(reference, smoothing):
    mixed = [b for b in reference.epoch0
             if (b.mix_weight > 0).all() and (b.partner_labels != b.labels).any()]
    assert mixed, "no batch of epoch 0 mixes two different labels"
    batch = mixed[0]
    t = batch.soft_targets(K, smoothing=smoothing)
    assert t.shape == (B, K) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(B), atol=1e-6, rtol=0)

    def onehot_smoothed(y):
        return (1 - smoothing) * F.one_hot(y, K).float() + smoothing / K

    w = batch.mix_weight.view(-1, 1)
    want = (1 - w) * onehot_smoothed(batch.labels) + w * onehot_smoothed(batch.partner_labels)
    torch.testing.assert_close(t, want, atol=1e-6, rtol=0)
    # Spelled out for a row whose partner has another label.
    i = int((batch.partner_labels != batch.labels).nonzero()[0])
    wi, y, p = float(batch.mix_weight[i]), int(batch.labels[i]), int(batch.partner_labels[i])
    assert t[i, y].item() == pytest.approx((1 - wi) * (1 - smoothing) + smoothing / K, abs=1e-6)
    assert t[i, p].item() == pytest.approx(wi * (1 - smoothing) + smoothing / K, abs=1e-6)
    # With more classes than labels seen, the rest get only the smoothing mass.
    wide = batch.soft_targets(K + 2, smoothing=smoothing)
    torch.testing.assert_close(wide.sum(1), torch.ones(B), atol=1e-6, rtol=0)
    torch.testing.assert_close(wide[:, K:], torch.full((B, 2), smoothing / (K + 2)), atol=1e-7, rtol=0)


# -- normalisation -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unnormalised(data):
    """Epoch 0 of the training loader with normalize=False, otherwise the reference's settings."""
    loader = make(data, normalize=False)
    batches = collect(loader)
    loader.close()
    return batches


def test_unnormalised_images_are_uint8_pixels_of_the_same_batches(unnormalised, reference):
    assert len(unnormalised) == EPOCH
    assert all_indices(unnormalised) == all_indices(reference.epoch0)
    for r, n in zip(unnormalised, reference.epoch0):
        assert r.images.dtype == torch.uint8 and r.images.shape == (B, 3, SIZE, SIZE)
        assert r.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(r.labels, n.labels) and torch.equal(r.partner_labels, n.partner_labels)
        assert torch.equal(r.mix_weight, n.mix_weight)
        pixels = (n.images * STD + MEAN) * 255.0  # the normalised batch, de-normalised
        # The same augmented pictures (a pixel level or so apart; the exact check is below).
        assert (pixels.clamp(0, 255) - r.images.float()).abs().max() <= 1.5
    values = torch.cat([r.images.flatten() for r in unnormalised]).float()
    assert values.std() > 10  # real pictures, not a constant


def _denormalised_and_uint8(data, reference, unnormalised, train):
    if train:
        normalised, raw = reference.epoch0, unnormalised
    else:  # eval at the files' own size: the pipeline's float pixels are the PNGs' integers
        normalised, raw = collect(make(data, train=False)), collect(make(data, train=False, normalize=False))
    pixels = torch.cat([(n.images * STD + MEAN) * 255.0 for n in normalised]).clamp(0, 255)
    return pixels, torch.cat([r.images for r in raw]).float()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_unnormalised_images_are_the_normalised_ones_rounded(data, reference, unnormalised, train):
    """normalize=False gives the pixels the normalised output de-normalises to, rounded."""
    pixels, raw = _denormalised_and_uint8(data, reference, unnormalised, train)
    diff = (pixels - raw).abs()
    assert diff.max().item() <= 0.5 + 1e-2, (
        f"uint8 - round(de-normalised): mean {(raw - pixels.round()).mean().item():+.3f} levels")


# -- length, epochs, order ---------------------------------------------------------------------

def test_len_and_batch_size(data, reference):
    assert reference.lens == [EPOCH, EPOCH]
    assert len(reference.epoch0) == len(reference.epoch1) == EPOCH
    loader = make(data, batch_size=5)
    assert loader.batch_size == 5 and len(loader) == N // 5  # drop_last drops the 4 left over
    assert len(make(data, batch_size=5, train=False)) == -(-N // 5)
    assert len(make(data, batch_size=5, drop_last=False)) == -(-N // 5)


def test_train_epoch_indices_are_disjoint_and_cover_the_split(reference):
    for epoch in (reference.epoch0, reference.epoch1):
        idx = all_indices(epoch)
        assert all(len(b.indices) == B for b in epoch)
        assert len(idx) == len(set(idx)) == N
        assert sorted(idx) == list(range(N))
    assert all_indices(reference.epoch0) != sorted(all_indices(reference.epoch0))  # shuffled


def test_drop_last_keeps_only_full_batches(data):
    batches = collect(make(data, batch_size=5))
    assert len(batches) == N // 5
    assert all(len(b.indices) == 5 and b.images.shape[0] == 5 for b in batches)
    idx = all_indices(batches)
    assert len(idx) == len(set(idx)) == 5 * (N // 5)


def test_eval_gives_every_image_once_in_order_last_batch_partial(data):
    labels = data[1]
    loader = make(data, train=False, batch_size=5)
    batches = collect(loader)
    assert [len(b.indices) for b in batches] == [5, 5, 5, 5, 4]
    assert all_indices(batches) == list(range(N))
    assert torch.cat([b.labels for b in batches]).tolist() == labels
    for b in batches:
        assert torch.equal(b.partner_labels, b.labels) and torch.all(b.mix_weight == 0)
        assert b.images.shape == (len(b.indices), 3, SIZE, SIZE) and b.images.dtype == torch.float32
    again = collect(loader)  # the next epoch: the same images, the same order
    assert_same_batches(again, batches)
    loader.close()


def test_new_iter_after_finished_epoch_starts_the_next_epoch(data, reference):
    assert all_indices(reference.epoch1) != all_indices(reference.epoch0)
    fresh = make(data)
    fresh.set_epoch(1)
    assert_same_batches(collect(fresh), reference.epoch1)
    fresh.close()


def test_sampler_set_epoch_chooses_the_epoch(data, reference):
    loader = make(data)
    loader.sampler.set_epoch(1)  # as code written for DistributedSampler calls it
    assert_same_batches(collect(loader), reference.epoch1)
    loader.sampler.set_epoch(0)  # back to an earlier epoch: the same batches again
    assert_same_batches(collect(loader), reference.epoch0)
    assert_same_batches(collect(loader), reference.epoch1)  # and on from there
    loader.close()


def test_new_iter_after_break_starts_the_next_epoch(data, reference):
    loader = make(data)
    for k, batch in enumerate(loader):
        if k == 1:
            break
    assert len(loader) == EPOCH  # the next iter() is a whole epoch
    assert_same_batches(collect(loader), reference.epoch1)
    loader.close()


def test_state_dict_resumes_mid_epoch_in_a_new_loader(data, reference):
    first = make(data)
    it = iter(first)
    taken = [clone(next(it)), clone(next(it))]
    assert_same_batches(taken, reference.epoch0[:2])
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 2}
    first.close()

    resumed = make(data)
    resumed.load_state_dict(state)
    assert len(resumed) == EPOCH  # the epoch's length; the resumed epoch yields len - batch
    rest = collect(resumed)
    assert len(rest) == len(resumed) - state["batch"]
    assert_same_batches(rest, reference.epoch0[2:])
    # The epoch is complete: the state points at the next one, which the next iter() yields.
    assert resumed.state_dict() == {"epoch": 1, "batch": 0}
    assert len(resumed) == EPOCH
    assert_same_batches(collect(resumed), reference.epoch1)
    assert resumed.state_dict() == reference.state == {"epoch": 2, "batch": 0}
    resumed.close()


def test_state_dict_resumes_mid_epoch_in_a_later_epoch(data, reference):
    resumed = make(data)
    resumed.load_state_dict({"epoch": 1, "batch": 5})
    assert len(resumed) == EPOCH
    assert_same_batches(collect(resumed), reference.epoch1[5:])


def test_close_and_context_manager_keep_the_position(data, reference):
    with make(data) as loader:
        assert_same_batches(collect(loader), reference.epoch0)
    # After close (here by the with block), iterating works again and goes on with epoch 1.
    assert_same_batches(collect(loader), reference.epoch1)
    loader.close()
    loader.close()  # twice is harmless
    loader.set_epoch(0, start_batch=3)
    assert len(loader) == EPOCH
    it = iter(loader)
    assert_same_batches([clone(next(it))], reference.epoch0[3:4])
    loader.close()  # closed mid-epoch: the next iter() starts the next epoch
    assert_same_batches(collect(loader), reference.epoch1)
    loader.close()


# -- sharding ----------------------------------------------------------------------------------

def test_two_ranks_split_each_epoch_disjointly(data):
    """world=2: each rank sees half of every epoch, the halves together make the whole epoch.
    (This failed once in DALI with "Strided data not supported": real batches are iterated.)"""
    labels = torch.tensor(data[1])
    epochs = {}
    for rank in (0, 1):
        loader = make(data, rank=rank, world=2)
        assert len(loader) == N // (2 * B)
        epochs[rank] = [collect(loader), collect(loader)]
        loader.close()
    for e in (0, 1):
        a, b = all_indices(epochs[0][e]), all_indices(epochs[1][e])
        assert len(a) == len(b) == N // 2
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(range(N))
        for batch in epochs[0][e] + epochs[1][e]:
            assert batch.images.shape == (B, 3, SIZE, SIZE)
            assert torch.equal(batch.labels, labels[batch.indices])
    assert all_indices(epochs[0][0]) != all_indices(epochs[0][1])  # each epoch reshuffles


# -- from_config -------------------------------------------------------------------------------

def fast_config():
    """The erkt preset (FAST's) at FAST's sizes and threads, seed 0, float32."""
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size = SIZE, B
    cfg.data.num_threads, cfg.data.prefetch, cfg.data.dtype = 1, 1, "float32"
    cfg.run.seed = 0
    return cfg


def test_from_config_matches_the_keyword_loader(data, reference):
    paths, labels = data
    cfg = fast_config()
    loader = DaliLoader.from_config(paths, labels, cfg, device="cpu", train=True)
    assert loader.batch_size == B and len(loader) == EPOCH
    assert_same_batches(collect(loader), reference.epoch0)
    loader.close()

    cfg.run.seed = 1  # the run's seed picks the order
    other = DaliLoader.from_config(paths, labels, cfg, device="cpu", train=True)
    assert all_indices(collect(other)) != all_indices(reference.epoch0)
    other.close()

    wide = DaliLoader.from_config(paths, labels, cfg, device="cpu", train=False, batch_size=10)
    assert wide.batch_size == 10
    assert [len(b.indices) for b in collect(wide)] == [10, 10, 4]
    wide.close()


def test_from_split_is_from_config_of_the_part(data, reference):
    paths, labels = data
    cfg = fast_config()
    root = str(paths[0].parents[1])
    split = Split(root, ["beach", "forest", "harbor"],
                  [(str(p.relative_to(root)), y) for p, y in zip(paths, labels)], [], 1.0, 0, True)
    loader = DaliLoader.from_split(split, "train", cfg, device="cpu", train=True)
    assert_same_batches(collect(loader), reference.epoch0)
    loader.close()
    # The run's Runtime as the device: its device, and its DALI threads where resolved.
    rt = Runtime(torch.device("cpu"), dali_threads=2)
    with DaliLoader.from_split(split, "train", cfg, device=rt, train=False) as loader:
        assert loader.device == torch.device("cpu") and loader._settings["num_threads"] == 2
        assert [len(b.indices) for b in collect(loader)] == [B] * EPOCH
    unresolved = DaliLoader.from_split(split, "train", cfg, device=Runtime(torch.device("cpu")),
                                       train=False)
    assert unresolved._settings["num_threads"] == 1  # data.num_threads
    with pytest.raises(ValueError, match="part"):
        DaliLoader.from_split(split, "val", cfg, device="cpu", train=False)


# -- errors ------------------------------------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message.strip()
    return message


# Each case: the loader's arguments from the good (paths, labels), and a word its message has.
BAD_INPUT = {
    "mismatched lengths": (lambda p, l: dict(paths=p, labels=l[:-1]), "label"),
    "no images": (lambda p, l: dict(paths=[], labels=[]), "no images"),
    "too few for a batch": (lambda p, l: dict(paths=p[:3], labels=l[:3]), "batch"),
    "unknown field": (lambda p, l: dict(paths=p, labels=l, fields=("images", "logits")), "logits"),
    "rank outside world": (lambda p, l: dict(paths=p, labels=l, rank=2, world=2), "rank"),
    "negative rank": (lambda p, l: dict(paths=p, labels=l, rank=-1, world=2), "rank"),
    "bad dtype": (lambda p, l: dict(paths=p, labels=l, dtype="int8"), "dtype"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_raises_a_one_line_data_error(data, case):
    arguments, word = BAD_INPUT[case]
    kwargs = {**FAST, **arguments(*data)}
    with pytest.raises(DataError) as exc:
        DaliLoader(kwargs.pop("paths"), kwargs.pop("labels"), **kwargs)
    assert word in _one_line(exc).lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_device_without_cuda_raises_a_data_error(data):
    paths, labels = data
    with pytest.raises(DataError) as exc:  # device="cuda" is the default
        DaliLoader(paths, labels, image_size=SIZE, batch_size=B)
    assert "cuda" in _one_line(exc).lower()
    with pytest.raises(DataError) as exc:
        DaliLoader(paths, labels, image_size=SIZE, batch_size=B, device="cuda:0")
    assert "cpu" in _one_line(exc).lower()  # it says what to use instead
