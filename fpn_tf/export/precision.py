"""Which compute dtype a served model runs in: bfloat16 where the CPU has bfloat16 units.

``scripts/export.py --compute_dtype=auto`` (its default) exports
``compute_dtype="mixed_bfloat16"`` when the exporting machine's CPU has
AVX512-BF16 (``avx512_bf16``: AMD Zen 4/5, Intel Cooper Lake and later) or AMX
(``amx_bf16``: Intel Sapphire Rapids and later), and float32 otherwise. On such
CPUs oneDNN's bfloat16 kernels run the convolutions and fcs about 1.8× faster
(docs/benchmarks.md) and detections match float32 (tests/test_bfloat16.py: same
classes, IoU ≥ 0.9); on a CPU without them bfloat16 is emulated and slower than
float32, so float32 stays the default there. Variables stay float32 either way (the
same checkpoint), and box, score and proposal maths are float32.

The choice is written into the SavedModel's assets (``serving_precision.json``:
the dtype, why it was chosen, the exporting CPU and its ISA) next to
``model_config.json`` (whose ``compute_dtype`` is the one served). A SavedModel
is traced for the dtype it was exported with: serving it on a CPU without
bfloat16 units works, but slowly; export with ``--compute_dtype=float32`` for such
servers.
"""

from __future__ import annotations

SERVING_DTYPES = ("auto", "float32", "mixed_bfloat16")
BF16_ISA = ("avx512_bf16", "amx_bf16")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PRECISION_ASSET = "serving_precision.json"


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """{"cpu": model name, "isa": sorted ISA_FLAGS the CPU reports} (Linux; else unknown / [])."""
    cpu, flags = "unknown", set()
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "isa": sorted(f for f in ISA_FLAGS if f in flags)}


def resolve_serving_dtype(requested: str, isa: list[str] | None = None) -> tuple[str, str]:
    """``(compute_dtype, reason)`` for an export.

    Args:
      requested: "auto" (bfloat16 where ``isa`` has AVX512-BF16 or AMX, else
        float32), "float32" or "mixed_bfloat16".
      isa: the CPU's ISA flags; None reads this machine's (``cpu_info``).

    Raises:
      ValueError: ``requested`` is none of SERVING_DTYPES.
    """
    if requested not in SERVING_DTYPES:
        raise ValueError(f"compute_dtype {requested!r} is not one of {', '.join(SERVING_DTYPES)}")
    if requested != "auto":
        return requested, f"requested at export (--compute_dtype={requested})"
    isa = cpu_info()["isa"] if isa is None else list(isa)
    units = [f for f in BF16_ISA if f in isa]
    if units:
        return "mixed_bfloat16", f"auto: the exporting CPU has {' and '.join(units)}"
    return "float32", "auto: the exporting CPU has neither avx512_bf16 nor amx_bf16"
