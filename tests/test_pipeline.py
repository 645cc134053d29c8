"""The DALI pipeline (CPU variant) against the torchvision twin, on identical plans."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dali_erkt.config import UNITS, default_config, vsm_preset
from dali_erkt.data import reference
from dali_erkt.data.loader import DaliLoader
from dali_erkt.data.plan import make_batch_plan

S = 48  # image size for these tests: small, so the CPU pipeline is quick


def make_images(folder, n, size=S, seed=0):
    """n PNG files (lossless, so DALI and Pillow decode identical pixels) of smooth scenes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        f = rng.uniform(1, 4, size=3)
        img = np.stack([np.sin(2 * np.pi * (f[c] * xx + (c + 1) * yy) + i) for c in range(3)], -1)
        img = (127.5 + 100 * img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        p = folder / f"{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def only(unit: str | None, p: float = 1.0):
    """A config where `unit` alone runs, with probability p; fp32 output for comparisons."""
    cfg = default_config()
    cfg.vsm = vsm_preset("none")
    if unit:
        getattr(cfg.vsm, unit).p = p
    cfg.data.image_size = S
    cfg.data.batch_size = 8
    cfg.data.num_threads = 2
    cfg.data.dtype = "float32"
    return cfg


def run_and_replay(paths, cfg, seed=3, epoch=0):
    """One epoch's first batch from the DALI CPU pipeline and the twin's replay of its plan."""
    loader = DaliLoader.from_config(paths, [0] * len(paths), cfg, device="cpu", train=True, seed=seed)
    loader.set_epoch(epoch)
    batch = next(iter(loader))
    idx = batch.indices.numpy()
    plan = make_batch_plan(cfg.vsm, S, seed, epoch, 0, idx)
    imgs = [reference.to_tensor(np.asarray(Image.open(paths[i]).convert("RGB"))) for i in idx]
    twin = reference.normalize(reference.apply_plan(imgs, plan, cfg.vsm, S, cfg.data.mean),
                               cfg.data.mean, cfg.data.std)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    to255 = lambda t: (t.float() * std + mean) * 255.0  # back to pixel levels
    return to255(batch.images), to255(twin), plan, batch


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), 24)


# Per unit: (max mean absolute error in levels of 255, max single-pixel error in levels).
# Rotation and the crop's resampling may differ on a few boundary pixels (nearest-neighbour
# ties, antialias filter support); the exact units must agree to float rounding.

# Measured on these images: every unit but the crop agrees exactly; the crop's resampling
# differs by 0.27 levels on average (16 at most).
TOLERANCE = {
    None: (1e-3, 0.01),
    "color_jitter": (0.01, 0.1),
    "hflip": (1e-3, 0.01),
    "vflip": (1e-3, 0.01),
    "grayscale": (0.01, 0.1),
    "autocontrast": (0.01, 0.1),
    "erasing": (1e-3, 0.01),
    "cutmix": (1e-3, 0.01),
    "rotation": (0.5, 255.0),
    "resized_crop": (0.5, 32.0),
}


@pytest.mark.parametrize("unit", list(TOLERANCE))
def test_unit_matches_torchvision_twin(paths, unit):
    cfg = only(unit)
    dali, twin, plan, _ = run_and_replay(paths, cfg)
    err = (dali - twin).abs()
    mean_tol, max_tol = TOLERANCE[unit]
    assert err.mean().item() <= mean_tol, f"{unit}: mean error {err.mean().item():.4f}"
    assert err.max().item() <= max_tol, f"{unit}: max error {err.max().item():.3f}"
    if unit not in (None, "cutmix"):
        # The unit really changed the images (so the comparison is not trivially identity).
        untouched = reference.normalize(torch.stack(
            [reference.to_tensor(np.asarray(Image.open(paths[i]).convert("RGB")))
             for i in plan.indices]), cfg.data.mean, cfg.data.std)
        assert not torch.allclose(twin, (untouched * torch.tensor(cfg.data.std).view(1, 3, 1, 1)
                                         + torch.tensor(cfg.data.mean).view(1, 3, 1, 1)) * 255)


def test_flip_and_grayscale_exact(paths):
    cfg = only(None)
    cfg.vsm.hflip.p = cfg.vsm.vflip.p = cfg.vsm.grayscale.p = 0.5
    dali, twin, _, _ = run_and_replay(paths, cfg)
    assert (dali - twin).abs().max().item() <= 1.0  # within one level


