"""`dali-erkt demo`: the whole method end to end on built-in generated scenes.

generate scenes -> split -> train the three teachers -> distil the student -> evaluate -> report

Settings are small on the CPU (the whole demo fits in a few minutes on 2 cores) and bigger on a
GPU. The method is the paper's (a weighted three-teacher ensemble, the VSM, CE + DIST); sizes and
epochs shrink, and the networks start from random weights (no downloads). On the CPU the models
are small ResNets: EfficientNets trained from scratch on a few hundred images do not generalise
within a CPU minute (measured on the demo scenes, 8 epochs: EfficientNet-B0 22-35% test accuracy,
ResNet-10-T 92%). On a GPU the demo uses the paper's models.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, default_config
from ..data.dataset import make_split, save_split
from ..data.loader import DaliLoader
from ..engine import Distillation, Supervised, fit
from ..teachers import LiveTeacher
from ..evaluation import predict, scores, write_report
from ..io import atomic_write_text
from ..models import build_ensemble, place
from ..runtime import resolve_device, resolve_runtime
from ..synthetic import make_scenes


@dataclass
class DemoSettings:
    teachers: tuple[str, ...]
    student: str
    classes: int
    per_class: int
    image_size: int
    train_ratio: float
    teacher_epochs: int
    student_epochs: int
    lr: float
    batch_size: int


DEMO = {
    "cpu": DemoSettings(teachers=("resnet18", "resnet14t", "resnet10t"), student="resnet10t",
                        classes=6, per_class=80, image_size=64, train_ratio=0.5, teacher_epochs=10,
                        student_epochs=15, lr=1e-3, batch_size=30),
    "cuda": DemoSettings(teachers=("efficientnet_b3", "efficientnet_b0", "resnet50"),
                         student="efficientnet_b0", classes=8, per_class=200, image_size=128,
                         train_ratio=0.5, teacher_epochs=30, student_epochs=60, lr=1e-3,
                         batch_size=64),
}


def demo_config(preset: str, s: DemoSettings, epochs: int, device: str) -> Config:
    cfg = default_config(preset)
    cfg.data.image_size = s.image_size
    cfg.data.batch_size = s.batch_size
    cfg.data.num_threads = 2 if device == "cpu" else 4
    cfg.optim.epochs = epochs
    cfg.optim.lr = s.lr
    cfg.model.teachers, cfg.model.arch = s.teachers, s.student
    cfg.run.device = device
    cfg.run.log_every = 5
    return cfg.validate()


def run_demo(out_dir, device: str, progress: bool = True, settings: DemoSettings | None = None) -> dict:
    """Run the demo into a new folder under `out_dir`; return the report (also report.json)."""
    device = resolve_device(device)  # the settings depend on the kind of device
    s = settings or DEMO[device.type]
    out = Path(out_dir) / time.strftime("%Y%m%d-%H%M%S")
    if out.exists():  # two demos in one second: never overwrite a run
        out = out.with_name(out.name + f"-{time.time_ns() % 1000000}")
    start = time.time()

    data = make_scenes(out / "data", classes=s.classes, per_class=s.per_class, size=s.image_size)
    split = make_split(data, s.train_ratio, seed=0)
    save_split(split, out / "split")

    teacher_cfg = demo_config("base", s, s.teacher_epochs, str(device))
    rt = resolve_runtime(teacher_cfg.run)
    teachers, paths = {}, []
    for k, arch in enumerate(s.teachers):
        name = arch if s.teachers.count(arch) == 1 else f"{arch}-{k}"
        teacher_cfg.run.seed = k  # distinct initialisations when an arch repeats
        teacher_cfg.model.arch, teacher_cfg.model.teachers, teacher_cfg.model.teacher_weights = arch, (), ()
        teachers[name] = fit(teacher_cfg, split, out / "teachers" / name, Supervised(), rt,
                             progress=progress)
        paths.append(out / "teachers" / name / "last.pt")

    student_cfg = demo_config("erkt", s, s.student_epochs, str(device))
    m = student_cfg.model
    ensemble = build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, split.classes)
    student = fit(student_cfg, split, out / "student", Distillation.from_config(LiveTeacher(ensemble), student_cfg.loss),
                  rt, progress=progress)
    loader = DaliLoader.from_split(split, "test", student_cfg, device=rt, train=False)
    preds, targets = predict(place(ensemble, rt.device, rt.channels_last), loader, rt)
    loader.close()
    ens = write_report(scores(preds, targets, len(split.classes)), split.classes, out / "reports",
                       "ensemble", "test", int(targets.numel()))

    report = {
        "student_oa": student["last_oa"], "student_best_oa": student["best_oa"],
        "ensemble_oa": ens["oa"],
        "teacher_oa": {arch: t["last_oa"] for arch, t in teachers.items()},
        "agreement": student["agreement"],
        "chance": 1.0 / len(split.classes), "classes": len(split.classes),
        "train_images": len(split.train), "test_images": len(split.test),
        "image_size": s.image_size, "device": student["device"], "precision": student["precision"],
        "student_images_per_s": student["images_per_s"],
        "seconds": round(time.time() - start, 1), "out": str(out),
        "student_checkpoint": str(out / "student" / "last.pt"),
        "confusion_png": ens["confusion_png"],
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_report(r: dict) -> str:
    pct = lambda v: f"{v * 100:6.2f}%"
    lines = [f"dali-erkt demo: {r['classes']} generated scene classes, {r['train_images']} train / "
             f"{r['test_images']} test images at {r['image_size']} px on {r['device']} "
             f"({r['precision']}), {r['seconds']:.0f} s", ""]
    for arch, oa in r["teacher_oa"].items():
        lines.append(f"  teacher {arch:<18} OA {pct(oa)}")
    lines += [f"  teacher ensemble           OA {pct(r['ensemble_oa'])}",
              f"  student (ERKT distilled)   OA {pct(r['student_oa'])}  (last epoch; best "
              f"{pct(r['student_best_oa']).strip()}; agrees with the ensemble on "
              f"{pct(r['agreement']).strip()})",
              f"  chance                     OA {pct(r['chance'])}", "",
              f"files: {r['out']} (student checkpoint {r['student_checkpoint']})"]
    return "\n".join(lines)
