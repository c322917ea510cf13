"""DeepSpeed gradient accumulation through the engine interface (one process):
two micro-batches of 4 must give the update of one batch of 8, and the learning-rate
schedule must advance once. Prints a JSON line for the test."""

import copy
import json

import torch

from nrd_dist.config import load_config
from nrd_dist.engines import build_engine
from nrd_dist.models import build_model

cfg = load_config(
    None, ["engine.backend=deepspeed", "engine.grad_accum_steps=2", "data.batch_size=4", "model.arch=mlp"]
)
engine = build_engine(cfg)
torch.manual_seed(0)
model = build_model("mlp", 10, 1)
reference = copy.deepcopy(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
engine.setup(model, optimizer)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
for half in (slice(0, 4), slice(4, 8)):
    loss = torch.nn.functional.cross_entropy(engine.model(engine.to_device(x[half])), y[half])
    engine.step(loss, scheduler)
ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
torch.nn.functional.cross_entropy(reference(x), y).backward()
ref_opt.step()
diff = max(float((a - b).abs().max()) for a, b in zip(engine.module.parameters(), reference.parameters()))
print(json.dumps({"max_diff": diff, "scheduler_steps": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"]}))
engine.close()
