"""What an export will need in memory, what the box has, and a refusal that says so before the kernel's
OOM killer ends the export with nothing said.

The estimate follows the export's steps, which run one after another and each let go of the one before
(the builder in its own process, the PyTorch reference alone, then the artifact's session), so the need
is the largest step's, not their sum. Its terms were measured on random-weight Llama shapes (1B, 3B, 8B;
bench/export.py) and are rounded up.
"""

from __future__ import annotations

from pathlib import Path

HEADROOM = 1 << 30  # the interpreter, torch, ORT and transformers themselves
# bytes per parameter of a graph's weights at each precision (int4 k_quant_mixed: a third of the layers and
# the head in int8, scales and zero points beside the nibbles)
_STORED = {"fp32": 4.0, "fp16": 2.0, "int8": 1.07, "int4": 0.72}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """What this process's memory cgroup (v2 or v1) still allows, reclaimable page cache counted free."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, used = _read_int(base / "memory.max"), _read_int(base / "memory.current")
            stat = base / "memory.stat"
            key = "inactive_file"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, used = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
            stat = base / "memory.stat"
            key = "total_inactive_file"
        else:
            continue
        if limit is None or used is None or limit >= 1 << 60:  # "max", or v1's no-limit sentinel
            continue
        cache = 0
        if stat.is_file():
            for row in stat.read_text().splitlines():
                name, _, value = row.partition(" ")
                if name == key and value.isdigit():
                    cache = int(value)
        return max(0, limit - used + cache)
    return None


def available() -> int:
    """Bytes this process can still take: the kernel's MemAvailable, or less where a cgroup limits it."""
    meminfo = dict(
        (k, int(v.split()[0]) * 1024)
        for k, _, v in (line.partition(":") for line in Path("/proc/meminfo").read_text().splitlines())
        if v.strip()
    )
    room = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    limited = _cgroup_room()
    return min(room, limited) if limited is not None else room


def needed(params: int, checkpoint_bytes: int, precision: str, streamed: bool) -> int:
    # checkpoint_bytes: the weights as read back (MXFP4 experts unpacked to the checkpoint's dtype)
    """Bytes the largest step of an export of a ``params`` model at ``precision`` takes.

    - the builder: the graph it keeps (quantised layers as it goes when ``streamed``; else the fp32 model
      and a second copy of it, the quantiser's or optimum's trace), and one layer read in fp32;
    - the fused recipe's last pass: the graph loaded once more, written out;
    - the gate: the reference (its weights in the checkpoint's dtype, one widened to fp32 at a time), then
      the session over the artifact.
    """
    graph = params * _STORED.get(precision, 4.0)
    # streamed: a layer in fp32 and its copies beside the graph, well under a sixteenth of the model
    builder = graph + params * 4 / 16 if streamed else params * 4 * 2
    last_pass = graph * 1.5
    # the 8B's reference peaked 15% above its bf16 checkpoint (bench/export.py: 18.1 GiB in all)
    gate = max(checkpoint_bytes * 1.15 + params * 4 / 16, graph * 1.3)
    return int(max(builder, last_pass, gate)) + HEADROOM


def check(src: Path, precision: str, fused: bool) -> dict[str, int] | None:
    """Refuse (ValueError) an export this box cannot hold; the figures where the checkpoint can be read."""
    from exporters import weights

    try:
        checkpoint = weights.Checkpoint(src)
    except (FileNotFoundError, ValueError):
        return None  # .bin weights or a GGUF's dequantised folder: nothing to estimate from
    streamed = fused and weights.streaming(src, None, checkpoint) is not None
    need = needed(checkpoint.params, checkpoint.unpacked_nbytes, precision, streamed)
    room = available()
    if need > room:
        raise ValueError(
            f"exporting this {checkpoint.params / 1e9:.2f}B-parameter model at {precision} needs about "
            f"{need / 2**30:.1f} GiB of memory and {room / 2**30:.1f} GiB is available: free memory, or "
            + ("choose a smaller precision (int4)" if precision != "int4" else "export it on a larger box")
        )
    return {"params": checkpoint.params, "needed_bytes": need, "available_bytes": room}
