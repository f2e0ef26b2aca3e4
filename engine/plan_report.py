"""The memory plan as text (engine/plan.py makes the plan; `train.py --dry-run` prints this)."""
from __future__ import annotations

GIB = 2 ** 30
RESERVE = GIB  # per rank: CUDA context, NCCL and allocator slack (engine/plan.py's verdict adds it too)


def render(p: dict) -> str:
    pr, mb, a = p["per_rank_bytes"], p["micro_batch"], p["activations"]
    unit, div = ("GiB", GIB) if pr["gpu"] + pr["cpu"] >= GIB else ("MiB", 2 ** 20)
    row = lambda label, g, c, note="": f"{label:<62}{g / div:10.2f}{c / div:10.2f}{note}"
    lines = [f"plan for '{p['name']}': {p['processes']} process(es), {p['engine']}, compute {p['dtypes']['compute']}, "
             f"teacher {p['dtypes']['teacher']} (built from config files on the meta device: no weights loaded)",
             "parameters: " + ", ".join(f"{k} {v:,}" for k, v in p["parameters"].items()),
             f"per rank: DM micro-batch {mb['dm']} of {mb['dm_per_rank']}, regression micro-batch {mb['regression']} "
             f"of {mb['regression_per_rank']}", f"{'per rank':<62}{'GPU ' + unit:>10}{'CPU ' + unit:>10}"]
    lines += [row(i["label"], i["gpu"], i["cpu"], "  (transient)" * i["transient"]) for i in pr["items"].values()]
    lines += [row("total (lasting items + the larger transient)", pr["gpu"], pr["cpu"]),
              f"activation peak: {a['checkpointing_on'] / div:.2f} {unit} with gradient checkpointing, "
              f"{a['checkpointing_off'] / div:.2f} {unit} without (saved tensors measured on the meta device)",
              f"pairs on disk: {p['pairs_disk_bytes'] / GIB:.2f} GiB ({p['pair_dtype']})"]
    verdict = (f"{'fits' if p['fits'] else 'does NOT fit'}: {pr['gpu_with_reserve'] / GIB:.2f} GiB per rank (with "
               f"{RESERVE / GIB:.0f} GiB reserve) vs {p['gpu_memory_bytes'] / GIB:.2f} GiB ({p['gpu_memory_source']})")
    return "\n".join(lines + ["verdict: " + ("a CPU run (train.device cpu)" if p["device"] == "cpu" else verdict)])
