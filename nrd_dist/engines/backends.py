"""What each backend can do, as plain data: the config checks a request against it
before anything starts, without importing torch or DeepSpeed."""

from __future__ import annotations

BACKENDS = ("ddp", "deepspeed")

# zero: ZeRO stages 1-3; grad_accum: engine.grad_accum_steps > 1; compile: torch.compile
# of the student (DeepSpeed's ZeRO hooks are not traced here).
CAPABILITIES = {
    "ddp": {"zero": False, "grad_accum": False, "compile": True},
    "deepspeed": {"zero": True, "grad_accum": True, "compile": False},
}


def check_engine_settings(backend: str, zero_stage: int, grad_accum_steps: int, compile: bool) -> None:
    """Raises ValueError naming the ``engine.`` key that ``backend`` cannot honour."""
    can = CAPABILITIES[backend]
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}")
    if zero_stage and not can["zero"]:
        raise ValueError(f"zero_stage: ZeRO needs engine.backend=deepspeed (got backend {backend!r})")
    if grad_accum_steps > 1 and not can["grad_accum"]:
        raise ValueError("grad_accum_steps: gradient accumulation needs engine.backend=deepspeed")
    if compile and not can["compile"]:
        raise ValueError(
            "compile: supported with engine.backend=ddp (and one process); DeepSpeed's ZeRO hooks are not traced here"
        )
