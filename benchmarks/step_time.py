"""Train-step time of NRD against CE on the same model and batch, data already on the
device, in one process: the two steps alternate in blocks so that any drift of the
machine (clocks, other load) hits both alike. Also the EMA update's time as a fraction
of a CE step.

    .venv/bin/python benchmarks/step_time.py --arch resnet50 --image-size 224 --batch-size 16

CE step: student forward + backward + SGD step. NRD step: the same plus the teacher's
forward on the (unseen) teacher view and the EMA update: the extra cost NRD pays.
Engine, precision and memory format are what a training run would choose here
(``engine.precision: auto``: bf16 autocast on a bf16 GPU, fp32 on CPU; channels_last on
GPU and CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

from nrd_dist.config import load_config
from nrd_dist.engines import build_engine
from nrd_dist.losses import build_loss
from nrd_dist.models import build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, args):
        cfg = load_config(
            None,
            [
                f"model.arch={args.arch}",
                f"data.batch_size={args.batch_size}",
                f"engine.precision={args.precision}",
                f"data.num_classes={args.num_classes}",
            ],
        )
        self.engine = engine = build_engine(cfg)
        torch.manual_seed(0)
        model = engine.prepare_module(build_model(args.arch, args.num_classes, args.channels))
        template = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        engine.setup(model, optimizer)
        self.teacher = engine.make_teacher(template)
        self.ce = build_loss("ce")
        self.nrd = build_loss("nrd", pi=[0.1, 0.8, 0.1])
        shape = (args.batch_size, args.channels, args.image_size, args.image_size)
        self.student_view = engine.to_device(torch.randn(shape))
        self.teacher_view = engine.to_device(torch.randn(shape))
        self.labels = torch.randint(0, args.num_classes, (args.batch_size,)).to(engine.device)
        if args.compile:  # as engine.compile does in a training run
            engine.compile(model, self.teacher.module, self.ce, self.nrd)

    def ce_step(self) -> None:
        engine = self.engine
        with engine.autocast():
            logits = engine.model(self.student_view)
        engine.step(self.ce(logits, self.labels))

    def nrd_step(self) -> None:
        engine = self.engine
        with engine.autocast():
            logits = engine.model(self.student_view)
            teacher_probs = self.teacher.predict_probs(self.teacher_view)
        engine.step(self.nrd(logits, self.labels, teacher_probs))
        self.teacher.update(engine.module)

    def ema_update(self) -> None:
        self.teacher.update(self.engine.module)

    def time_block(self, step, count: int) -> float:
        """Seconds per call of ``step`` over ``count`` calls."""
        synchronize(self.engine.device)
        started = time.perf_counter()
        for _ in range(count):
            step()
        synchronize(self.engine.device)
        return (time.perf_counter() - started) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=None, help="default: 1 for 28 px, else 3")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--blocks", type=int, default=5, help="alternating CE / NRD blocks")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile student, teacher and losses (the warm-up steps pay the compilation)",
    )
    args = parser.parse_args()
    if args.channels is None:
        args.channels = 1 if args.image_size == 28 else 3
    bench = Bench(args)
    for _ in range(args.warmup):
        bench.ce_step()
        bench.nrd_step()
    ce, nrd, ema = [], [], []
    for _ in range(args.blocks):
        ce.append(bench.time_block(bench.ce_step, args.steps))
        nrd.append(bench.time_block(bench.nrd_step, args.steps))
        ema.append(bench.time_block(bench.ema_update, args.steps))
    ce_s, nrd_s, ema_s = (statistics.median(v) for v in (ce, nrd, ema))
    device = bench.engine.device
    report = {
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": bench.engine.precision,
        "channels_last": bench.engine.channels_last,
        "compiled": args.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ce_step_ms": round(1000 * ce_s, 3),
        "nrd_step_ms": round(1000 * nrd_s, 3),
        "nrd_over_ce": round(nrd_s / ce_s, 3),
        "ema_update_ms": round(1000 * ema_s, 3),
        "ema_over_ce_step": round(ema_s / ce_s, 4),
        "ce_images_per_s": round(args.batch_size / ce_s, 1),
        "nrd_images_per_s": round(args.batch_size / nrd_s, 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