def test_gate_selects_exactly_the_planned_samples(paths):
    """A p = 0.5 unit runs inside a DALI conditional: gray output exactly where the plan says."""
    cfg = only("grayscale", 0.5)
    cfg.data.batch_size = 24
    dali, _, plan, _ = run_and_replay(paths, cfg)
    is_gray = ((dali[:, 0] - dali[:, 1]).abs().amax(dim=(1, 2)) < 0.05).numpy()
    assert 0 < plan.gates["grayscale"].sum() < len(plan)
    np.testing.assert_array_equal(is_gray, plan.gates["grayscale"])


def test_cutmix_weight_is_pasted_area(paths):
    cfg = only("cutmix")
    dali, _, plan, batch = run_and_replay(paths, cfg)
    y, x, h, w = plan.cutmix_box
    assert h * w > 0
    np.testing.assert_allclose(batch.mix_weight.numpy(), h * w / (S * S), rtol=1e-6)
    # Pasted pixels are the partner's, the rest the sample's own.
    perm = plan.cutmix_perm
    plain = only(None)
    base, _, _, _ = run_and_replay(paths, plain)  # same seed and epoch: same order
    torch.testing.assert_close(dali[:, :, y:y + h, x:x + w], base[perm][:, :, y:y + h, x:x + w])
    mask = torch.ones(S, S, dtype=torch.bool)
    mask[y:y + h, x:x + w] = False
    torch.testing.assert_close(dali[:, :, mask], base[:, :, mask])
    np.testing.assert_array_equal(batch.partner_labels.numpy(), batch.labels.numpy()[perm])


def test_erasing_fills_with_mean_colour(paths):
    cfg = only("erasing")
    _, _, plan, batch = run_and_replay(paths, cfg)
    for i in range(len(plan)):
        y, x, h, w = plan.erase_box[i]
        if h:
            region = batch.images[i, :, y:y + h, x:x + w].float()
            assert region.abs().max().item() < 1e-5  # 0 after normalisation


def test_output_shape_dtype_layout(paths):
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_threads = S, 8, 2
    loader = DaliLoader.from_config(paths, list(range(len(paths))), cfg, device="cpu", train=True, seed=1)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, S, S)
    assert batch.images.dtype == torch.float16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == batch.partner_labels.dtype == batch.indices.dtype == torch.int64
    assert batch.mix_weight.dtype == torch.float32
    np.testing.assert_array_equal(batch.labels.numpy(), batch.indices.numpy())
    cfg.data.dtype = "float32"
    loader = DaliLoader.from_config(paths, list(range(len(paths))), cfg, device="cpu", train=True, seed=1)
    assert next(iter(loader)).images.dtype == torch.float32


def test_full_erkt_preset_matches_twin(paths):
    """All nine units together, on the paper's probabilities."""
    cfg = only(None)
    cfg.vsm = vsm_preset("erkt")
    dali, twin, _, _ = run_and_replay(paths, cfg, seed=11)
    err = (dali - twin).abs()
    assert err.mean().item() < 0.5, err.mean().item()  # the crop's resampling only
    assert (err > 2.0).float().mean().item() < 0.01


def test_every_unit_name_has_a_tolerance():
    assert set(UNITS) == {u for u in TOLERANCE if u}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares the GPU pipeline with the CPU one")
def test_gpu_pipeline_matches_cpu(paths):
    cfg = only(None)
    cfg.vsm = vsm_preset("erkt")
    cfg.data.batch_size = 24
    out = {}
    for device in ("cpu", "cuda:0"):
        loader = DaliLoader.from_config(paths, list(range(len(paths))), cfg, device=device, train=True, seed=5)
        loader.set_epoch(2)
        out[device] = next(iter(loader))
    cpu, gpu = out["cpu"], out["cuda:0"]
    assert gpu.images.is_cuda and gpu.labels.is_cuda
    np.testing.assert_array_equal(cpu.indices.numpy(), gpu.indices.cpu().numpy())
    np.testing.assert_allclose(cpu.mix_weight.numpy(), gpu.mix_weight.cpu().numpy())
    err = (cpu.images.float() - gpu.images.float().cpu()).abs() * 0.225 * 255
    assert err.mean().item() < 1.0, err.mean().item()


# ---- the loader: epochs, resume, replay ------------------------------------------------------

def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [b for b in loader]


def test_loader_epochs_resume_and_replay(paths):
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_threads = S, 5, 2
    labels = [i % 3 for i in range(len(paths))]
    loader = DaliLoader.from_config(paths, labels, cfg, device="cpu", seed=9)
    assert len(loader) == len(paths) // 5  # drop_last: one shape for every training batch
    e0 = _epoch(loader, 0)
    e1 = _epoch(loader, 1)
    assert len(e0) == len(e1) == len(loader)
    seen = torch.cat([b.indices for b in e0])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice in an epoch
    assert not torch.equal(seen, torch.cat([b.indices for b in e1]))  # reshuffled
    # Resume inside epoch 1 at batch 2: the same batches as the uninterrupted epoch's tail.
    fresh = DaliLoader.from_config(paths, labels, cfg, device="cpu", seed=9)
    tail = _epoch(fresh, 1, start=2)
    assert len(tail) == len(e1) - 2
    for a, b in zip(tail, e1[2:]):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        assert torch.equal(a.mix_weight, b.mix_weight) and torch.equal(a.partner_labels, b.partner_labels)
    # Going back to epoch 0 replays it exactly.
    again = _epoch(loader, 0)
    assert all(torch.equal(a.images, b.images) for a, b in zip(again, e0))


def test_loader_rejects_bad_requests(paths):
    from dali_erkt.errors import DataError

    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size = S, 8
    with pytest.raises(DataError, match="no full batch"):
        DaliLoader.from_config(paths[:3], [0, 1, 2], cfg, device="cpu")
    loader = DaliLoader.from_config(paths, [0] * len(paths), cfg, device="cpu", train=True)
    with pytest.raises(DataError, match="outside the epoch"):
        loader.set_epoch(0, start_batch=len(loader))
    with pytest.raises(DataError, match="labels"):
        DaliLoader.from_config(paths, [0], cfg, device="cpu")


def test_eval_loader_keeps_order_and_last_partial_batch(paths):
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size = S, 10
    loader = DaliLoader.from_config(paths, list(range(len(paths))), cfg, device="cpu", train=False)
    batches = list(loader)
    assert [b.labels.shape[0] for b in batches] == [10, 10, 4]
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(paths)))
    assert all((b.mix_weight == 0).all() for b in batches)


def test_every_format_and_mode_decodes_like_pillow(image_tree):
    """JPEG, PNG, TIFF, BMP; grayscale, RGBA and CMYK: DALI's decoder gives Pillow's RGB pixels."""
    from dali_erkt.data.dataset import load_rgb, scan

    classes, samples = scan(image_tree)
    files = [image_tree / p for p, _ in samples]
    cfg = default_config()
    cfg.data.image_size, cfg.data.batch_size, cfg.data.dtype = 32, len(files), "float32"
    cfg.data.mean, cfg.data.std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # output = pixels
    batch = next(iter(DaliLoader.from_config(files, [l for _, l in samples], cfg, device="cpu", train=False)))
    for i, f in enumerate(files):
        ref = reference.resize(reference.to_tensor(load_rgb(f)), 32) * 255
        err = (batch.images[i].float() - ref).abs().mean().item()
        # Same decoded pixels; the two resize filters differ slightly (measured below 0.05 levels).
        assert err < 0.5, (f.name, err)


@pytest.mark.parametrize("preset", ["erkt", "base"])
def test_gpu_graph_is_defined_without_cuda(preset):
    """The GPU variant's graph (mixed decoding, GPU operators inside conditionals, CPU plan
    arguments) traces without CUDA; building it needs a GPU (test_gpu_pipeline_matches_cpu)."""
    from dali_erkt.data.pipeline import eval_pipeline, train_pipeline
    from dali_erkt.data.source import EpochSource

    cfg = default_config(preset)
    d = cfg.data
    common = dict(image_size=d.image_size, mean=d.mean, std=d.std, dtype=d.dtype, normalize=True,
                  device_id=0, batch_size=d.batch_size, num_threads=1, prefetch=1)
    train = EpochSource(["x.jpg"] * 40, [0] * 40, batch_size=d.batch_size, train=True, vsm=cfg.vsm,
                        image_size=d.image_size)
    test = EpochSource(["x.jpg"] * 40, [0] * 40, batch_size=d.batch_size, train=False, vsm=None,
                       image_size=d.image_size)
    for pipe in (train_pipeline(train, train.names, vsm=cfg.vsm, **common),
                 eval_pipeline(test, test.names, **common)):
        assert all(node.device == "gpu" for node in pipe._graph_out)
